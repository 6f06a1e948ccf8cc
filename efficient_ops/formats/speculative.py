"""Draft-token trees (``speculative`` family): validation, ancestor masks, depths, positions, paths, children.
The verification step's ops (tree attention, attention-state merging, greedy / lossless / typical acceptance,
KV compaction) are in :mod:`efficient_ops.ops.speculative`.

A tree of ``T`` nodes is given in topological order by ``parents`` (int64 ``[B, T]``, or ``[T]`` shared by
the batch): ``parents[:, 0] = -1`` (node 0 is the root, the last accepted token) and every other node's
parent has a smaller index than the node. ``tokens`` ``[B, T]`` holds each node's token. All functions
here are batched tensor code without a Python loop over nodes or batch rows (the loops run over tree
depth at most), so they work on any device.

One verification step: the target runs over the tree tokens (positions :func:`tree_positions`), attending
with ``tree_attention``; ``verify_greedy`` or ``verify_sampling`` picks the accepted path; ``compact_kv``
moves its keys and values next to the prefix in every layer at once.
"""

from __future__ import annotations

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
    if prefix_lens.dtype.is_floating_point or prefix_lens.dtype.is_complex or prefix_lens.dtype == torch.bool:
        raise TypeError(f"prefix_lens: expected an integer tensor, got {prefix_lens.dtype}")
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


def tree_children(parents: torch.Tensor) -> torch.Tensor:
    """Each node's children in node order, int64 ``[B, T, C]`` padded with -1 (``C``: the largest child count
    over the batch, at least 1)."""
    parents = validate_parents(parents)
    b, t = parents.shape
    index = torch.arange(t, device=parents.device)
    rank = ((parents[:, :, None] == parents[:, None, :]) & (index[None, :] < index[:, None])).sum(-1)
    count = torch.zeros(b, t, dtype=torch.long, device=parents.device)
    count.scatter_add_(1, parents[:, 1:], torch.ones_like(parents[:, 1:]))
    table = torch.full((b, t, max(1, int(count.max()))), -1, dtype=torch.long, device=parents.device)
    rows = torch.arange(b, device=parents.device)[:, None].expand(b, t - 1)
    table[rows, parents[:, 1:], rank[:, 1:]] = index[1:].expand(b, t - 1)
    return table
