"""Block-sparse prefill attention and paged sparse decode (see :mod:`efficient_ops.ops.sparse_attention`).

``_block_sparse_attention``: one program per (query block, batch x query head); it loops over exactly the
KV blocks its mask row lists (work proportional to the selected blocks), FlashAttention-2 style online
softmax in float32, the causal mask applied per element. A row that sees no key writes zeros and lse = -inf.

``_paged_decode_split`` + :func:`attention.merge_partials`: flash-decoding over an explicit page list. A program
takes one (batch row, KV head) and a contiguous share of its listed pages; the G query heads of the KV head
share every K/V tile (padded to 16 rows for the dot). Each writes a float32 partial and lse; empty shares
write lse = -inf, so there is no memset and the call has fixed shapes.
"""

import torch
import triton
import triton.language as tl

from ._common import sm_count
from .attention import finish, merge_partials, online_softmax_step

LOG2E = 1.4426950408889634


@triton.jit
def _block_sparse_attention(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, num_ptr, idx_ptr,
                            sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                            snb, snh, sib, sih, sim,
                            n_heads, G, Sq, Skv, Nk, qk_scale,
                            CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    m_block = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    kvh = h // G
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Sq
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + rows[:, None].to(tl.int64) * sqs
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    k_base = k_ptr + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + kvh.to(tl.int64) * svh
    n_listed = tl.load(num_ptr + b * snb + h * snh + m_block)
    n_listed = tl.minimum(tl.maximum(n_listed, 0), Nk)
    idx_row = idx_ptr + b.to(tl.int64) * sib + h.to(tl.int64) * sih + m_block.to(tl.int64) * sim
    last_key = rows + (Skv - Sq)  # causal: the last key position each row sees

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for it in range(0, n_listed):
        n_block = tl.load(idx_row + it)
        cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = (cols >= 0) & (cols < Skv)  # a garbage index (< 0 or >= Nk) reads nothing
        k = tl.load(k_base + cols[:, None].to(tl.int64) * sks + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * svs + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= last_key[:, None])
        m_i, l_i, acc = online_softmax_step(q, k, v, visible, qk_scale, m_i, l_i, acc)

    o, lse = finish(m_i, l_i, acc)
    tl.store(out_ptr + b.to(tl.int64) * sob + h.to(tl.int64) * soh + rows[:, None].to(tl.int64) * sos
             + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + (b * n_heads + h).to(tl.int64) * Sq + rows, lse, mask=row_ok)


def num_warps(block_m: int, block_n: int, d: int) -> int:
    """Warps per block-sparse program: 8 for large tiles or head_dim 256, else 4."""
    return 8 if block_m * block_n > 64 * 64 or d > 128 else 4


def block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, block_m, block_n, causal, scale):
    """q [B, Hq, Sq, D], k, v [B, Hkv, Skv, D] (last dims contiguous), int32 kv_num_blocks [B|1, H|1, Mq] and
    kv_indices [B|1, H|1, Mq, Nk] (last dim contiguous). Returns (out [B, Hq, Sq, D], float32 lse [B, Hq, Sq])."""
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    mq, nk = kv_indices.shape[2], kv_indices.shape[3]
    out = torch.empty_like(q)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)

    def stride(t, dim):  # a broadcast (size-1) mask dimension reads row 0
        return 0 if t.shape[dim] == 1 else t.stride(dim)

    _block_sparse_attention[(mq, b * hq)](
        q, k, v, out, lse, kv_num_blocks, kv_indices,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        stride(kv_num_blocks, 0), stride(kv_num_blocks, 1), stride(kv_indices, 0), stride(kv_indices, 1),
        kv_indices.stride(2), hq, hq // hkv, sq, skv, nk, scale * LOG2E,
        CAUSAL=causal, D=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps(block_m, block_n, d),
        num_stages=2)
    return out, lse


@triton.jit
def _paged_decode_split(q_ptr, k_ptr, v_ptr, seq_ptr, pages_ptr, o_part, lse_part,
                        sqb, sqh, skb, skh, sks, svb, svh, svs,
                        n_kv_heads, G, S_max, n_sel, per_split, n_splits, qk_scale,
                        D: tl.constexpr, PAGE: tl.constexpr, BLOCK_G: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // n_kv_heads
    kvh = bh % n_kv_heads
    g = tl.arange(0, BLOCK_G)
    g_ok = g < G
    head = kvh * G + g
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + head[:, None].to(tl.int64) * sqh + offs_d[None, :],
                mask=g_ok[:, None], other=0.0)
    k_base = k_ptr + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + kvh.to(tl.int64) * svh
    seq_len = tl.minimum(tl.maximum(tl.load(seq_ptr + b), 0), S_max)
    pages = pages_ptr + bh.to(tl.int64) * n_sel

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for slot in range(split * per_split, tl.minimum((split + 1) * per_split, n_sel)):
        page = tl.load(pages + slot)
        pos = page * PAGE + tl.arange(0, PAGE)
        ok = (pos >= 0) & (pos < seq_len)  # -1 slots and positions past the row's length read nothing
        k = tl.load(k_base + pos[:, None].to(tl.int64) * sks + offs_d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_base + pos[:, None].to(tl.int64) * svs + offs_d[None, :], mask=ok[:, None], other=0.0)
        m_i, l_i, acc = online_softmax_step(q, k, v, ok[None, :], qk_scale, m_i, l_i, acc)

    o, lse = finish(m_i, l_i, acc)
    part_row = (b * n_kv_heads * G + head).to(tl.int64) * n_splits + split  # partials [B, Hq, 1, n_splits, (D)]
    tl.store(o_part + part_row[:, None] * D + offs_d[None, :], o, mask=g_ok[:, None])
    tl.store(lse_part + part_row, lse, mask=g_ok)


def paged_sparse_decode(q, k_cache, v_cache, seq_lens, page_indices, page_size, scale, n_splits=None):
    """q [B, Hq, D], caches [B, Hkv, S_max, D] (last dims contiguous), int64 seq_lens [B], int32 page_indices
    [B, Hkv, n_sel] contiguous. Returns [B, Hq, D]."""
    b, hq, d = q.shape
    hkv, s_max = k_cache.shape[1], k_cache.shape[2]
    n_sel = page_indices.shape[2]
    if n_splits is None:
        n_splits = max(1, min(-(-2 * sm_count(q.device) // max(1, b * hkv)), -(-n_sel // 4)))  # >= 4 pages per split
    per_split = max(1, -(-n_sel // n_splits))
    g = hq // hkv
    o_part = torch.empty((b, hq, 1, n_splits, d), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((b, hq, 1, n_splits), dtype=torch.float32, device=q.device)
    _paged_decode_split[(b * hkv, n_splits)](
        q, k_cache, v_cache, seq_lens, page_indices, o_part, lse_part,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        hkv, g, s_max, n_sel, per_split, n_splits, scale * LOG2E,
        D=d, PAGE=page_size, BLOCK_G=max(16, triton.next_power_of_2(g)), num_warps=4)
    out = torch.empty_like(q)
    merge_partials(o_part, lse_part, out[:, :, None])
    return out
