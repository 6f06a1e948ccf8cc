"""Reference block-sparse attention, paged decode and page selection: dense attention with the mask written out
per element, in float32 (float64 for float64 inputs), and Quest's page selection one (row, KV head, page) at
a time. :func:`select_pages_batched` is the tensor code the ``select_pages`` op runs on every device (it has
no kernel); the tests compare it with :func:`select_pages`. Inputs are validated by the ops."""

from typing import Tuple

import torch

from ..formats.sparse_attention import listed_blocks


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _masked_attention(q, k, v, allowed, scale) -> Tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale q k^T) v over the allowed keys; rows with none give zeros and lse = -inf."""
    compute = _compute_dtype(q)
    scores = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    weights = torch.where(allowed, torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0)[..., None]), 0)
    # keys no row attends (unselected blocks, cache tails, unlisted pages) may hold anything, NaN from an
    # uninitialised cache included: 0 * NaN would reach every output, so they are zeroed, not just weighted 0
    v = torch.where(allowed.any(-2)[..., None], v.to(compute), 0)
    return (weights @ v).to(q.dtype), lse.float()


def element_mask(kv_num_blocks, kv_indices, block_m, block_n, q_len, kv_len, causal) -> torch.Tensor:
    """Bool [B|1, H|1, Sq, Skv]: which keys each query row attends."""
    blocks = listed_blocks(kv_num_blocks, kv_indices)  # only the listed entries of kv_indices count
    rows = torch.arange(q_len, device=kv_indices.device)
    cols = torch.arange(kv_len, device=kv_indices.device)
    allowed = blocks[:, :, rows // block_m][..., cols // block_n]
    if causal:
        allowed = allowed & (cols[None, :] <= rows[:, None] + (kv_len - q_len))
    return allowed


def block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, block_m, block_n, causal, scale):
    """Dense attention with the block mask (and causality) expanded to every element; returns (out, lse)."""
    g = q.shape[1] // k.shape[1]
    allowed = element_mask(kv_num_blocks, kv_indices, block_m, block_n, q.shape[2], k.shape[2], causal)
    return _masked_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), allowed, scale)


def paged_sparse_decode(q, k_cache, v_cache, seq_lens, page_indices, page_size, scale):
    """q [B, Hq, D] attends the positions of its KV head's listed pages below seq_len."""
    b, hq, d = q.shape
    hkv, s_max = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    positions = torch.arange(s_max, device=q.device)
    pages = page_indices.long()
    listed = ((positions[None, None, :, None] // page_size) == pages[:, :, None, :]).any(-1)  # [B, Hkv, S]
    allowed = listed & (positions < seq_lens.to(q.device)[:, None, None])
    allowed = allowed.repeat_interleave(g, 1)[:, :, None, :]  # [B, Hq, 1, S]
    out, _ = _masked_attention(q[:, :, None], k_cache.repeat_interleave(g, 1), v_cache.repeat_interleave(g, 1),
                               allowed, scale)
    return out[:, :, 0]


def select_pages(q, kmin, kmax, seq_lens, page_size, token_budget):
    """One (batch row, KV head) at a time: the first and newest valid pages, then the highest Quest bounds
    sum_{query heads of the group} sum_d max(q_d kmax_d, q_d kmin_d) (lower page index on ties), sorted, -1 padded."""
    b, hq, d = q.shape
    hkv, n_pages = kmin.shape[1], kmin.shape[2]
    g = hq // hkv
    n_sel = min(max(2, token_budget // page_size), n_pages)
    out = torch.full((b, hkv, n_sel), -1, dtype=torch.int32)
    for row in range(b):
        n_valid = -(-int(seq_lens[row]) // page_size)
        for h in range(hkv):
            bound = []
            for page in range(n_valid):
                total = 0.0
                for head in range(h * g, (h + 1) * g):
                    qd = q[row, head].double()
                    hi, lo = qd * kmax[row, h, page].double(), qd * kmin[row, h, page].double()
                    total += float(torch.maximum(hi, lo).sum())
                bound.append(total)
            forced = sorted({0, n_valid - 1}) if n_valid else []
            rest = sorted((p for p in range(n_valid) if p not in forced), key=lambda p: (-bound[p], p))
            kept = sorted(forced + rest[: n_sel - len(forced)])
            out[row, h, : len(kept)] = torch.tensor(kept, dtype=torch.int32)
    return out.to(q.device)


def select_pages_batched(q, kmin, kmax, seq_lens, page_size, token_budget):
    """:func:`select_pages` as batched tensor code: fixed shapes, no host synchronisation (CUDA-graph safe)."""
    b, hq, d = q.shape
    hkv, n_pages = kmin.shape[1], kmin.shape[2]
    n_sel = min(max(2, token_budget // page_size), n_pages)
    qg = q.float().view(b, hkv, hq // hkv, 1, d)
    scores = torch.maximum(qg * kmax.float()[:, :, None], qg * kmin.float()[:, :, None]).sum((2, 4))
    n_valid = torch.div(seq_lens.long() + page_size - 1, page_size, rounding_mode="floor")
    page = torch.arange(n_pages, device=q.device)
    forced = (page[None, :] == 0) | (page[None, :] == n_valid[:, None] - 1)
    scores = torch.where(forced[:, None], float("inf"), scores)
    scores = torch.where((page[None, :] < n_valid[:, None])[:, None], scores, float("-inf"))
    best = scores.topk(n_sel, -1)
    chosen = torch.where(best.values == float("-inf"), n_pages, best.indices).sort(-1).values
    return torch.where(chosen == n_pages, -1, chosen).to(torch.int32)
