"""Tree attention, KV compaction and stochastic verification for speculative decoding (see
:mod:`efficient_ops.ops.speculative` for the semantics).

Tree attention runs flash-decoding style in two launches:

1. ``_tree_attention_split``: grid (query-row tile, batch x KV head, split). The ``G * T`` query rows of one
   KV head (its G query heads times the T tree nodes) share every key, so each program takes a tile of
   them against one chunk of the prefix (splits ``0 .. n_splits - 1``) or, for the last split, against the
   T tree keys, masked to each node's ancestors and itself. The ancestor mask is built in registers by
   walking ``parents`` up from each row's node; no T x (prefix + T) mask exists anywhere. The row tiles of
   one (batch, KV head, split) are adjacent in launch order, so they read the chunk's K/V from DRAM once
   and from L2 after. Each program writes its rows' float32 partial output and log-sum-exp.
2. :func:`attention.merge_partials`: per query row, the log-sum-exp-weighted sum of the ``n_splits + 1`` partials.

Empty chunks (past a short prefix) write lse = -inf and o = 0, so the workspace needs no memset and the
whole call has fixed shapes (CUDA-graph capturable). The prefix length is clamped to [0, S_max - T]
in-kernel so that no input reads out of bounds (the op rejects such lengths outside graph capture).

``_compact_kv``: one program per (layer, batch row, KV head) moves the accepted path's rows in order.
``_verify_sampling_kernel``: one program per batch row walks the draft tree with the rejection rules.
"""

import torch
import triton
import triton.language as tl

from ._common import sm_count
from .attention import finish, merge_partials, online_softmax_step

LOG2E = 1.4426950408889634
MIN_CHUNK = 256  # prefix positions per split at least: fewer would spend more on the merge than they save


@triton.jit
def _tree_attention_split(q_ptr, k_ptr, v_ptr, prefix_ptr, parents_ptr, o_part, lse_part,
                          sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, parents_stride,
                          T, G, n_kv_heads, S_max, chunk, n_splits, qk_scale,
                          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_T: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // n_kv_heads
    kvh = bh % n_kv_heads

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row r = g * T + node: query head kvh * G + g
    row_ok = rows < G * T
    node = rows % T
    head = kvh * G + rows // T
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + head[:, None].to(tl.int64) * sqh + node[:, None] * sqt
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    k_base = k_ptr + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + kvh.to(tl.int64) * svh
    prefix = tl.minimum(tl.maximum(tl.load(prefix_ptr + b), 0), S_max - T).to(tl.int32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scores, in log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if split < n_splits:
        start = split * chunk
        end = tl.minimum(start + chunk, prefix)
        for n in range(start, end, BLOCK_N):
            offs_n = n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < end
            k = tl.load(k_base + offs_n[:, None].to(tl.int64) * sks + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svs + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            m_i, l_i, acc = online_softmax_step(q, k, v, n_ok[None, :], qk_scale, m_i, l_i, acc)
    else:
        # Tree keys: node j at position prefix + j is visible to row node i when j is i or an ancestor.
        offs_t = tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        visible = offs_t[None, :] == node[:, None]
        ancestor = tl.where(row_ok, node, -1)
        while tl.max(ancestor, 0) > 0:
            up = tl.load(parents_ptr + b.to(tl.int64) * parents_stride + tl.maximum(ancestor, 0),
                         mask=ancestor > 0, other=-1).to(tl.int32)
            ancestor = tl.where((up >= 0) & (up < ancestor), up, -1)  # strictly decreasing: always ends
            visible = visible | (offs_t[None, :] == ancestor[:, None])
        visible = visible & t_ok[None, :] & row_ok[:, None]
        pos = prefix + offs_t
        k = tl.load(k_base + pos[:, None].to(tl.int64) * sks + offs_d[None, :], mask=t_ok[:, None], other=0.0)
        v = tl.load(v_base + pos[:, None].to(tl.int64) * svs + offs_d[None, :], mask=t_ok[:, None], other=0.0)
        m_i, l_i, acc = online_softmax_step(q, k, v, visible, qk_scale, m_i, l_i, acc)

    o, lse = finish(m_i, l_i, acc)
    # partials are [B, Hq, T, n_splits + 1, (D)], contiguous
    part_row = ((b * n_kv_heads * G + head).to(tl.int64) * T + node) * (n_splits + 1) + split
    tl.store(o_part + part_row[:, None] * D + offs_d[None, :], o, mask=row_ok[:, None])
    tl.store(lse_part + part_row, lse, mask=row_ok)


def blocks(group: int, t: int):
    """(BLOCK_M query rows, BLOCK_N prefix keys, BLOCK_T tree keys) per program for G = ``group``, T = ``t``."""
    rows = group * t
    return (64 if rows > 32 else max(16, triton.next_power_of_2(rows))), 64, max(16, triton.next_power_of_2(t))


def num_splits(batch: int, n_kv_heads: int, row_tiles: int, prefix_cap: int, sm_count: int) -> int:
    """Splits of the prefix for about two waves of programs, each split at least MIN_CHUNK positions."""
    want = -(-2 * sm_count // max(1, batch * n_kv_heads * row_tiles))
    return max(1, min(want, -(-prefix_cap // MIN_CHUNK)))


def tree_attention(q, k_cache, v_cache, prefix_lens, parents, scale, n_splits=None):
    """q [B, Hq, T, D], caches [B, Hkv, S_max, D] (last dims contiguous), prefix_lens int64 [B], parents int64
    [B | 1, T] contiguous. Returns [B, Hq, T, D] in q's dtype."""
    b, hq, t, d = q.shape
    hkv, s_max = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    block_m, block_n, block_t = blocks(g, t)
    row_tiles = triton.cdiv(g * t, block_m)
    prefix_cap = s_max - t
    if n_splits is None:
        n_splits = num_splits(b, hkv, row_tiles, prefix_cap, sm_count(q.device))
    chunk = max(block_n, triton.cdiv(triton.cdiv(max(prefix_cap, 1), n_splits), block_n) * block_n)
    o_part = torch.empty((b, hq, t, n_splits + 1, d), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((b, hq, t, n_splits + 1), dtype=torch.float32, device=q.device)
    _tree_attention_split[(row_tiles, b * hkv, n_splits + 1)](
        q, k_cache, v_cache, prefix_lens, parents, o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), parents.stride(0) if parents.shape[0] > 1 else 0,
        t, g, hkv, s_max, chunk, n_splits, scale * LOG2E,
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_T=block_t,
        num_warps=4, num_stages=2)
    out = torch.empty_like(q)
    merge_partials(o_part, lse_part, out)
    return out


@triton.jit
def _compact_kv(k_ptr, v_ptr, prefix_ptr, accepted_ptr, accept_len_ptr, n_batch, n_kv_heads, S_max, P,
                skl, skb, skh, sks, svl, svb, svh, svs, acc_stride,
                D: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)  # (layer, batch row, KV head)
    h = pid % n_kv_heads
    b = (pid // n_kv_heads) % n_batch
    layer = pid // (n_kv_heads * n_batch)
    k_base = k_ptr + layer.to(tl.int64) * skl + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = v_ptr + layer.to(tl.int64) * svl + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    prefix = tl.load(prefix_ptr + b)
    n_moves = tl.minimum(tl.maximum(tl.load(accept_len_ptr + b), 0), P - 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    # Moves in increasing j, each element by the same thread (one layout for load and store): move j reads
    # slot prefix + accepted[j] >= prefix + j, and earlier moves wrote only slots < prefix + j, so no move
    # reads a slot that was already overwritten, however the paths overlap.
    for j in range(1, n_moves + 1):
        # as vectors: the interpreter cannot AND a scalar condition into a vector mask
        dst = prefix + j + tl.zeros([BLOCK_D], tl.int64)
        src = dst - j + tl.load(accepted_ptr + b.to(tl.int64) * acc_stride + j)
        ok = d_ok & (src >= dst) & (src < S_max) & (dst >= 0) & (dst < S_max)
        tl.store(k_base + dst * sks + offs_d, tl.load(k_base + src * sks + offs_d, mask=ok), mask=ok)
        tl.store(v_base + dst * svs + offs_d, tl.load(v_base + src * svs + offs_d, mask=ok), mask=ok)


def compact_kv(k_cache, v_cache, prefix_lens, accepted_nodes, accept_len):
    """Caches [L, B, Hkv, S_max, D] (last dim contiguous), int64 prefix_lens [B], accepted_nodes [B, P]
    (rows contiguous), accept_len [B]. Moves in place, one launch for all layers."""
    n_layers, b, hkv, s_max, d = k_cache.shape
    _compact_kv[(n_layers * b * hkv,)](
        k_cache, v_cache, prefix_lens, accepted_nodes, accept_len, b, hkv, s_max, accepted_nodes.shape[1],
        *k_cache.stride()[:4], *v_cache.stride()[:4], accepted_nodes.stride(0),
        D=d, BLOCK_D=triton.next_power_of_2(d), num_warps=1 if d <= 128 else 2)


MODE_IDS = {"iid": 0, "without_replacement": 1, "deterministic": 2}


@triton.jit
def _load_row(src_ptr, dst_ptr, V, BLOCK_V: tl.constexpr):
    """dst[:V] = float64(src[:V]); returns the sum."""
    total = tl.zeros([BLOCK_V], tl.float64)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(src_ptr + offs, mask=offs < V, other=0.0).to(tl.float64)
        tl.store(dst_ptr + offs, x, mask=offs < V)
        total += x
    return tl.sum(total, 0)


@triton.jit
def _residual(p_ptr, q_ptr, zp, zq, V, BLOCK_V: tl.constexpr):
    """p <- max(0, p / zp - q / zq) in place unless that is all zero (then p is left as it is); returns the
    new sum of p (zp when left)."""
    total = tl.zeros([BLOCK_V], tl.float64)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        ok = offs < V
        p = tl.load(p_ptr + offs, mask=ok, other=0.0)
        q = tl.load(q_ptr + offs, mask=ok, other=0.0)
        total += tl.maximum(p / zp - q / zq, 0.0)
    new_total = tl.sum(total, 0)
    if new_total > 0:
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            ok = offs < V
            p = tl.load(p_ptr + offs, mask=ok, other=0.0)
            q = tl.load(q_ptr + offs, mask=ok, other=0.0)
            tl.store(p_ptr + offs, tl.maximum(p / zp - q / zq, 0.0), mask=ok)
    else:
        new_total = zp
    return new_total


@triton.jit
def _verify_sampling_kernel(tokens_ptr, children_ptr, target_ptr, draft_ptr, u_ptr, u_final_ptr, res_p_ptr, res_q_ptr,
                            accept_len_ptr, accepted_ptr, next_ptr,
                            T, C, V, path_len, s_tb, s_tt, s_db, s_dt,
                            MODE: tl.constexpr, BLOCK_V: tl.constexpr):
    """One batch row: walk the tree from the root, trying each node's children in order against the current
    residual target distribution (float64 copies in res_p / res_q, unnormalised, with their sums)."""
    b = tl.program_id(0).to(tl.int64)
    res_p = res_p_ptr + b * V
    res_q = res_q_ptr + b * V
    node = b * 0  # int64 scalar
    depth = b * 0
    zp = _load_row(target_ptr + b * s_tb, res_p, V, BLOCK_V)
    zq = _load_row(draft_ptr + b * s_db, res_q, V, BLOCK_V)
    walking = 1
    while walking == 1:
        moved = 0
        k = 0
        while (k < C) & (moved == 0):
            child = tl.load(children_ptr + (b * T + node) * C + k)
            if child < 0:
                k = C
            else:
                x = tl.load(tokens_ptr + b * T + child)
                px = tl.load(res_p + x)
                qx = tl.load(res_q + x)
                u = tl.load(u_ptr + b * T + child)
                if MODE == 2:
                    accept = u * zp < px
                else:
                    accept = u * qx * zp < px * zq  # u < (px / zp) / (qx / zq), with no division
                if accept:
                    node = child
                    depth += 1
                    tl.store(accepted_ptr + b * path_len + depth, child)
                    moved = 1
                else:
                    # a distribution that would become all zero is kept as it is (as the reference does)
                    if MODE == 2:
                        if zp - px > 0:
                            tl.store(res_p + x, 0.0)
                            zp = zp - px
                    else:
                        zp = _residual(res_p, res_q, zp, zq, V, BLOCK_V)
                        if MODE == 1:
                            if zq - qx > 0:
                                tl.store(res_q + x, 0.0)
                                zq = zq - qx
                k += 1
        if moved == 1:
            zp = _load_row(target_ptr + b * s_tb + node * s_tt, res_p, V, BLOCK_V)
            zq = _load_row(draft_ptr + b * s_db + node * s_dt, res_q, V, BLOCK_V)
        else:
            walking = 0
    # the next token: the first index whose running sum of the residual exceeds u * zp (never a zero weight)
    threshold = tl.load(u_final_ptr + b) * zp
    carry = zp * 0.0
    chosen = V
    last_positive = b * 0 - 1
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        ok = offs < V
        p = tl.load(res_p + offs, mask=ok, other=0.0)
        running = carry + tl.cumsum(p, 0)
        chosen = tl.minimum(chosen, tl.min(tl.where(ok & (running > threshold), offs, V), 0))
        last_positive = tl.maximum(last_positive, tl.max(tl.where(ok & (p > 0), offs, -1), 0))
        carry += tl.sum(p, 0)
    chosen = tl.where(chosen < V, chosen, last_positive)
    tl.store(accept_len_ptr + b, depth)
    tl.store(next_ptr + b, chosen)


def verify_sampling(tokens, children, target_probs, draft_probs, mode, u_accept, u_final, max_depth):
    """tokens int64 [B, T], children int64 [B, T, C] (-1 padded, in node order), probs [B, T, V] (last dim
    contiguous), float64 uniforms u_accept [B, T] and u_final [B]. Returns (accept_len, accepted_nodes, next)."""
    b, t, v = target_probs.shape
    accepted = torch.full((b, max_depth + 1), -1, dtype=torch.long, device=tokens.device)
    accepted[:, 0] = 0
    accept_len = torch.empty(b, dtype=torch.long, device=tokens.device)
    next_token = torch.empty(b, dtype=torch.long, device=tokens.device)
    res_p = torch.empty((b, v), dtype=torch.float64, device=tokens.device)
    res_q = torch.empty((b, v), dtype=torch.float64, device=tokens.device)
    _verify_sampling_kernel[(b,)](
        tokens, children, target_probs, draft_probs, u_accept, u_final, res_p, res_q, accept_len, accepted, next_token,
        t, children.shape[2], v, max_depth + 1, target_probs.stride(0), target_probs.stride(1),
        draft_probs.stride(0), draft_probs.stride(1), MODE=MODE_IDS[mode],
        BLOCK_V=min(4096, triton.next_power_of_2(v)), num_warps=4)
    return accept_len, accepted, next_token
