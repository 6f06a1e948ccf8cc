"""Speculative-decoding verification: draft-token trees (validation, attention masks, positions, paths) and
the verification step's ops (tree attention, attention-state merging, greedy / lossless / typical
acceptance, KV compaction; thin wrappers over ``torch.ops.efficient_ops.*``).

A tree of ``T`` nodes is given in topological order by ``parents`` (int64 ``[B, T]``, or ``[T]`` shared by
the batch): ``parents[:, 0] = -1`` (node 0 is the root, the last accepted token) and every other node's
parent has a smaller index than the node. ``tokens`` ``[B, T]`` holds each node's token. All functions
here are batched tensor code without a Python loop over nodes or batch rows (the loops run over tree
depth at most), so they work on any device.

One verification step: the target runs over the tree tokens (positions :func:`tree_positions`), attending
with :func:`tree_attention`; :func:`verify_greedy` or :func:`verify_sampling` picks the accepted path;
:func:`compact_kv` moves its keys and values next to the prefix in every layer at once.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def validate_parents(parents: torch.Tensor, name: str = "parents") -> torch.Tensor:
    """Check a parent array and return it as int64 ``[B, T]`` (a ``[T]`` array becomes ``[1, T]``).

    Raises TypeError for a non-integer dtype and ValueError for a wrong shape, a root that is not -1, or a
    node whose parent is not an earlier node (which also rules out cycles).
    """
    if not isinstance(parents, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(parents).__name__}")
    if parents.dtype.is_floating_point or parents.dtype.is_complex or parents.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got {parents.dtype}")
    if parents.dim() == 1:
        parents = parents[None]
    if parents.dim() != 2 or parents.shape[1] == 0:
        raise ValueError(f"{name}: expected shape [T] or [B, T] with T >= 1, got {tuple(parents.shape)}")
    parents = parents.long()
    if (parents[:, 0] != -1).any():
        raise ValueError(f"{name}: node 0 is the root and must have parent -1")
    index = torch.arange(parents.shape[1], device=parents.device)
    bad = (parents[:, 1:] < 0) | (parents[:, 1:] >= index[1:])
    if bad.any():
        b, i = (bad.nonzero()[0] + torch.tensor([0, 1], device=parents.device)).tolist()
        raise ValueError(f"{name}: not in topological order: node {i} of batch row {b} has parent "
                         f"{int(parents[b, i])}; every node but the root needs a parent in 0..{i - 1}")
    return parents


def tree_depths(parents: torch.Tensor) -> torch.Tensor:
    """Depth of every node (root 0), int64 ``[B, T]``."""
    parents = validate_parents(parents)
    depth = torch.zeros_like(parents)
    ancestor = parents.clone()
    for _ in range(parents.shape[1] - 1):  # follow parent links one level per step until every root is reached
        alive = ancestor >= 0
        if not alive.any():
            break
        depth += alive.long()
        ancestor = torch.where(alive, parents.gather(1, ancestor.clamp_min(0)), ancestor)
    return depth


def tree_mask(parents: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, T, T]``: ``mask[b, i, j]`` is True when node ``j`` is node ``i`` or one of its ancestors."""
    parents = validate_parents(parents)
    b, t = parents.shape
    mask = torch.eye(t, dtype=torch.bool, device=parents.device).expand(b, t, t).clone()
    ancestor = parents.clone()
    for _ in range(t - 1):
        alive = ancestor >= 0
        if not alive.any():
            break
        mask[alive.nonzero(as_tuple=True) + (ancestor[alive],)] = True
        ancestor = torch.where(alive, parents.gather(1, ancestor.clamp_min(0)), ancestor)
    return mask


def tree_positions(parents: torch.Tensor, prefix_lens: torch.Tensor) -> torch.Tensor:
    """Position ids of the tree tokens, ``prefix_len + depth``, int64 ``[B, T]`` (``prefix_lens`` ``[B]``)."""
    depth = tree_depths(parents)
    if not isinstance(prefix_lens, torch.Tensor) or prefix_lens.dim() != 1:
        raise ValueError("prefix_lens: expected a 1-D tensor [B]")
    if depth.shape[0] == 1 and prefix_lens.shape[0] > 1:
        depth = depth.expand(prefix_lens.shape[0], -1)
    if prefix_lens.shape[0] != depth.shape[0]:
        raise ValueError(f"prefix_lens: expected {depth.shape[0]} entries (the batch), got {prefix_lens.shape[0]}")
    return prefix_lens.long().to(depth.device)[:, None] + depth


def tree_paths(parents: torch.Tensor) -> torch.Tensor:
    """Root-to-leaf node paths, int64 ``[B, L, D + 1]`` padded with -1 (Medusa's ``retrieve_indices``).

    ``L`` is the largest leaf count over the batch and ``D`` the largest depth; leaves are in node order,
    and rows with fewer leaves are padded with all -1 paths.
    """
    parents = validate_parents(parents)
    b, t = parents.shape
    depth = tree_depths(parents)
    is_parent = torch.zeros(b, t, dtype=torch.bool, device=parents.device)
    is_parent.scatter_(1, parents[:, 1:].clamp_min(0), parents[:, 1:] >= 0)
    leaf = ~is_parent
    n_leaves = leaf.sum(1)
    width, max_depth = int(n_leaves.max()), int(depth.max())
    # leaves of each row, in node order, left-aligned; missing ones are -1
    order = torch.argsort((~leaf).long() * t + torch.arange(t, device=parents.device), dim=1)[:, :width]
    node = torch.where(torch.arange(width, device=parents.device) < n_leaves[:, None], order, -1)
    paths = torch.full((b, width, max_depth + 1), -1, dtype=torch.long, device=parents.device)
    # write each leaf's ancestors at their depths, walking up from the leaf
    for _ in range(max_depth + 1):
        alive = node >= 0
        if not alive.any():
            break
        d = depth.gather(1, node.clamp_min(0))
        bi, li = alive.nonzero(as_tuple=True)
        paths[bi, li, d[alive]] = node[alive]
        node = torch.where(alive, parents.gather(1, node.clamp_min(0)), node)
    return paths


# ---------------------------------------------------------------------------------------------------- the ops
# Thin wrappers over ``torch.ops.efficient_ops.*`` (registered in efficient_ops/ops/speculative.py).

def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_lens: torch.Tensor,
                   parents: torch.Tensor, scale: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Attention of a flattened draft tree over the committed prefix and the tree itself.

    Args:
        q: ``[B, Hq, T, D]``, the tree tokens' queries, float16/bfloat16 (any float dtype on the reference
            backend); the kernels take D in 64, 128 and T <= 256.
        k_cache, v_cache: ``[B, Hkv, S_max, D]`` in q's dtype, Hq a multiple of Hkv (GQA). Row b holds the
            committed prefix at positions ``[0, prefix_lens[b])`` and the tree tokens' keys/values at
            ``[prefix_lens[b], prefix_lens[b] + T)``.
        prefix_lens: integer ``[B]``, ragged, 0 allowed, at most ``S_max - T``.
        parents: ``[T]`` or ``[B, T]`` (see the module docstring).
        scale: softmax scale, default ``D ** -0.5``.
        backend: "cuda", "triton" or "reference"; default ``$EFFICIENT_OPS_BACKEND``, else the best available.

    Returns:
        ``[B, Hq, T, D]``: node i's attention over every prefix position and over its ancestors and itself.
        Fixed shapes and no host synchronisation inside CUDA-graph capture (value checks run outside it).
    """
    return torch.ops.efficient_ops.tree_attention(q, k_cache, v_cache, prefix_lens, parents, scale, backend)


def merge_attention_states(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor,
                           lse_b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from the attention over each.

    ``o_a``, ``o_b``: ``[..., D]`` (same shape and dtype); ``lse_a``, ``lse_b``: float32 ``[...]``, the natural-log
    log-sum-exp of each side's scaled scores. Returns ``(o, lse)``, o in o_a's dtype (math in float32). A side
    with lse = -inf (no keys) contributes nothing; both -inf give o = 0 and lse = -inf.
    """
    return torch.ops.efficient_ops.merge_attention_states(o_a, lse_a, o_b, lse_b)


def verify_greedy(tokens: torch.Tensor, parents: torch.Tensor,
                  target_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy verification of a draft tree against the target's argmax.

    Args:
        tokens: int ``[B, T]``, each node's token (the root's is the last accepted token and is not checked).
        parents: ``[T]`` or ``[B, T]``.
        target_logits: ``[B, T, V]``; row i is the target's prediction for the child of node i.

    Returns:
        ``accept_len`` [B] (accepted draft nodes, root excluded), ``accepted_nodes`` [B, max_depth + 1] (the
        accepted path's node indices from the root 0, padded with -1; max_depth is the tree's over the batch)
        and ``next_token`` [B] (the argmax at the last accepted node). From the root, the walk takes the
        first child (in node order) whose token is the argmax, until none is.
    """
    return torch.ops.efficient_ops.verify_greedy(tokens, parents, target_logits)


def verify_sampling(tokens: torch.Tensor, parents: torch.Tensor, target_probs: torch.Tensor,
                    draft_probs: torch.Tensor, mode: str = "iid", generator: Optional[torch.Generator] = None,
                    backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lossless stochastic verification: the emitted tokens (accepted drafts, then ``next_token``) are
    distributed exactly as sampling from the target one token at a time.

    Args:
        tokens, parents: the draft tree (as :func:`verify_greedy`).
        target_probs: ``[B, T, V]``, the target's distribution after each node. Apply temperature, top-k and
            top-p to it *before* calling: the guarantee is with respect to the distribution given here.
        draft_probs: ``[B, T, V]``, the distribution q_i node i's children were drawn from.
        mode: how the children were drawn, which fixes the rule:
            ``"iid"``: independently from q_i (SpecInfer): try children in order, accept child x with
            probability min(1, p(x)/q(x)); on rejection p <- norm(max(0, p - q)), q unchanged.
            ``"without_replacement"`` (Sequoia / RSD): as iid, but the rejected x is also removed from q and
            q renormalised.
            ``"deterministic"``: the children are q's top-k (EAGLE-2 style): accept x with probability
            p(x) / sum(p); on rejection p(x) <- 0, renormalised. This rule never reads q, so it is lossless
            whatever the children are.
            When no child is accepted, ``next_token`` is drawn from the current residual p.
        generator: for the uniforms (one per node tested, one for the final draw), drawn on the tokens' device.
        backend: "triton" (each row's walk in one program on the device) or "reference" (batched PyTorch);
            default the best available.

    Returns:
        ``(accept_len, accepted_nodes, next_token)`` as :func:`verify_greedy`.
    """
    return torch.ops.efficient_ops.verify_sampling(tokens, parents, target_probs, draft_probs, mode, generator,
                                                   backend)


def verify_typical(tokens: torch.Tensor, parents: torch.Tensor, target_probs: torch.Tensor,
                   posterior_threshold: float = 0.09,
                   posterior_alpha: float = 0.3) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Medusa's typical acceptance (lossy): node c passes when its token's probability under its parent's
    target distribution exceeds ``min(posterior_threshold, posterior_alpha * exp(-entropy))``. The deepest node
    whose whole path passes is accepted (the first in node order on ties) and ``next_token`` is the argmax
    there. Same outputs as :func:`verify_greedy`; ``target_probs`` [B, T, V] after temperature.
    """
    return torch.ops.efficient_ops.verify_typical(tokens, parents, target_probs, posterior_threshold, posterior_alpha)


def compact_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_lens: torch.Tensor,
               accepted_nodes: torch.Tensor, accept_len: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """Move the accepted path's keys and values (root included) from their tree slots
    ``prefix_len + node`` to the contiguous slots ``prefix_len + 0, 1, ..., accept_len``, in place.

    Args:
        k_cache, v_cache: ``[B, Hkv, S_max, D]`` or every layer stacked, ``[L, B, Hkv, S_max, D]`` (one launch).
        prefix_lens: integer ``[B]``, the committed lengths before the tree.
        accepted_nodes, accept_len: as returned by the verify functions.
        backend: "cuda", "triton" or "reference".

    Returns:
        The new prefix lengths ``prefix_lens + accept_len + 1``. Overlapping moves (path [0, 2, 5] reads slot 2
        while slot 2 is written) are race-free. Fixed shapes, capturable in a CUDA graph.
    """
    return torch.ops.efficient_ops.compact_kv(k_cache, v_cache, prefix_lens, accepted_nodes, accept_len, backend)
