"""Pieces shared by the attention kernels: FlashAttention's online-softmax step over one key tile, the
finish of a row's (output, log-sum-exp), and the merge of split-KV partials by log-sum-exp (the second
launch of the flash-decoding kernels)."""

import torch
import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def online_softmax_step(q, k, v, visible, qk_scale, m_i, l_i, acc):
    """Fold one key tile into the running (max, sum, output) of each query row, in the log2 domain
    (``qk_scale`` includes log2(e)). ``visible`` masks (row, key) pairs; a row that has seen no visible key
    keeps m = -inf and adds nothing (no inf - inf)."""
    s = tl.where(visible, tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def finish(m_i, l_i, acc):
    """A row's normalised output and natural-log lse; a row with no key gives 0 and -inf."""
    has_keys = l_i > 0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * LN2, float("-inf"))
    return o, lse


@triton.jit
def _merge_splits(o_part, lse_part, out_ptr, sob, soh, sot, n_heads, T, n_parts,
                  D: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)  # (b * Hq + h) * T + node
    node = row % T
    head = (row // T) % n_heads
    b = row // (T * n_heads)
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < n_parts
    offs_d = tl.arange(0, D)
    lse = tl.load(lse_part + row.to(tl.int64) * n_parts + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every partial empty (a row with no key): all weights 0
    w = tl.where(s_ok & (lse > float("-inf")), tl.exp(lse - m), 0.0)
    o = tl.load(o_part + (row.to(tl.int64) * n_parts + offs_s[:, None]) * D + offs_d[None, :], mask=s_ok[:, None],
                other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * sob + head.to(tl.int64) * soh + node.to(tl.int64) * sot + offs_d,
             out.to(out_ptr.dtype.element_ty))


def merge_partials(o_part: torch.Tensor, lse_part: torch.Tensor, out: torch.Tensor) -> None:
    """out [B, H, T, D] (any strides, last dim contiguous) from float32 partials o_part [B, H, T, P, D] and
    lse_part [B, H, T, P] (contiguous; natural log, -inf for an empty partial)."""
    b, h, t, n_parts, d = o_part.shape
    _merge_splits[(b * h * t,)](o_part, lse_part, out, out.stride(0), out.stride(1), out.stride(2), h, t, n_parts,
                                D=d, BLOCK_S=max(2, triton.next_power_of_2(n_parts)))
