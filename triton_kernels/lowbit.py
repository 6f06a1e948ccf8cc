"""Triton low-bit GEMM: ``out = x @ dequant(W).T + bias`` on every packed format of ``efficient_ops.formats.lowbit``.

Formats (documented there; the caller passes each segment's format name and padded K, so this module
imports nothing from the package): 4, 3, 2 and 1 bit in int32 words along K, and
ternary at five trits per byte. Every one dequantizes as ``(q - zero) * scale`` per group, so one
kernel serves them: a compile-time ``FMT`` only changes how a ``[BLOCK_N, BLOCK_K]`` tile of levels
``q`` is decoded from the words. PTQ1.61's mixed layout runs as two segments of one launch (the
salient columns at one format, the rest at another), each reading its columns of x through a
permutation.

Two paths, chosen by :func:`_config`:

- decode GEMV (M <= 16): a small M tile, products summed on the CUDA cores for M <= 2 and a 16-row
  ``tl.dot`` above that, with split-K so that skinny problems still fill the GPU; split-K partials
  go to a float32 workspace that is summed afterwards (deterministic, and no float atomics).
- GEMM (M > 16): large tiles on the tensor cores, grouped tile order for L2 reuse.

A K tile never spans two quantization groups (BLOCK_K divides the group size, and the formats keep
every aligned 32 columns in one group), so it is scaled once per tile in float32. On the tensor
cores the tile multiplies the exact small integers ``q`` and subtracts ``zero * sum(x)`` in float32:
``q - zero`` itself (e.g. the centred binary zero ``0.5 - mu / 2a``) need not be exact in bf16.
"""

import torch
import triton
import triton.language as tl

from ._common import sm_count

# Format codes of the FMT constexpr (ternary has its own code: it is not a bit width).
FMT_CODES = {"w4": 4, "w3": 3, "w2": 2, "w1": 1, "ternary": 0}


@triton.jit
def _fields(words, WIDTH: tl.constexpr, BLOCK_N: tl.constexpr):
    # [BN, W] words -> [BN, W * 32 / WIDTH] fields; field j of word w is column (32 / WIDTH) * w + j
    per_word: tl.constexpr = 32 // WIDTH
    shifts = tl.arange(0, per_word) * WIDTH
    f = (words[:, :, None] >> shifts[None, None, :]) & ((1 << WIDTH) - 1)  # arithmetic shift: masked after
    return tl.reshape(f, (BLOCK_N, words.shape[1] * per_word))


@triton.jit
def _levels(qw_ptr, row_off, k0, FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Levels q [BLOCK_N, BLOCK_K] (int32) of columns k0 .. k0 + BLOCK_K; row_off = row * words_per_row."""
    if FMT == 4:
        words = tl.load(qw_ptr + row_off[:, None] + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :])
        q = _fields(words, 4, BLOCK_N)
    elif FMT == 2:
        words = tl.load(qw_ptr + row_off[:, None] + (k0 // 16 + tl.arange(0, BLOCK_K // 16))[None, :])
        q = _fields(words, 2, BLOCK_N)
    elif FMT == 1:
        words = tl.load(qw_ptr + row_off[:, None] + (k0 // 32 + tl.arange(0, BLOCK_K // 32))[None, :])
        q = _fields(words, 1, BLOCK_N)
    elif FMT == 3:
        # BLOCK_K divides 128, so the tile lies in one 128-column block: 8 low-bit words, 4 high-bit words
        base = (k0 // 128) * 12
        off = k0 % 128
        low = tl.load(qw_ptr + row_off[:, None] + (base + off // 16 + tl.arange(0, BLOCK_K // 16))[None, :])
        high = tl.load(qw_ptr + row_off[:, None] + (base + 8 + off // 32 + tl.arange(0, BLOCK_K // 32))[None, :])
        q = _fields(low, 2, BLOCK_N) | (_fields(high, 1, BLOCK_N) << 2)
    else:
        # ternary, BLOCK_K == 32: trit plane j of 160-column block u, one byte per column
        u = k0 // 160
        j = (k0 % 160) // 32
        power = tl.where(j == 0, 1, tl.where(j == 1, 3, tl.where(j == 2, 9, tl.where(j == 3, 27, 81))))
        words = tl.load(qw_ptr + row_off[:, None] + (u * 8 + tl.arange(0, 8))[None, :])
        q = (_fields(words, 8, BLOCK_N) // power) % 3
    return q


@triton.jit
def _segment(acc, x_ptr, stride_xm, rm64, m_ok, perm_ptr, perm_off, K_total, qw_ptr, s_ptr, z_ptr,
             stride_qn, stride_sn, rn_safe, K_seg, t_begin, t_end,
             FMT: tl.constexpr, GROUP: tl.constexpr, HAS_PERM: tl.constexpr, USE_DOT: tl.constexpr,
             DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += x[:, cols] @ dequant(tiles t_begin .. t_end of one packed segment).T"""
    rk = tl.arange(0, BLOCK_K)
    row_off = rn_safe.to(tl.int64) * stride_qn
    for t in range(t_begin, t_end):
        k0 = t * BLOCK_K
        k_ok = (k0 + rk) < K_seg
        if HAS_PERM:
            col = tl.load(perm_ptr + perm_off + k0 + rk, mask=k_ok, other=0)
            col = tl.where((col >= 0) & (col < K_total), col, 0)  # a corrupt permutation never reads out of bounds
        else:
            col = k0 + rk
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + col[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        q = _levels(qw_ptr, row_off, k0, FMT, BLOCK_N, BLOCK_K)
        g = k0 // GROUP
        scale = tl.load(s_ptr + rn_safe * stride_sn + g).to(tl.float32)
        zero = tl.load(z_ptr + rn_safe * stride_sn + g).to(tl.float32)
        if USE_DOT:
            # q is a small integer, exact in any float type; the zero point is applied in float32
            part = tl.dot(x, tl.trans(q.to(x.dtype)), input_precision=DOT_PRECISION)
            part -= tl.sum(x.to(tl.float32), axis=1)[:, None] * zero[None, :]
        else:
            w = q.to(tl.float32) - zero[:, None]
            part = tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
        acc += part * scale[None, :]
    return acc


@triton.jit
def _lowbit_kernel(
    x_ptr, bias_ptr, out_ptr, perm_ptr,
    qa_ptr, sa_ptr, za_ptr, qb_ptr, sb_ptr, zb_ptr,
    M, N, K_total, K_a, K_b, tiles_a, tiles_b, stride_xm, stride_om, stride_qa, stride_sa, stride_qb, stride_sb,
    k_tiles_per_split,
    FMT_A: tl.constexpr, GROUP_A: tl.constexpr, FMT_B: tl.constexpr, GROUP_B: tl.constexpr,
    HAS_B: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-tiles share each weight tile while it is in L2.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * num_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm64 = rm.to(tl.int64)  # M * K can pass 2**31 at prefill sizes
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rn_safe = tl.where(n_ok, rn, 0)  # rows past N read row 0 instead of masking every load

    # This split's K tiles, numbered over segment A then segment B.
    t_begin = pid_k * k_tiles_per_split
    t_end = tl.minimum(t_begin + k_tiles_per_split, tiles_a + tiles_b)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _segment(acc, x_ptr, stride_xm, rm64, m_ok, perm_ptr, 0, K_total, qa_ptr, sa_ptr, za_ptr,
                   stride_qa, stride_sa, rn_safe, K_a, t_begin, tl.minimum(t_end, tiles_a),
                   FMT_A, GROUP_A, HAS_B, USE_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_B:
        acc = _segment(acc, x_ptr, stride_xm, rm64, m_ok, perm_ptr, K_a, K_total, qb_ptr, sb_ptr, zb_ptr,
                       stride_qb, stride_sb, rn_safe, K_b, tl.maximum(t_begin - tiles_a, 0), t_end - tiles_a,
                       FMT_B, GROUP_B, HAS_B, USE_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)

    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm64[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # float32 partial sums [SPLIT_K, M, N]
        tl.store(out_ptr + pid_k * M * N + rm64[:, None] * stride_om + rn[None, :], acc, mask=mask)


def _block_k(fmt_name: str, group: int, gemm: bool) -> int:
    # Ternary tiles are one trit plane (32 columns); otherwise the largest tile inside one group.
    return 32 if fmt_name == "ternary" else min(64 if gemm else 128, group)


def _config(M: int, N: int, segments, device: torch.device) -> dict:
    """Tile shapes, split-K and launch parameters for one problem (a heuristic, not autotuned:
    autotuning would put a benchmark inside the first call and inside CUDA-graph capture).
    ``segments``: (format name, K_pad, group) per segment."""
    gemm = M > 16
    block_k = min(_block_k(name, group, gemm) for name, _, group in segments)
    if not gemm:
        use_dot = M > 2  # the CUDA-core product tile is BLOCK_M x BLOCK_N x BLOCK_K registers
        block_m = 16 if use_dot else triton.next_power_of_2(M)
        block_n = 64 if use_dot else 32
        num_warps, num_stages = 4, 4
    else:
        use_dot = True
        block_m = 64 if M <= 64 else 128
        block_n = 128
        num_warps, num_stages = (4 if block_m == 64 else 8), 4
    k_tiles = sum(k_pad // block_k for _, k_pad, _ in segments)
    split_k = 1
    if not gemm:
        sms = sm_count(device)
        tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
        split_k = max(1, min(k_tiles // 4, triton.cdiv(4 * sms, tiles), 16))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=use_dot, SPLIT_K=split_k,
                k_tiles_per_split=triton.cdiv(k_tiles, split_k), num_warps=num_warps, num_stages=num_stages)


def lowbit_gemm(x: torch.Tensor, segments, bias, perm=None) -> torch.Tensor:
    """``x`` [M, K] (unit stride along K) -> [M, N] in ``x.dtype``. Inputs are validated by the caller.

    ``segments``: one or two ``(qweight, scales, zeros, format name, K_pad, group, in_features)`` tuples
    (``format name`` one of :data:`FMT_CODES`; ``group`` the effective group size, K_pad for per-channel).
    With two segments, ``perm`` (int32 [K]) maps the columns of segment A, then of segment B, to columns of x.
    """
    M, K = x.shape
    N = segments[0][0].shape[0]
    assert x.stride(1) == 1 and (len(segments) == 1) == (perm is None)
    specs = [(name, k_pad, group) for _, _, _, name, k_pad, group, _ in segments]
    cfg = _config(M, N, specs, x.device)
    block_k, split_k = cfg["BLOCK_K"], cfg["SPLIT_K"]
    out = torch.empty((M, N) if split_k == 1 else (split_k, M, N),
                      dtype=x.dtype if split_k == 1 else torch.float32, device=x.device)
    a = segments[0]
    b = segments[1] if len(segments) == 2 else a  # an unused second segment: any valid pointers
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split_k)
    _lowbit_kernel[grid](
        x, bias if bias is not None else a[1], out, perm if perm is not None else a[0],
        a[0], a[1], a[2], b[0], b[1], b[2],
        M, N, K, a[6], b[6] if len(segments) == 2 else 0,
        specs[0][1] // block_k, specs[1][1] // block_k if len(segments) == 2 else 0,
        x.stride(0), N, a[0].stride(0), a[1].stride(0), b[0].stride(0), b[1].stride(0),
        FMT_A=FMT_CODES[specs[0][0]], GROUP_A=specs[0][2], FMT_B=FMT_CODES[specs[-1][0]], GROUP_B=specs[-1][2],
        HAS_B=len(segments) == 2, HAS_BIAS=bias is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", GROUP_M=8, **cfg)
    if split_k == 1:
        return out
    out = out.sum(0)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)
