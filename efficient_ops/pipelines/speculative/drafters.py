"""Drafters (the :class:`~.protocol.Drafter` protocol): who proposes the draft tree each step.

- :class:`PromptLookupDrafter`: n-gram lookup in the prompt and the output so far (train-free; the peers are
  Hugging Face's prompt lookup decoding and vLLM's ngram proposer). Several matches form a trie.
- :class:`TokenRecyclingDrafter`: Token Recycling (Luo et al., 2024): an adjacency table ``[V, k]`` of the
  target's top-k next tokens after each token, refreshed from every verification forward, drafting a static
  tree by walking the table from the root.
- :class:`DraftModelDrafter`: a smaller causal LM with the target's vocabulary, with its own KV cache,
  drafting a chain, a static tree or an EAGLE-2 dynamic tree; sampled drafts carry their distributions.
- :func:`self_drafter`: the target itself, copied and converted to a low-bit format (``quantize_model``) or
  R-Sparse (``rsparsify_model``), as a :class:`DraftModelDrafter`: no second checkpoint needed.

Every drafter returns the same number of nodes for every row of a batch; a row with less to propose is
filled with children of the root carrying the root's token (valid, deterministic proposals that verification
simply tests).
"""

from __future__ import annotations

import copy
from typing import Iterable, Optional, Sequence, Union

import torch

from efficient_ops import tree_mask
from efficient_ops.nn import quantize_model, rsparsify_model

from .protocol import DraftTree, Sampling, warp
from .trees import (
    DynamicTree,
    StaticTree,
    chain,
    check_threshold,
    depth_nodes,
    ranked_tree,
    static_tree,
    stop_deepening,
)

# prior acceptance rate of the target's rank-r candidate, for the default static trees (ranked_tree)
DEFAULT_RANK_PROBS = (0.55, 0.15, 0.07, 0.04, 0.03, 0.02, 0.015, 0.01)


def _check_int(value, name: str, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")


def _as_static_tree(tree, name: str = "tree") -> StaticTree:
    if isinstance(tree, StaticTree):
        return tree
    if isinstance(tree, (list, tuple)):
        return static_tree(tree)
    raise TypeError(f"{name}: expected a StaticTree or a choices list, got {type(tree).__name__}")


def _pad_trees(tokens: torch.Tensor, parents: torch.Tensor, count: torch.Tensor, root: torch.Tensor) -> DraftTree:
    """Rows ``tokens`` / ``parents`` ``[B, T]`` with ``count[b]`` real nodes (root included): the rest become
    children of the root carrying the root's token."""
    pad = torch.arange(tokens.shape[1], device=tokens.device)[None] >= count[:, None]
    tokens = torch.where(pad, root[:, None], tokens)
    parents = torch.where(pad, 0, parents)
    parents[:, 0] = -1
    tokens[:, 0] = root
    return DraftTree(tokens, parents)


class PromptLookupDrafter:
    """Prompt lookup: find the row's last ``n`` tokens earlier in its prompt + output (``n`` from ``max_ngram``
    down to ``min_ngram``, the longest n with a match wins) and propose the tokens that followed.

    Args:
        max_ngram, min_ngram: the n-gram sizes tried, longest first.
        num_tokens: at most this many tokens per match (a continuation ends at the end of the history).
        num_matches: the most recent matches of the winning n (1: a chain, like HF and vLLM, which take a
            single match); their continuations merge into a trie (shared prefixes become one branch),
            listed match by match so that the node budget truncates the least recent ones first.

    Deterministic proposals (``mode="deterministic"``): lossless with greedy and sampled verification alike.
    """

    vocab_size = None  # works on any vocabulary

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, num_tokens: int = 10, num_matches: int = 4):
        _check_int(min_ngram, "min_ngram", 1)
        _check_int(max_ngram, "max_ngram", min_ngram)
        _check_int(num_tokens, "num_tokens", 1)
        _check_int(num_matches, "num_matches", 1)
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.num_tokens, self.num_matches = num_tokens, num_matches

    def __repr__(self) -> str:
        return (f"PromptLookupDrafter(max_ngram={self.max_ngram}, min_ngram={self.min_ngram}, "
                f"num_tokens={self.num_tokens}, num_matches={self.num_matches})")

    def reset(self, input_ids, attention_mask, target) -> None:
        """Nothing to set up: the lookup reads the history passed to :meth:`propose`."""

    def observe(self, tree, target_logits, accepted_nodes, accept_len, next_token) -> None:
        """Nothing to learn."""

    def candidates(self, history: torch.Tensor, lengths: torch.Tensor):
        """The continuations of the most recent matches, most recent first: tokens ``[B, M, num_tokens]`` and
        lengths ``[B, M]`` (0: no match). Batched over rows; one pass per n-gram size."""
        b, width = history.shape
        m, d = self.num_matches, self.num_tokens
        device = history.device
        lengths = lengths.to(device).long()
        tokens = torch.zeros(b, m, d, dtype=torch.long, device=device)
        counts = torch.zeros(b, m, dtype=torch.long, device=device)
        found = torch.zeros(b, dtype=torch.bool, device=device)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if width < n + 1:
                continue
            suffix = history.gather(1, (lengths[:, None] - n + torch.arange(n, device=device)).clamp_min(0))
            windows = history.unfold(1, n, 1)  # [B, J, n], window j covers j .. j + n - 1
            start = torch.arange(windows.shape[1], device=device)
            # a match needs at least one known token after it (j + n < length); this excludes the suffix itself
            match = (windows == suffix[:, None, :]).all(-1) & (start[None] + n < lengths[:, None])
            take = ~found & match.any(1)
            if not take.any():
                continue
            k = min(m, windows.shape[1])
            latest, j = torch.where(match, start[None], -1).topk(k, dim=1)  # most recent first
            begin = j + n  # [B, k]
            step = torch.arange(d, device=device)
            pos = begin[..., None] + step  # [B, k, d]
            cont = history.gather(1, pos.clamp_max(width - 1).reshape(b, -1)).reshape(b, k, d)
            count = torch.where(latest >= 0, (lengths[:, None] - begin).clamp(0, d), 0)
            tokens[:, :k] = torch.where(take[:, None, None], cont, tokens[:, :k])
            counts[:, :k] = torch.where(take[:, None], count, counts[:, :k])
            found |= take
        return tokens, counts

    @torch.no_grad()
    def propose(self, history: torch.Tensor, lengths: torch.Tensor, max_nodes: int, sampling: Sampling,
                generator: Optional[torch.Generator] = None) -> DraftTree:
        """The trie of the most recent matches' continuations, at most ``max_nodes`` nodes (root included)."""
        _check_int(max_nodes, "max_nodes", 1)
        lengths = lengths.to(history.device).long()
        root = history.gather(1, (lengths - 1)[:, None])[:, 0]
        cand, counts = self.candidates(history, lengths)
        b, m, d = cand.shape
        valid = torch.arange(d, device=cand.device)[None, None] < counts[..., None]  # [B, M, D]
        # same[b, i, j, t]: candidates i and j agree (and exist) on their first t + 1 tokens
        same = ((cand[:, :, None] == cand[:, None, :]) & valid[:, :, None] & valid[:, None, :]).cumprod(-1).bool()
        rep = same.int().argmax(2)  # [B, M, D], the first candidate sharing the prefix (itself if none earlier)
        unique = valid & (rep == torch.arange(m, device=cand.device)[None, :, None])
        flat = torch.arange(m * d, device=cand.device).view(m, d)
        # a trie node per unique (candidate, depth), listed candidate by candidate: parents come first
        order = torch.where(unique.view(b, -1), flat.view(1, -1), m * d).sort(1).values
        n_nodes = unique.view(b, -1).sum(1)
        t = min(max_nodes, int(n_nodes.max()) + 1 if b else 1)
        node_of = torch.zeros(b, m * d + 1, dtype=torch.long, device=cand.device)  # last column: a sink
        node_of.scatter_(1, order, torch.arange(1, m * d + 1, device=cand.device).expand(b, -1))
        node_of = node_of[:, :-1]
        # every (candidate, depth) maps to its representative's node
        node_of = node_of.gather(1, (rep * d + torch.arange(d, device=cand.device)).view(b, -1))
        chosen = order[:, : t - 1].clamp_max(m * d - 1)  # [B, T - 1] flat (candidate, depth)
        depth = chosen % d
        parent = torch.where(depth > 0, node_of.gather(1, (chosen - 1).clamp_min(0)), 0)
        tokens = torch.cat([root[:, None], cand.view(b, -1).gather(1, chosen)], 1)
        parents = torch.cat([torch.full((b, 1), -1, dtype=torch.long, device=cand.device), parent], 1)
        return _pad_trees(tokens, parents, (n_nodes + 1).clamp_max(t), root)


def _last_occurrence(keys: torch.Tensor) -> torch.Tensor:
    """Indices of the last occurrence of every distinct value of the 1-D ``keys`` (so that scattered writes
    have unique targets and a deterministic winner)."""
    order = torch.sort(keys, stable=True).indices
    ordered = keys[order]
    last = torch.ones_like(ordered, dtype=torch.bool)
    last[:-1] = ordered[1:] != ordered[:-1]
    return order[last]


class TokenRecyclingDrafter:
    """Token Recycling: an adjacency table ``[V, k]`` (int32) holding, for every token, the target's top-k
    next tokens the last time the target ran over that token; every verification forward refreshes the rows
    of every tree token (:meth:`observe`: the candidate tokens the target "discarded" are recycled).

    Drafting walks a static tree from the root: node i is ``table[token of its parent, ranks[i]]``. The
    table persists across :meth:`reset` calls (the paper's hot start); :meth:`clear` empties it. Beyond the
    paper, with ``seed_from_prompt`` a token the target has never run over gets, as its first candidate, the
    token that follows it in the prompt (its last occurrence), so that a cold table drafts from the prompt.

    Args:
        vocab_size: the target's vocabulary; None takes it from the target at the first :meth:`reset`.
        k: candidates per token (table width); k = 8 at V = 32000 is 1 MB.
        tree: a :class:`~.trees.StaticTree` or a choices list with ranks < k; default the best 80-node
            tree for :data:`DEFAULT_RANK_PROBS` (see :func:`~.trees.ranked_tree`), truncated to each step's
            node budget.
        seed_from_prompt: seed the unobserved rows' first candidate from the prompt's bigrams at :meth:`reset`.
    """

    def __init__(self, vocab_size: Optional[int] = None, k: int = 8, tree=None, seed_from_prompt: bool = True):
        _check_int(k, "k", 1)
        if vocab_size is not None:
            _check_int(vocab_size, "vocab_size", 1)
        self.k = k
        self.tree = ranked_tree(DEFAULT_RANK_PROBS[:k], 80) if tree is None else _as_static_tree(tree)
        if self.tree.max_rank >= k:
            raise ValueError(f"tree: uses child rank {self.tree.max_rank}, but the table keeps k={k} candidates")
        self.vocab_size, self.seed_from_prompt = vocab_size, bool(seed_from_prompt)
        self.table = self.observed = None
        if vocab_size is not None:
            self._allocate(vocab_size)

    def _allocate(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.table = torch.zeros(vocab_size, self.k, dtype=torch.int32)
        self.observed = torch.zeros(vocab_size, dtype=torch.bool)  # rows the target has refreshed

    def __repr__(self) -> str:
        return f"TokenRecyclingDrafter(vocab_size={self.vocab_size}, k={self.k}, nodes={self.tree.num_nodes})"

    @property
    def table_bytes(self) -> int:
        """Memory held by the adjacency table and its observed flags."""
        return 0 if self.table is None else self.table.numel() * self.table.element_size() + self.observed.numel()

    def clear(self) -> None:
        """Forget every observation (the table back to token 0 everywhere)."""
        if self.table is not None:
            self.table.zero_()
            self.observed.zero_()

    def reset(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target: torch.nn.Module) -> None:
        """Allocate the table on the target's device (keeping what it learnt in earlier calls) and, with
        ``seed_from_prompt``, seed unobserved rows from the prompts."""
        if self.table is None:
            head = target.get_output_embeddings()
            self._allocate(head.weight.shape[0] if head is not None else target.config.get_text_config().vocab_size)
        self.table, self.observed = self.table.to(input_ids.device), self.observed.to(input_ids.device)
        if self.seed_from_prompt and input_ids.shape[1] > 1:
            both = (attention_mask[:, :-1] != 0) & (attention_mask[:, 1:] != 0)
            first, then = input_ids[:, :-1][both].long(), input_ids[:, 1:][both]
            fresh = ~self.observed[first]
            first, then = first[fresh], then[fresh]
            keep = _last_occurrence(first)
            self.table[first[keep], 0] = then[keep].to(torch.int32)

    @torch.no_grad()
    def observe(self, tree: DraftTree, target_logits: torch.Tensor, accepted_nodes, accept_len, next_token) -> None:
        """Refresh the row of every tree token with the target's top-k after it; a token appearing at several
        nodes keeps the last one's (batch row-major, then node order)."""
        tokens = tree.tokens.reshape(-1)
        top = target_logits.topk(self.k, dim=-1).indices.reshape(-1, self.k).to(torch.int32)
        keep = _last_occurrence(tokens)
        self.table.index_copy_(0, tokens[keep], top[keep])
        self.observed[tokens] = True

    @torch.no_grad()
    def propose(self, history: torch.Tensor, lengths: torch.Tensor, max_nodes: int, sampling: Sampling,
                generator: Optional[torch.Generator] = None) -> DraftTree:
        """The static tree (first ``max_nodes`` nodes) filled from the table, depth by depth."""
        _check_int(max_nodes, "max_nodes", 1)
        if self.table is None:
            raise RuntimeError("TokenRecyclingDrafter: call reset() first (it allocates the table)")
        tree = self.tree.truncate(max_nodes)
        device = history.device
        root = history.gather(1, (lengths.to(device).long() - 1)[:, None])[:, 0]
        tokens = root[:, None].repeat(1, tree.num_nodes)
        parents, ranks = tree.parents.to(device), tree.ranks.to(device)
        for nodes in depth_nodes(tree):
            nodes = nodes.to(device)
            tokens[:, nodes] = self.table[tokens[:, parents[nodes]], ranks[nodes]].long()
        return DraftTree(tokens, parents)


class DraftModelDrafter:
    """A smaller causal LM with the target's vocabulary drafts the tree.

    The draft keeps its own KV cache (the model's own cache object, an HF ``DynamicCache``) of the committed
    history: each :meth:`propose` first feeds the tokens emitted since the last one (one forward, rows
    right-aligned in the block and masked where a row has fewer, so the cache can hold masked holes for
    batches with ragged acceptance), whose last logits give the root's children; the tree levels then run
    one forward per depth with a 4-D tree attention mask (the model must accept a 4-D float attention mask:
    eager and SDPA attention do); finally the cache is cropped back to the committed history.

    Args:
        draft_model: an HF causal LM with the target's vocabulary and tokenizer, a module distinct from the
            target (generate swaps the target's attention).
        tree: "chain" (a chain filling the node budget), "static" (the best static tree for
            :data:`DEFAULT_RANK_PROBS`, truncated to the budget), "dynamic" (:class:`~.trees.DynamicTree`),
            a choices list, a :class:`~.trees.StaticTree` or a :class:`~.trees.DynamicTree`.
        num_tokens: the deepest draft depth for chain and static trees (None: as deep as the budget allows),
            the depth of the "dynamic" tree (default 6).
        mode: when sampling, how children are drawn: "iid" (from the warped draft distribution q, which
            ``draft_probs`` carries; chain and static trees only) or "deterministic" (the top-k of q; the
            rule never reads q). Default "iid" for chain and static trees, "deterministic" for dynamic ones.
            Greedy decoding always drafts the draft's top-k.
        stop_threshold: SpecDec++ adaptive stop (:func:`~.trees.stop_deepening`): stop deepening once the
            predicted probability that some token on the best path is rejected exceeds this (None: off).
        topk: children per expanded node of the "dynamic" tree.
    """

    def __init__(self, draft_model: torch.nn.Module, tree: Union[str, Sequence, StaticTree, DynamicTree] = "chain",
                 num_tokens: Optional[int] = None, mode: Optional[str] = None, stop_threshold: Optional[float] = None,
                 topk: int = 8):
        if not isinstance(draft_model, torch.nn.Module) or not hasattr(draft_model, "get_output_embeddings"):
            raise TypeError(f"draft_model: expected a Hugging Face causal LM, got {type(draft_model).__name__}")
        if num_tokens is not None:
            _check_int(num_tokens, "num_tokens", 1)
        check_threshold(stop_threshold)
        self.model = draft_model.eval()
        self.num_tokens, self.stop_threshold = num_tokens, stop_threshold
        if isinstance(tree, str):
            if tree == "chain":
                tree = None  # sized by each step's budget
            elif tree == "static":
                tree = ranked_tree(DEFAULT_RANK_PROBS, 128, max_depth=num_tokens)
            elif tree == "dynamic":
                tree = DynamicTree(topk=topk, depth=num_tokens or 6, stop_threshold=stop_threshold)
            else:
                raise ValueError(f"tree: expected 'chain', 'static', 'dynamic', a choices list, a StaticTree or a "
                                 f"DynamicTree, got {tree!r}")
        elif not isinstance(tree, DynamicTree):
            tree = _as_static_tree(tree)
        self.tree = tree
        dynamic = isinstance(tree, DynamicTree)
        mode = mode if mode is not None else ("deterministic" if dynamic else "iid")
        if mode not in ("iid", "deterministic"):
            raise ValueError(f"mode: expected 'iid' or 'deterministic', got {mode!r}")
        if dynamic and mode == "iid":
            raise ValueError("mode: a dynamic tree chooses children by their probabilities, so sampled drafts "
                             "must use mode='deterministic' (the top-k of q)")
        self.mode = mode
        head = draft_model.get_output_embeddings()
        self.vocab_size = head.weight.shape[0] if head is not None else draft_model.config.get_text_config().vocab_size
        self._cache = self._cached = None

    def __repr__(self) -> str:
        return f"DraftModelDrafter({type(self.model).__name__}, tree={self.tree or 'chain'}, mode={self.mode!r})"

    def reset(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target: torch.nn.Module) -> None:
        """A fresh draft cache for a new batch."""
        if self.model is target or getattr(self.model, "config", None) is getattr(target, "config", False):
            raise ValueError("draft_model: must be a module distinct from the target, with its own config "
                             "(generate swaps the target's attention); use copy.deepcopy(target) or self_drafter")
        device = next(self.model.parameters()).device
        if device != input_ids.device:
            raise ValueError(f"draft_model: on {device}, but input_ids are on {input_ids.device}")
        b = input_ids.shape[0]
        self._cache = None
        self._committed = torch.zeros(b, 0, dtype=torch.bool, device=device)  # valid cache columns
        self._cached = torch.zeros(b, dtype=torch.long, device=device)  # history tokens in the cache per row
        self._root_logits = None

    def observe(self, tree, target_logits, accepted_nodes, accept_len, next_token) -> None:
        """Nothing: the next :meth:`propose` feeds the accepted tokens from the history."""

    def _sync(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Feed every row's new history tokens; the draft's logits after each row's last token ``[B, V]``."""
        new = lengths - self._cached
        width = int(new.max())
        if width > 0:
            w = torch.arange(width, device=history.device)
            offset = width - new
            valid = w[None] >= offset[:, None]
            src = self._cached[:, None] + w[None] - offset[:, None]
            tokens = torch.where(valid, history.gather(1, src.clamp(0, history.shape[1] - 1)), 0)
            mask = torch.cat([self._committed, valid], 1)
            out = self.model(input_ids=tokens, attention_mask=mask.long(), position_ids=torch.where(valid, src, 0),
                             cache=self._cache, use_cache=True, logits_to_keep=1)
            self._cache = out.cache
            last = out.logits[:, -1].float()
            self._root_logits = last if self._root_logits is None else \
                torch.where((new > 0)[:, None], last, self._root_logits)
            self._committed, self._cached = mask, lengths.clone()
        return self._root_logits

    def _forward_tree(self, tokens: torch.Tensor, positions: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """Run tree nodes ``[B, K]`` attending to the committed cache and ``attend`` ``[B, K, F]`` over the
        tree nodes fed so far (these K last); logits ``[B, K, V]``."""
        b, k = tokens.shape
        allowed = torch.cat([self._committed[:, None].expand(b, k, -1), attend], 2)[:, None]
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=tokens.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                         cache=self._cache, use_cache=True)
        self._cache = out.cache
        return out.logits.float()

    def _crop(self) -> None:
        extra = self._cache.get_seq_length() - self._committed.shape[1]
        if extra > 0:
            self._cache.crop(-extra)

    def _distribution(self, logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
        """What children are chosen from: the warped q when sampling, the draft's softmax when greedy."""
        return logits.float().softmax(-1) if sampling.greedy else warp(logits, sampling)

    @torch.no_grad()
    def propose(self, history: torch.Tensor, lengths: torch.Tensor, max_nodes: int, sampling: Sampling,
                generator: Optional[torch.Generator] = None) -> DraftTree:
        """Draft the tree for every row (at most ``max_nodes`` nodes, root included)."""
        _check_int(max_nodes, "max_nodes", 1)
        if self._cached is None or self._cached.numel() != history.shape[0]:
            raise RuntimeError("DraftModelDrafter: call reset() with this batch first")
        lengths = lengths.to(history.device).long()
        root = history.gather(1, (lengths - 1)[:, None])[:, 0]
        root_logits = self._sync(history, lengths)
        try:
            if isinstance(self.tree, DynamicTree):
                return self._propose_dynamic(root, root_logits, lengths, max_nodes, sampling)
            return self._propose_static(root, root_logits, lengths, max_nodes, sampling, generator)
        finally:
            self._crop()

    def _propose_dynamic(self, root, root_logits, lengths, max_nodes, sampling) -> DraftTree:
        def expand(tokens, attend, depth):
            positions = (lengths - 1 + depth)[:, None].expand_as(tokens)
            return self._distribution(self._forward_tree(tokens, positions, attend), sampling).log()

        tokens, parents = self.tree.grow(self._distribution(root_logits, sampling).log(), expand, max_nodes)
        tokens[:, 0] = root
        return DraftTree(tokens, parents, mode="deterministic")

    def _propose_static(self, root, root_logits, lengths, max_nodes, sampling, generator) -> DraftTree:
        tree = self.tree if self.tree is not None else chain(max_nodes)
        tree = tree.truncate(max_nodes)
        if self.num_tokens is not None:
            tree = tree.up_to_depth(self.num_tokens)
        iid = not sampling.greedy and self.mode == "iid"
        b, device = root.shape[0], root.device
        t, vocab = tree.num_nodes, root_logits.shape[-1]
        parents, ranks, depths = (x.to(device) for x in (tree.parents, tree.ranks, tree.depths))
        ancestors = tree_mask(parents)[0]  # [T, T]
        tokens = root[:, None].repeat(1, t)
        path_logp = torch.zeros(b, t, device=device)
        dist = torch.zeros(b, t, vocab, device=device)  # each expanded node's children distribution (q)
        dist[:, 0] = self._distribution(root_logits, sampling)
        fed = []
        last_depth = tree.max_depth
        for depth, nodes in enumerate(depth_nodes(tree), start=1):
            nodes = nodes.to(device)
            if depth > 1:  # feed the previous depth's nodes that have children here
                feed = torch.unique(parents[nodes])
                fed_now = fed + feed.tolist()
                attend = ancestors[feed][:, fed_now][None].expand(b, -1, -1)
                positions = (lengths - 1 + depth - 1)[:, None].expand(b, feed.numel())
                dist[:, feed] = self._distribution(self._forward_tree(tokens[:, feed], positions, attend), sampling)
                fed = fed_now
            p = dist[:, parents[nodes]]  # [B, n, V], each node's parent's distribution
            if iid:
                chosen = torch.multinomial(p.reshape(-1, vocab), 1, replacement=True, generator=generator)
                chosen = chosen.view(b, -1)
            else:
                top = p.topk(min(tree.max_rank + 1, vocab), dim=-1).indices  # [B, n, r]
                chosen = top.gather(2, ranks[nodes][None, :, None].expand(b, -1, 1))[..., 0]
            tokens[:, nodes] = chosen
            path_logp[:, nodes] = path_logp[:, parents[nodes]] + p.gather(2, chosen[..., None])[..., 0].log()
            if depth < tree.max_depth and stop_deepening(path_logp[:, nodes], self.stop_threshold):
                last_depth = depth
                break
        keep = depths <= last_depth
        if not bool(keep.all()):
            tree = tree.up_to_depth(last_depth)
            tokens, dist = tokens[:, keep], dist[:, keep]
            parents = tree.parents.to(device)
        return DraftTree(tokens, parents, draft_probs=dist if iid else None,
                         mode=self.mode if not sampling.greedy else "deterministic")


def self_drafter(target: torch.nn.Module, bits: float = 4, group_size: int = 128, sparsity: Optional[float] = None,
                 calib_batches: Optional[Iterable] = None, progress: bool = False, **drafter_kwargs
                 ) -> DraftModelDrafter:
    """A :class:`DraftModelDrafter` over a copy of ``target`` converted to a cheaper format: low-bit weights
    (:func:`efficient_ops.nn.quantize_model` with ``bits`` and ``group_size``), or, with ``sparsity``, R-Sparse
    (:func:`efficient_ops.nn.rsparsify_model`, calibrated on ``calib_batches``). The target is not modified.
    ``drafter_kwargs`` go to :class:`DraftModelDrafter` (tree, num_tokens, mode, stop_threshold, topk)."""
    if not isinstance(target, torch.nn.Module):
        raise TypeError(f"target: expected a Hugging Face causal LM, got {type(target).__name__}")
    if sparsity is not None and calib_batches is None:
        raise ValueError("calib_batches: required with sparsity (R-Sparse calibrates on the layers' inputs)")
    draft = copy.deepcopy(target)
    if sparsity is not None:
        rsparsify_model(draft, calib_batches, sparsity=sparsity, progress=progress)
    else:
        quantize_model(draft, bits=bits, group_size=group_size, progress=progress)
    return DraftModelDrafter(draft, **drafter_kwargs)


__all__ = ["PromptLookupDrafter", "TokenRecyclingDrafter", "DraftModelDrafter", "self_drafter", "DEFAULT_RANK_PROBS"]
