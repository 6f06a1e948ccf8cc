"""Triton low-bit GEMM: ``out = x @ dequant(W).T + bias`` on the packed 4-bit format.

The format is documented in ``efficient_ops.quant.lowbit``: int32 words ``[N, K_pad / 8]``,
eight nibbles per word along K, scales and zeros ``[N, K_pad / group]``.

One kernel, two paths chosen by :func:`_config`:

- decode GEMV (M <= 16): a small M tile, products summed on the CUDA cores for M <= 2
  and a 16-row ``tl.dot`` above that, with split-K so that skinny problems still fill
  the GPU; split-K partials go to a float32 workspace that is summed afterwards
  (deterministic, and no float atomics).
- GEMM (M > 16): large tiles on the tensor cores, grouped tile order for L2 reuse.

A K tile never spans two quantization groups (BLOCK_K divides the group size), so the
tile is multiplied as exact small integers ``q - zero`` and scaled once per tile in float32.
"""

import functools

import torch
import triton
import triton.language as tl

from efficient_ops.quant.lowbit import PACK, padded_in_features


@triton.jit
def _lowbit_w4_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, stride_qn, stride_sn, k_tiles_per_split,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr,
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
    rk = tl.arange(0, BLOCK_K)
    rw = tl.arange(0, BLOCK_K // 8)
    shifts = tl.arange(0, 8) * 4
    m_ok = rm < M
    n_ok = rn < N
    rn_safe = tl.where(n_ok, rn, 0)  # rows past N read row 0 instead of masking every load

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_begin = pid_k * k_tiles_per_split
    t_end = tl.minimum(t_begin + k_tiles_per_split, stride_qn * 8 // BLOCK_K)
    for t in range(t_begin, t_end):
        k0 = t * BLOCK_K
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + (k0 + rk)[None, :],
                    mask=m_ok[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
        words = tl.load(qw_ptr + rn_safe[:, None] * stride_qn + (k0 // 8 + rw)[None, :])
        # [BN, BK/8] words -> [BN, BK/8, 8] nibbles -> [BN, BK]; k = 8 * word + nibble
        q = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 0xF, (BLOCK_N, BLOCK_K))
        g = k0 // GROUP
        scale = tl.load(s_ptr + rn_safe * stride_sn + g).to(tl.float32)
        zero = tl.load(z_ptr + rn_safe * stride_sn + g).to(tl.float32)
        w = q.to(tl.float32) - zero[:, None]  # exact: small integers (or halves)
        if USE_DOT:
            part = tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=DOT_PRECISION)
        else:
            part = tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
        acc += part * scale[None, :]

    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm64[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # float32 partial sums [SPLIT_K, M, N]
        tl.store(out_ptr + pid_k * M * N + rm64[:, None] * stride_om + rn[None, :], acc, mask=mask)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _config(M: int, N: int, k_pad: int, group: int, device: torch.device) -> dict:
    """Tile shapes, split-K and launch parameters for one problem (a heuristic, not autotuned:
    autotuning would put a benchmark inside the first call and inside CUDA-graph capture)."""
    if M <= 16:
        use_dot = M > 2  # the CUDA-core product tile is BLOCK_M x BLOCK_N x BLOCK_K registers
        block_m = 16 if use_dot else triton.next_power_of_2(M)
        block_n = 64 if use_dot else 32
        block_k = min(128, group)
        num_warps, num_stages = 4, 4
    else:
        use_dot = True
        block_m = 64 if M <= 64 else 128
        block_n = 128
        block_k = min(64, group)
        num_warps, num_stages = (4 if block_m == 64 else 8), 4
    k_tiles = k_pad // block_k
    split_k = 1
    if M <= 16:
        sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else 4
        tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
        split_k = max(1, min(k_tiles // 4, triton.cdiv(4 * sms, tiles), 16))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=use_dot, SPLIT_K=split_k,
                k_tiles_per_split=triton.cdiv(k_tiles, split_k), num_warps=num_warps, num_stages=num_stages)


def lowbit_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                bias, group: int, in_features: int) -> torch.Tensor:
    """``x`` [M, K] (unit stride along K) -> [M, N] in ``x.dtype``. Inputs are validated by the caller;
    ``group`` is the effective group size (K_pad for per-channel)."""
    M, K = x.shape
    N = qweight.shape[0]
    k_pad = padded_in_features(in_features)
    assert qweight.shape[1] * PACK == k_pad and K == in_features and x.stride(1) == 1
    cfg = _config(M, N, k_pad, group, x.device)
    split_k = cfg["SPLIT_K"]
    if split_k == 1:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split_k)
    _lowbit_w4_kernel[grid](
        x, qweight, scales, zeros, bias if bias is not None else scales, out,
        M, N, K, x.stride(0), N, qweight.stride(0), scales.stride(0),
        GROUP=group, HAS_BIAS=bias is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", GROUP_M=8, **cfg)
    if split_k == 1:
        return out
    out = out.sum(0)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)
