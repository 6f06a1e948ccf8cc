"""Reference tree attention, attention-state merging, verification and KV compaction: the specification of
the ops in :mod:`efficient_ops.ops.speculative`, written for clarity (loops over batch rows and tree
walks), computed in float32 (float64 for float64 inputs). Inputs are validated by the ops.

The verification ops also have batched tensor versions here (``*_batched``: loops over tree depth only,
any device): what the ``reference`` backend of those ops runs. Tests compare them with the tree walks."""

from typing import List, Tuple

import torch

from ..formats.speculative import tree_children, tree_depths, tree_mask


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def tree_attention(q, k_cache, v_cache, prefix_lens, parents, scale: float) -> torch.Tensor:
    """Each tree node attends to the whole prefix and to its ancestors and itself, one batch row at a time,
    with the mask written out explicitly."""
    b_size, hq, t, d = q.shape
    g = hq // k_cache.shape[1]
    compute = _compute_dtype(q)
    mask = tree_mask(parents).expand(b_size, t, t)
    out = torch.empty_like(q)
    for b in range(b_size):
        p = int(prefix_lens[b])
        keys = k_cache[b, :, : p + t].to(compute).repeat_interleave(g, dim=0)  # [Hq, p + T, D]
        values = v_cache[b, :, : p + t].to(compute).repeat_interleave(g, dim=0)
        allowed = torch.cat([torch.ones(t, p, dtype=torch.bool, device=q.device), mask[b]], dim=1)
        scores = (q[b].to(compute) @ keys.transpose(1, 2)) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[b] = (torch.softmax(scores, dim=-1) @ values).to(q.dtype)
    return out


def merge_attention_states(o_a, lse_a, o_b, lse_b) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from the attention over each (log-sum-exp weights).
    A side with lse = -inf contributes nothing; both -inf gives o = 0, lse = -inf."""
    compute = _compute_dtype(o_a)
    lse = torch.logaddexp(lse_a.to(compute), lse_b.to(compute))
    finite = torch.isfinite(lse)
    w_a = torch.where(finite, torch.exp(lse_a.to(compute) - lse), 0.0)
    w_b = torch.where(finite, torch.exp(lse_b.to(compute) - lse), 0.0)
    # a side with no keys (weight 0) may carry any output, NaN included: it is skipped, not multiplied by 0
    o = torch.where(w_a[..., None] > 0, w_a[..., None] * o_a.to(compute), 0.0) + \
        torch.where(w_b[..., None] > 0, w_b[..., None] * o_b.to(compute), 0.0)
    return o.to(o_a.dtype), lse.float()


def _children(parents_row: List[int]) -> List[List[int]]:
    kids: List[List[int]] = [[] for _ in parents_row]
    for i, p in enumerate(parents_row[1:], start=1):
        kids[p].append(i)
    return kids


def _outputs(paths: List[List[int]], next_tokens: List[int], max_depth: int, device):
    accepted = torch.full((len(paths), max_depth + 1), -1, dtype=torch.long)
    for b, path in enumerate(paths):
        accepted[b, : len(path)] = torch.tensor(path)
    accept_len = torch.tensor([len(p) - 1 for p in paths], dtype=torch.long)
    return accept_len.to(device), accepted.to(device), torch.tensor(next_tokens, dtype=torch.long, device=device)


def _max_depth(parents: torch.Tensor) -> int:
    return int(tree_depths(parents).max())


def verify_greedy(tokens, parents, target_logits):
    """Walk from the root; at each node take its first child whose token is the argmax of the node's row."""
    b_size = tokens.shape[0]
    parents = parents.expand(b_size, -1)
    paths, next_tokens = [], []
    for b in range(b_size):
        kids = _children(parents[b].tolist())
        node, path = 0, [0]
        while True:
            best = int(target_logits[b, node].argmax())
            child = next((c for c in kids[node] if int(tokens[b, c]) == best), None)
            if child is None:
                next_tokens.append(best)
                break
            node = child
            path.append(node)
        paths.append(path)
    return _outputs(paths, next_tokens, _max_depth(parents), tokens.device)


def sample_from(p: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw from the (unnormalised, non-negative) weights ``p`` with a uniform ``u`` in [0, 1):
    the first index whose cumulative weight exceeds ``u * sum(p)``; never a zero-weight index."""
    cdf = torch.cumsum(p, 0)
    index = int(torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_max(p.numel() - 1))
    if p[index] <= 0:  # u * sum rounded up to the total: take the last index with weight
        index = int(torch.nonzero(p > 0).max())
    return index


def _normalized(p: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    total = p.sum()
    return p / total if total > 0 else fallback


def verify_sampling(tokens, parents, target_probs, draft_probs, mode: str, u_accept, u_final):
    """The multi-step rejection rules, one batch row and one child at a time. Node ``c``'s acceptance test
    uses ``u_accept[b, c]`` (accept when ``u < ratio``); the final draw from the residual uses ``u_final[b]``.
    """
    b_size = tokens.shape[0]
    parents = parents.expand(b_size, -1)
    paths, next_tokens = [], []
    for b in range(b_size):
        kids = _children(parents[b].tolist())
        node, path = 0, [0]
        p = target_probs[b, 0].double()
        q = draft_probs[b, 0].double()
        while True:
            moved = False
            for c in kids[node]:
                x = int(tokens[b, c])
                u = float(u_accept[b, c])
                if mode == "deterministic":
                    accept = u * p.sum() < p[x]
                else:
                    accept = u * q[x] < p[x]
                if accept:
                    node, moved = c, True
                    path.append(c)
                    p = target_probs[b, c].double()
                    q = draft_probs[b, c].double()
                    break
                if mode == "deterministic":
                    p = p.clone()
                    p[x] = 0
                    p = _normalized(p, p)
                else:
                    p = _normalized((p - q).clamp_min(0), p)
                    if mode == "without_replacement":
                        q = q.clone()
                        q[x] = 0
                        q = _normalized(q, q)
            if not moved:
                next_tokens.append(sample_from(p, float(u_final[b])))
                break
        paths.append(path)
    return _outputs(paths, next_tokens, _max_depth(parents), tokens.device)


def verify_typical(tokens, parents, target_probs, posterior_threshold: float, posterior_alpha: float):
    """Medusa's typical acceptance: node ``c`` with parent ``n`` passes when
    ``p_n(token_c) > min(threshold, alpha * exp(-entropy(p_n)))``; the longest path of passing nodes from the
    root wins (the first in node order on ties), and the next token is the argmax at its last node."""
    b_size = tokens.shape[0]
    parents = parents.expand(b_size, -1)
    paths, next_tokens = [], []
    for b in range(b_size):
        row = parents[b].tolist()
        p = target_probs[b].double()
        entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
        cutoff = torch.minimum(torch.full_like(entropy, posterior_threshold), posterior_alpha * torch.exp(-entropy))
        best: List[int] = [0]
        for leaf in range(len(row)):
            path, node = [], leaf
            while node != -1:
                path.append(node)
                node = row[node]
            path.reverse()
            ok = all(float(p[row[c], int(tokens[b, c])]) > float(cutoff[row[c]]) for c in path[1:])
            if ok and len(path) > len(best):
                best = path
        paths.append(best)
        next_tokens.append(int(p[best[-1]].argmax()))
    return _outputs(paths, next_tokens, _max_depth(parents), tokens.device)


def compact_kv(k_cache, v_cache, prefix_lens, accepted_nodes, accept_len) -> torch.Tensor:
    """Copy the accepted path's rows to ``prefix_len + 0, 1, ...`` (reading every source before writing),
    in place, for every layer; returns the new prefix lengths ``prefix_len + accept_len + 1``."""
    layered = k_cache.dim() == 5
    ks = k_cache if layered else k_cache[None]
    vs = v_cache if layered else v_cache[None]
    for b in range(ks.shape[1]):
        n = int(accept_len[b]) + 1
        start = int(prefix_lens[b])
        src = start + accepted_nodes[b, :n].to(ks.device)
        for cache in (ks, vs):
            cache[:, b, :, start : start + n] = cache[:, b, :, src].clone()
    return prefix_lens + accept_len.to(prefix_lens.dtype) + 1


# ---------------------------------------------------------------------------------------------------- batched
# The verification ops' batched tensor code; ``parents`` is int64 [B, T] (validated and expanded by the op).

def _path_to(node, mask, depth, max_depth):
    """accepted_nodes [B, max_depth + 1]: the root-to-``node`` path (ancestors sorted by depth), -1 padded."""
    b, t = depth.shape
    ancestors = mask[torch.arange(b, device=node.device), node]  # [B, T]
    slots = torch.full((b, max_depth + 2), -1, dtype=torch.long, device=node.device)
    nodes = torch.arange(t, device=node.device).expand(b, t)
    slots.scatter_(1, torch.where(ancestors, depth, max_depth + 1), nodes)  # non-ancestors land in the extra column
    return slots[:, : max_depth + 1]


def _deepest(ok, depth):
    """Per row, the deepest node where ``ok`` holds (the first in node order on ties); the root always is."""
    t = ok.shape[1]
    score = torch.where(ok, depth * t + (t - 1 - torch.arange(t, device=ok.device)), -1)
    return score.argmax(1)


def _accept_along_paths(passes, parents, first_only):
    """The accepted node per row: the deepest whose every non-root ancestor-or-self passes. With
    ``first_only`` a node also needs no earlier passing sibling (a walk that takes the first match)."""
    t = parents.shape[1]
    if first_only:
        index = torch.arange(t, device=parents.device)
        earlier_sibling = (parents[:, :, None] == parents[:, None, :]) & (index[None, :] < index[:, None])
        passes = passes & ~(earlier_sibling & passes[:, None, :]).any(-1)
    mask = tree_mask(parents)
    passes = passes.clone()
    passes[:, 0] = True
    ok = ~(mask & ~passes[:, None, :]).any(-1)
    depth = tree_depths(parents)
    node = _deepest(ok, depth)
    return node, _path_to(node, mask, depth, int(depth.max())), depth


def verify_greedy_batched(tokens, parents, target_logits):
    """:func:`verify_greedy` for every batch row and node at once."""
    b = tokens.shape[0]
    best = target_logits.argmax(-1)  # [B, T]: the target's token after each node
    passes = tokens == best.gather(1, parents.clamp_min(0))
    node, accepted, depth = _accept_along_paths(passes, parents, first_only=True)
    rows = torch.arange(b, device=tokens.device)
    return depth[rows, node], accepted, best[rows, node]


def verify_typical_batched(tokens, parents, target_probs, posterior_threshold: float, posterior_alpha: float):
    """:func:`verify_typical` for every batch row and node at once."""
    b = tokens.shape[0]
    p = target_probs.double()
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # [B, T]
    cutoff = torch.clamp_max(posterior_alpha * torch.exp(-entropy), posterior_threshold)
    up = parents.clamp_min(0)
    rows = torch.arange(b, device=tokens.device)[:, None]
    passes = p[rows, up, tokens] > cutoff.gather(1, up)  # node c's token under its parent's distribution
    node, accepted, depth = _accept_along_paths(passes, parents, first_only=False)
    rows = rows[:, 0]
    return depth[rows, node], accepted, p[rows, node].argmax(-1)


def _normalized_rows(p, fallback):
    total = p.sum(-1, keepdim=True)
    return torch.where(total > 0, p / torch.where(total > 0, total, 1.0), fallback)


def sample_rows(p, u):
    """:func:`sample_from` per row: ``p`` [B, V] non-negative weights, ``u`` [B] uniforms."""
    cdf = torch.cumsum(p, -1)
    index = torch.searchsorted(cdf, (u.to(cdf.dtype) * cdf[:, -1])[:, None], right=True).clamp_max(p.shape[1] - 1)
    last = torch.where(p > 0, torch.arange(p.shape[1], device=p.device), -1).argmax(-1, keepdim=True)
    return torch.where(p.gather(1, index) > 0, index, last)[:, 0]


def verify_sampling_batched(tokens, parents, target_probs, draft_probs, mode: str, u_accept, u_final):
    """:func:`verify_sampling` for every batch row at once: one tree level per step, the current node's
    children tried in order (``u_accept`` [B, T]: node c's test; ``u_final`` [B]: the residual draw)."""
    b = tokens.shape[0]
    rows = torch.arange(b, device=tokens.device)
    children = tree_children(parents)
    depth = tree_depths(parents)
    max_depth = int(depth.max())
    p = target_probs[:, 0].double()
    q = draft_probs[:, 0].double()
    node = torch.zeros(b, dtype=torch.long, device=tokens.device)
    done = torch.zeros(b, dtype=torch.bool, device=tokens.device)
    for _ in range(max_depth):  # one tree level per step, every batch row at once
        moved = torch.zeros_like(done)
        for k in range(children.shape[2]):  # the current node's k-th child, tried in order
            child = children[rows, node, k]
            active = ~done & ~moved & (child >= 0)
            c = child.clamp_min(0)
            x = tokens[rows, c][:, None]
            px, qx, u = p.gather(1, x)[:, 0], q.gather(1, x)[:, 0], u_accept[rows, c].double()
            accept = active & (u * (p.sum(-1) if mode == "deterministic" else qx) < px)
            reject = (active & ~accept)[:, None]
            if mode == "deterministic":
                p = torch.where(reject, _normalized_rows(p.scatter(1, x, 0.0), p), p)
            else:
                p_residual = _normalized_rows((p - q).clamp_min(0), p)
                if mode == "without_replacement":
                    q = torch.where(reject, _normalized_rows(q.scatter(1, x, 0.0), q), q)
                p = torch.where(reject, p_residual, p)
            node = torch.where(accept, c, node)
            p = torch.where(accept[:, None], target_probs[rows, c].double(), p)
            q = torch.where(accept[:, None], draft_probs[rows, c].double(), q)
            moved |= accept
        done |= ~moved
    return depth[rows, node], _path_to(node, tree_mask(parents), depth, max_depth), sample_rows(p, u_final)
