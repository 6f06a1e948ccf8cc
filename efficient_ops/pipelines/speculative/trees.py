"""Tree policies for the drafters: which draft nodes to propose, as ``parents`` arrays in the package's
convention (:func:`efficient_ops.validate_parents`: node 0 is the root, every parent is an earlier node).

- :func:`chain` and :func:`static_tree` (a Medusa / EAGLE choices list such as ``[[0], [1], [0, 0]]``: each
  choice is the path of child ranks from the root) give a :class:`StaticTree`, the same shape every step;
  :func:`ranked_tree` builds the choices list that maximises the expected accepted length under per-rank
  acceptance rates (Medusa's / Sequoia's construction), ordered so that its first ``n`` nodes are the best
  ``n``-node subtree.
- :class:`DynamicTree` grows a tree per row and step (EAGLE-2): expand the top-k frontier nodes by cumulative
  path probability, then rerank every candidate to the node budget.
- :func:`stop_deepening` is the adaptive stop (SpecDec++): stop drafting deeper once the predicted
  probability that some drafted token is rejected, from the draft's own confidence, exceeds a threshold.

All step-time code is batched tensor code; the only Python loops run over tree depth.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch


@dataclass(frozen=True)
class StaticTree:
    """A fixed tree shape. ``parents`` int64 ``[T]``; ``ranks[i]``: node i is its parent's ``ranks[i]``-th
    candidate child (0 = the most likely; the root has rank 0); ``depths[i]``: its depth (root 0)."""

    parents: torch.Tensor
    ranks: torch.Tensor
    depths: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return self.parents.shape[0]

    @property
    def max_depth(self) -> int:
        return int(self.depths.max())

    @property
    def max_rank(self) -> int:
        return int(self.ranks.max())

    def truncate(self, num_nodes: int) -> "StaticTree":
        """The first ``num_nodes`` nodes (a valid tree: parents come before their children)."""
        if not isinstance(num_nodes, int) or num_nodes < 1:
            raise ValueError(f"num_nodes: expected an integer >= 1, got {num_nodes!r}")
        n = min(num_nodes, self.num_nodes)
        return StaticTree(self.parents[:n], self.ranks[:n], self.depths[:n])

    def up_to_depth(self, depth: int) -> "StaticTree":
        """The nodes at depth <= ``depth``, parents renumbered."""
        keep = self.depths <= depth
        new_index = torch.cumsum(keep.long(), 0) - 1
        parents = torch.where(self.parents >= 0, new_index[self.parents.clamp_min(0)], -1)[keep]
        return StaticTree(parents, self.ranks[keep], self.depths[keep])


def static_tree(choices: Sequence[Sequence[int]]) -> StaticTree:
    """A :class:`StaticTree` from a Medusa / EAGLE choices list.

    Each choice is a path of child ranks from the root: ``[0]`` is the root's most likely child, ``[1]`` its
    second, ``[0, 2]`` the third child of ``[0]``. Nodes keep the list's order (node ``i + 1`` is ``choices[i]``),
    so every choice's parent path must appear earlier in the list (the root's children need nothing).
    """
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence):
        raise TypeError(f"choices: expected a list of lists of child ranks, got {type(choices).__name__}")
    index = {(): 0}
    parents, ranks, depths = [-1], [0], [0]
    for i, choice in enumerate(choices):
        path = tuple(choice) if isinstance(choice, Sequence) else None
        if not path or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in path):
            raise ValueError(f"choices: entry {i} ({choice!r}) must be a non-empty list of ranks >= 0")
        if path in index:
            raise ValueError(f"choices: entry {i} ({list(path)}) appears twice")
        if path[:-1] not in index:
            raise ValueError(f"choices: entry {i} ({list(path)}) comes before its parent {list(path[:-1])}; "
                             "list every choice after its parent path (e.g. sorted by length)")
        index[path] = len(parents)
        parents.append(index[path[:-1]])
        ranks.append(path[-1])
        depths.append(len(path))
    return StaticTree(torch.tensor(parents), torch.tensor(ranks), torch.tensor(depths))


def chain(num_nodes: int) -> StaticTree:
    """A chain of ``num_nodes`` nodes, root included (``num_nodes - 1`` draft tokens)."""
    if not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"num_nodes: expected an integer >= 1 (root included), got {num_nodes!r}")
    return static_tree([[0] * d for d in range(1, num_nodes)])


def ranked_tree(rank_probs: Sequence[float], num_nodes: int, max_depth: Optional[int] = None) -> StaticTree:
    """The static tree of ``num_nodes`` nodes maximising the expected number of accepted tokens when the
    target accepts a node's rank-r child with probability ``rank_probs[r]`` independently per depth: its nodes
    are the ``num_nodes - 1`` paths with the largest products of rank probabilities (Medusa's construction),
    listed in decreasing order of that product, so that any prefix of the tree is the best smaller tree."""
    probs = [float(p) for p in rank_probs]
    if not probs or not all(0.0 < p <= 1.0 for p in probs):
        raise ValueError(f"rank_probs: expected a non-empty list of probabilities in (0, 1], got {rank_probs!r}")
    if not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"num_nodes: expected an integer >= 1 (root included), got {num_nodes!r}")
    if max_depth is not None and (not isinstance(max_depth, int) or max_depth < 1):
        raise ValueError(f"max_depth: expected an integer >= 1 or None, got {max_depth!r}")
    # best-first search: a child's product never exceeds its parent's, so parents pop first
    heap: List[Tuple[float, int, Tuple[int, ...]]] = [(-probs[0], 0, (0,))]
    order, counter = [], 1
    while heap and len(order) < num_nodes - 1:
        neg, _, path = heapq.heappop(heap)
        order.append(list(path))
        pushes = []
        if path[-1] + 1 < len(probs):  # next sibling
            pushes.append((neg / probs[path[-1]] * probs[path[-1] + 1], path[:-1] + (path[-1] + 1,)))
        if max_depth is None or len(path) < max_depth:  # first child
            pushes.append((neg * probs[0], path + (0,)))
        for value, child in pushes:
            heapq.heappush(heap, (value, counter, child))
            counter += 1
    return static_tree(order)


def stop_deepening(path_logprobs: torch.Tensor, threshold: Optional[float]) -> bool:
    """SpecDec++'s adaptive stop, train-free: the draft's confidence stands in for the acceptance
    probability, so ``1 - exp(best path log-probability)`` is the predicted probability that some token on
    the row's best path is rejected. True when it exceeds ``threshold`` for every row (batch-wide: every row
    has the same number of nodes). ``path_logprobs``: ``[B, K]`` over the deepest drafted nodes."""
    if threshold is None:
        return False
    best = path_logprobs.float().amax(-1)
    return bool((1.0 - best.exp() > threshold).all())


def check_threshold(threshold: Optional[float], name: str = "stop_threshold") -> None:
    """ValueError naming the argument unless ``threshold`` is None or in (0, 1)."""
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 < threshold < 1.0):
        raise ValueError(f"{name}: expected None (off) or a probability in (0, 1), got {threshold!r}")


def select_top_nodes(scores: torch.Tensor, parents: torch.Tensor, num_nodes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rerank a pool of candidate nodes to a tree of ``num_nodes`` nodes, root included (EAGLE-2).

    Args:
        scores: ``[B, N]`` cumulative path log-probabilities of the pool's nodes (the root is not in the pool).
        parents: int64 ``[B, N]``, each pool node's parent as a pool index, -1 for the root's children; the
            pool is in topological order (parents before children) and a child never scores above its parent.
        num_nodes: the budget, root included.

    Returns:
        ``(index, tree_parents)``: the chosen pool nodes ``[B, T - 1]`` in pool order and the tree's parents
        ``[B, T]`` (node 0 the root, node ``j + 1`` pool node ``index[:, j]``), T = ``min(num_nodes, N + 1)``.
        The highest-scoring nodes are chosen, ties going to the earlier pool node; that keeps every chosen
        node's parent (which scores at least as high and comes earlier).
    """
    b, n = scores.shape
    k = min(num_nodes - 1, n)
    # stable sort: among equal scores the earlier pool node (an ancestor before its descendants) ranks first
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    index = order.sort(dim=1).values
    position = torch.full((b, n), -1, dtype=torch.long, device=scores.device)
    position.scatter_(1, index, torch.arange(1, k + 1, device=scores.device).expand(b, k))
    pool_parent = parents.gather(1, index)
    tree_parents = torch.where(pool_parent >= 0, position.gather(1, pool_parent.clamp_min(0)), 0)
    root = torch.full((b, 1), -1, dtype=torch.long, device=scores.device)
    return index, torch.cat([root, tree_parents], 1)


class DynamicTree:
    """EAGLE-2's dynamic draft tree: from the root, keep a frontier of the ``topk`` nodes with the highest
    cumulative path probability; each depth expands every frontier node's ``topk`` most likely children
    (``topk * topk`` candidates, all kept in the pool), the best ``topk`` of them become the next frontier;
    after ``depth`` levels the pool is reranked to ``num_nodes`` (root included).

    Deepening stops early when no frontier node can still enter the final tree (their children score no
    higher than they do), and, with ``stop_threshold``, by :func:`stop_deepening` (SpecDec++).
    """

    def __init__(self, topk: int = 8, depth: int = 6, stop_threshold: Optional[float] = None):
        if not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk: expected an integer >= 1, got {topk!r}")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth: expected an integer >= 1, got {depth!r}")
        check_threshold(stop_threshold)
        self.topk, self.depth, self.stop_threshold = topk, depth, stop_threshold

    def __repr__(self) -> str:
        return f"DynamicTree(topk={self.topk}, depth={self.depth}, stop_threshold={self.stop_threshold})"

    def grow(self, root_logprobs: torch.Tensor, expand: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
             num_nodes: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Grow one tree per row.

        Args:
            root_logprobs: ``[B, V]``, the draft's log-probabilities for the root's children.
            expand: ``expand(tokens, attend, depth) -> logprobs``: the draft's log-probabilities ``[B, K, V]``
                for the children of the frontier nodes ``tokens`` ``[B, K]`` at ``depth``; ``attend``
                ``[B, K, F]`` bool says which of the F frontier nodes expanded so far, these K last, each
                frontier node descends from (itself included), in the order they were passed to ``expand``.
            num_nodes: the budget, root included.

        Returns:
            ``(tokens, parents)``: ``[B, T]`` (node 0 is left for the root token: it holds -1) and ``[B, T]``.
        """
        b, vocab = root_logprobs.shape
        k = min(self.topk, vocab)
        device = root_logprobs.device
        if num_nodes <= 1:
            return (torch.full((b, 1), -1, dtype=torch.long, device=device),
                    torch.full((b, 1), -1, dtype=torch.long, device=device))
        score, token = root_logprobs.float().topk(k, dim=-1)  # depth 1: the root's children
        pool_score, pool_token = [score], [token]
        pool_parent = [torch.full((b, k), -1, dtype=torch.long, device=device)]
        frontier = torch.arange(k, device=device).expand(b, k)  # pool indices
        frontier_score, frontier_token = score, token
        # ancestry over the expanded frontier nodes, in expansion order
        fed_anc = torch.zeros(b, 0, 0, dtype=torch.bool, device=device)
        fed_pool = torch.zeros(b, 0, dtype=torch.long, device=device)
        size = k
        for d in range(2, self.depth + 1):
            if num_nodes - 1 <= size:  # no frontier node's child can beat the budget's worst chosen node
                worst = torch.cat(pool_score, 1).topk(num_nodes - 1, dim=1).values[:, -1]
                if bool((frontier_score.amax(1) <= worst).all()):
                    break
            if stop_deepening(frontier_score, self.stop_threshold):
                break
            # which expanded node each frontier node hangs from: its parent is the previous frontier's
            f = fed_pool.shape[1]
            parent_pool = torch.cat(pool_parent, 1).gather(1, frontier)
            parent_slot = (fed_pool[:, None, :] == parent_pool[:, :, None])  # [B, K, F]
            anc_prev = (parent_slot[..., None] & fed_anc[:, None]).any(2) if f else parent_slot  # [B, K, F]
            attend = torch.cat([anc_prev, torch.eye(k, dtype=torch.bool, device=device).expand(b, k, k)], 2)
            fed_anc = torch.cat([torch.nn.functional.pad(fed_anc, (0, k)), attend], 1)
            fed_pool = torch.cat([fed_pool, frontier], 1)
            logprobs = expand(frontier_token, attend, d - 1).float()  # [B, K, V]
            child_score, child_token = logprobs.topk(k, dim=-1)
            cand_score = (frontier_score[:, :, None] + child_score).reshape(b, k * k)
            cand_parent = frontier[:, :, None].expand(b, k, k).reshape(b, k * k)
            pool_score.append(cand_score)
            pool_token.append(child_token.reshape(b, k * k))
            pool_parent.append(cand_parent)
            frontier_score, best = cand_score.topk(k, dim=1)
            frontier = size + best
            frontier_token = pool_token[-1].gather(1, best)
            size += k * k
        scores, tokens, parents = (torch.cat(x, 1) for x in (pool_score, pool_token, pool_parent))
        index, tree_parents = select_top_nodes(scores, parents, num_nodes)
        root = torch.full((b, 1), -1, dtype=torch.long, device=device)
        return torch.cat([root, tokens.gather(1, index)], 1), tree_parents


def depth_nodes(tree: StaticTree) -> List[torch.Tensor]:
    """Node indices per depth 1..max_depth (each a 1-D tensor, in node order)."""
    return [torch.nonzero(tree.depths == d)[:, 0] for d in range(1, tree.max_depth + 1)]


__all__ = ["StaticTree", "static_tree", "chain", "ranked_tree", "DynamicTree", "select_top_nodes",
           "stop_deepening", "check_threshold", "depth_nodes"]
