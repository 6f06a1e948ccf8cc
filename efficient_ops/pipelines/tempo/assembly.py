"""Assembly of the LLM's visual context: which tokens of each segment are kept (head / tail / ToMe), packing
them with their timestamps (:func:`efficient_ops.pack_segments`), and the per-segment block-sparse mask.
"""

from __future__ import annotations

from typing import Optional

import torch

import efficient_ops

STRATEGIES = ("head", "tail", "tome")


def tome_merge(x: torch.Tensor, target: int) -> torch.Tensor:
    """Token Merging by bipartite soft matching (Bolya et al.), as Tempo's "tome" strategy: while more than
    ``target`` tokens remain, split them alternately into sets A and B, match each A token to its most
    cosine-similar B token, and average the ``r`` best-matched A tokens into their matches (sizes tracked, so
    a merged token is the mean of everything merged into it). Kept tokens stay in their original order."""
    if target < 1:
        raise ValueError(f"target: must be at least 1, got {target}")
    tokens, sizes, order = x.float(), torch.ones(x.shape[0], 1), torch.arange(x.shape[0], dtype=torch.float64)
    while tokens.shape[0] > target:
        a, b = tokens[0::2], tokens[1::2]
        r = min(tokens.shape[0] - target, a.shape[0], b.shape[0])
        if r <= 0:
            break
        na, nb = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12), b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        best, match = (na @ nb.T).max(dim=-1)
        ranked = best.argsort(descending=True)
        src, keep = ranked[:r], ranked[r:].sort().values
        sa, sb = sizes[0::2], sizes[1::2].clone()
        merged = (b * sb).index_add(0, match[src], a[src] * sa[src])
        sb.index_add_(0, match[src], sa[src])
        tokens = torch.cat([a[keep], merged / sb])
        sizes = torch.cat([sa[keep], sb])
        o = torch.cat([order[0::2][keep], order[1::2]])
        perm = o.argsort()
        tokens, sizes, order = tokens[perm], sizes[perm], o[perm]
    return tokens.to(x.dtype)


def arrange(memory: torch.Tensor, counts: torch.Tensor, strategy: str = "head") -> torch.Tensor:
    """``memory [n, K, d]`` rearranged so that the tokens ``strategy`` keeps for segment i are its first
    ``counts[i]`` rows (what :func:`efficient_ops.pack_segments` keeps): "head" keeps the first tokens
    (Tempo's default: the memory tokens front-load information), "tail" the last ones, in order, "tome"
    merges all K into ``counts[i]`` tokens."""
    if strategy == "head":
        return memory
    n, k, _ = memory.shape
    if strategy == "tail":
        start = (k - counts.to(memory.device))[:, None]
        index = (torch.arange(k, device=memory.device)[None, :] + start) % k
        return memory.gather(1, index[..., None].expand_as(memory))
    if strategy == "tome":
        out = memory.clone()
        for i, c in enumerate(counts.tolist()):
            if 0 < c < k:
                out[i, :c] = tome_merge(memory[i], c)
        return out
    raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")


def pack_context(memory: torch.Tensor, counts: torch.Tensor, stamps: torch.Tensor, stamp_lens: torch.Tensor,
                 strategy: str = "head", backend: Optional[str] = None):
    """The visual context: per segment its timestamp embeddings then its kept memory tokens, in time order.

    Returns ``(packed [total, d], cu_seqlens int32 [n + 1])`` (segment i spans rows ``cu[i] .. cu[i + 1]``).
    """
    counts = counts.to(memory.device)
    return efficient_ops.pack_segments(arrange(memory, counts, strategy), counts, stamps.to(memory.dtype),
                                       stamp_lens.to(memory.device), backend=backend)


def segment_block_mask(prefix_len: int, cu_seqlens: torch.Tensor, total_len: int, block: int = 64,
                       window: int = 1, device=None):
    """A causal :class:`efficient_ops.BlockSparseMask` over the LLM prompt ``[prefix text | segments | suffix
    text]``: the prefix attends itself; a segment's tokens attend the prefix, their own segment and the
    ``window`` segments before it; the suffix (the question and the answer header) attends everything.
    Blocks are ``block`` x ``block`` tokens; a block is on when any of its query tokens may attend any of
    its keys (so the pattern is a superset of the token-level rule, never a subset)."""
    n = cu_seqlens.numel() - 1
    cu = cu_seqlens.long().cpu()
    visual_end = prefix_len + int(cu[-1])
    # group of every token: 0 = prefix, 1 + i = segment i, n + 1 = suffix
    group = torch.full((total_len,), n + 1, dtype=torch.long)
    group[:prefix_len] = 0
    seg_of = torch.repeat_interleave(torch.arange(n), cu.diff())
    group[prefix_len:visual_end] = 1 + seg_of
    g = torch.arange(n + 2)
    gq, gk = g[:, None], g[None, :]
    allowed = (gk == 0) | (gq == n + 1) | ((gq >= 1) & (gk >= 1) & (gq - gk >= 0) & (gq - gk <= window))
    nb = -(-total_len // block)
    member = torch.zeros(nb, n + 2)
    member[torch.arange(total_len) // block, group] = 1
    blocks = (member @ allowed.float() @ member.T) > 0
    blocks &= torch.ones(nb, nb, dtype=torch.bool).tril()  # causal at block level
    return efficient_ops.BlockSparseMask.from_dense(blocks[None, None].to(device), block, block, total_len,
                                                    total_len, causal=True)
