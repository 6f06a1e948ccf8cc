"""R-Sparse linear in one fused Triton launch (see :mod:`efficient_ops.ops.rsparse` for the formula).

One 1-D grid of programs in three roles, in this order of program id (per block of 16 rows of x, the
second grid axis):

- B, low-rank down-projection: a chunk of input channels x a tile of rank columns. Thresholds its x
  chunk, reads the rows of ``v`` of channels inactive in at least one row, adds ``x * (1 - m) @ v``
  into the float32 ``z`` workspace, then counts itself done.
- A, sparse part: a chunk of input channels x a tile of outputs. Thresholds its x chunk, reads only
  the rows of ``weight_t`` of channels active in at least one row (split-K over channels), adds
  ``x * m @ weight_t`` into the float32 ``y`` workspace.
- C, low-rank up-projection: a chunk of ranks x a tile of outputs. Waits until every B program is
  done, then adds ``z @ us_t`` into ``y``.

The last program to add into an output tile (an arrival counter per tile) adds the bias, rounds and
writes the tile. C programs spin on B's counter: this relies on programs with a lower id being
dispatched no later than higher ones (as CUDA does in practice, and the interpreter runs them in
order), so B programs never wait behind spinning C programs. The workspace is zeroed by the caller.
"""

import torch
import triton
import triton.language as tl

from ._common import sm_count

BLOCK_M = 16  # rows per program: the smallest tl.dot tile; decode M <= 8 pads into it


@triton.jit
def _threshold(x_ptr, c_ptr, threshold, offs_m, m_ok, offs_k, K, stride_xm):
    """The x tile [BLOCK_M, BLOCK_K], its active mask (|x| * c > t, float32) and the in-bounds mask."""
    k_ok = offs_k < K
    ok = m_ok[:, None] & k_ok[None, :]
    x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :], mask=ok, other=0.0)
    c = tl.load(c_ptr + offs_k, mask=k_ok, other=0.0)
    active = (tl.abs(x.to(tl.float32)) * c[None, :] > threshold) & ok
    return x, active, ok


@triton.jit
def _arrive(y_ws, cnt_ptr, bias_ptr, out_ptr, offs_m, m_ok, offs_n, n_ok, N, stride_om, expected,
            HAS_BIAS: tl.constexpr):
    """Count one contribution to this output tile; the last one writes bias + y, rounded, to out."""
    tl.debug_barrier()  # every thread's workspace atomics precede the release below
    if tl.atomic_add(cnt_ptr, 1, sem="acq_rel") == expected - 1:
        ok = m_ok[:, None] & n_ok[None, :]
        y = tl.load(y_ws + offs_m[:, None] * N + offs_n[None, :], mask=ok, other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rsparse_kernel(x_ptr, wt_ptr, c_ptr, v_ptr, us_ptr, bias_ptr, out_ptr, ws_ptr,
                    threshold, M, K, N, R, stride_xm, stride_om,
                    n_tiles, r_tiles, splits_b, chunk_b, splits_a, chunk_a, splits_c, chunk_c,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    pid_m = tl.program_id(1)
    # Workspace (float32 words): y [M, N], z [M, R], then int32 counters per row block: B done, tile arrivals.
    y_ws = ws_ptr
    z_ws = ws_ptr + M * N
    cnt = (ws_ptr + M * N + M * R).to(tl.pointer_type(tl.int32), bitcast=True) + pid_m * (1 + n_tiles)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    n_b = splits_b * r_tiles
    n_a = splits_a * n_tiles
    expected = splits_a + splits_c  # contributions per output tile

    if pid < n_b:  # B: z += x * (1 - m) @ v over a channel chunk, for BLOCK_R ranks
        offs_r = (pid % r_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        k0 = (pid // r_tiles) * chunk_b
        z = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for kk in range(k0, tl.minimum(k0 + chunk_b, K), BLOCK_K):
            offs_k = kk + tl.arange(0, BLOCK_K)
            x, active, ok = _threshold(x_ptr, c_ptr, threshold, offs_m, m_ok, offs_k, K, stride_xm)
            inactive = ok & (active == 0)
            need = tl.max(inactive.to(tl.int32), axis=0) > 0  # rows of v some row of x reads
            vt = tl.load(v_ptr + offs_k[:, None].to(tl.int64) * R + offs_r[None, :],
                         mask=need[:, None] & r_ok[None, :], other=0.0)
            z += tl.dot(tl.where(inactive, x, tl.zeros_like(x)), vt)
        tl.atomic_add(z_ws + offs_m[:, None] * R + offs_r[None, :], z, mask=m_ok[:, None] & r_ok[None, :],
                      sem="relaxed")
        tl.debug_barrier()
        tl.atomic_add(cnt, 1, sem="release")
    elif pid < n_b + n_a:  # A: y += x * m @ weight_t over a channel chunk, for BLOCK_N outputs
        local = pid - n_b
        tile = local % n_tiles
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        k0 = (local // n_tiles) * chunk_a
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(k0, tl.minimum(k0 + chunk_a, K), BLOCK_K):
            offs_k = kk + tl.arange(0, BLOCK_K)
            x, active, ok = _threshold(x_ptr, c_ptr, threshold, offs_m, m_ok, offs_k, K, stride_xm)
            need = tl.max(active.to(tl.int32), axis=0) > 0  # rows of weight_t some row of x reads
            w = tl.load(wt_ptr + offs_k[:, None].to(tl.int64) * N + offs_n[None, :],
                        mask=need[:, None] & n_ok[None, :], other=0.0)
            acc += tl.dot(tl.where(active, x, tl.zeros_like(x)), w)
        tl.atomic_add(y_ws + offs_m[:, None] * N + offs_n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :],
                      sem="relaxed")
        _arrive(y_ws, cnt + 1 + tile, bias_ptr, out_ptr, offs_m, m_ok, offs_n, n_ok, N, stride_om, expected,
                HAS_BIAS)
    else:  # C: y += z @ us_t over a rank chunk, for BLOCK_N outputs, once every B program is done
        local = pid - n_b - n_a
        tile = local % n_tiles
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        while tl.atomic_add(cnt, 0, sem="acquire") < n_b:
            pass
        r0 = (local // n_tiles) * chunk_c
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for rr in range(r0, tl.minimum(r0 + chunk_c, R), BLOCK_R):
            offs_r = rr + tl.arange(0, BLOCK_R)
            r_ok = offs_r < R
            z = tl.load(z_ws + offs_m[:, None] * R + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :],
                        other=0.0, cache_modifier=".cg")
            u = tl.load(us_ptr + offs_r[:, None].to(tl.int64) * N + offs_n[None, :],
                        mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc += tl.dot(z, u.to(tl.float32), input_precision="ieee")
        tl.atomic_add(y_ws + offs_m[:, None] * N + offs_n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :],
                      sem="relaxed")
        _arrive(y_ws, cnt + 1 + tile, bias_ptr, out_ptr, offs_m, m_ok, offs_n, n_ok, N, stride_om, expected,
                HAS_BIAS)


def _split(length: int, block: int, splits: int):
    """(number of chunks, chunk length as a multiple of ``block``) for about ``splits`` chunks of ``length``."""
    blocks = triton.cdiv(length, block)
    per = triton.cdiv(blocks, max(1, min(splits, blocks)))
    return triton.cdiv(blocks, per), per * block


def _config(M: int, K: int, N: int, R: int, device: torch.device) -> dict:
    """Tiles and splits (a heuristic, not autotuned: autotuning would benchmark inside the first call
    and inside CUDA-graph capture). Each role gets about two programs per SM."""
    sms = sm_count(device)
    block_k, block_n, block_r = 64, 128, 64
    n_tiles = triton.cdiv(N, block_n)
    r_tiles = triton.cdiv(R, block_r)
    splits_a, chunk_a = _split(K, block_k, triton.cdiv(4 * sms, n_tiles))
    splits_b, chunk_b = _split(K, block_k, triton.cdiv(2 * sms, r_tiles)) if R else (0, block_k)
    splits_c, chunk_c = _split(R, block_r, triton.cdiv(2 * sms, n_tiles)) if R else (0, block_r)
    return dict(n_tiles=n_tiles, r_tiles=r_tiles, splits_b=splits_b, chunk_b=chunk_b, splits_a=splits_a,
                chunk_a=chunk_a, splits_c=splits_c, chunk_c=chunk_c, BLOCK_K=block_k, BLOCK_N=block_n,
                BLOCK_R=block_r)


def rsparse_linear(x, weight_t, col_norms, threshold, v, us_t, bias) -> torch.Tensor:
    """``x`` [M, K] (unit stride along K) -> [M, N] in ``x.dtype``. Inputs are validated by the caller."""
    M, K = x.shape
    N, R = weight_t.shape[1], v.shape[1]
    cfg = _config(M, K, N, R, x.device)
    m_blocks = triton.cdiv(M, BLOCK_M)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    workspace = torch.zeros(M * N + M * R + m_blocks * (1 + cfg["n_tiles"]), dtype=torch.float32, device=x.device)
    programs = cfg["splits_b"] * cfg["r_tiles"] + (cfg["splits_a"] + cfg["splits_c"]) * cfg["n_tiles"]
    _rsparse_kernel[(programs, m_blocks)](
        x, weight_t, col_norms, v if R else weight_t, us_t if R else weight_t, bias if bias is not None else x,
        out, workspace, threshold, M, K, N, R, x.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, num_warps=4, **cfg)
    return out
