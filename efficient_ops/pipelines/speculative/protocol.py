"""The contract between the generate loop and the drafters: a batch of draft trees, the sampling
settings, and the ``Drafter`` protocol.

Trees use the package's convention (see :func:`efficient_ops.validate_parents`): node 0 is the root, the
last emitted token of the row (its key/value is not in the target's cache yet); every other node's parent
is an earlier node. Every row of a batch has the same number of nodes T: a drafter with nothing good to
propose for a row still fills it with valid token ids (verification simply rejects them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch


@dataclass
class DraftTree:
    """Draft trees for a batch.

    tokens: int64 ``[B, T]``, each node's token; ``tokens[:, 0]`` is the root (the last emitted token).
    parents: int64 ``[T]`` (shared) or ``[B, T]``; ``parents[..., 0] = -1`` and ``parents[..., i] < i``.
    draft_probs: float ``[B, T, V]``, the distribution q_i that node i's children were drawn from, after the
        same warping as the target's (needed only for ``mode`` "iid" / "without_replacement").
    mode: how children were chosen, i.e. which lossless rule ``verify_sampling`` applies: "iid",
        "without_replacement", or "deterministic" (top-k / n-gram / table proposals; q is never read).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    draft_probs: Optional[torch.Tensor] = None
    mode: str = "deterministic"

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]


@dataclass(frozen=True)
class Sampling:
    """Sampling settings applied to target and draft logits alike. ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def warp(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Probabilities from logits ``[..., V]`` after temperature, then top-k, then top-p (HF's order), in
    float32. Greedy settings give the one-hot argmax."""
    logits = logits.float()
    if sampling.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        # keep the smallest set of most likely tokens whose mass reaches top_p (at least one), as HF does
        sorted_logits, order = logits.sort(-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1 - sampling.top_p
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def check_sampling(sampling: Sampling) -> None:
    """ValueError naming the parameter when a sampling setting is out of range."""
    if not (sampling.temperature >= 0.0) or sampling.temperature == float("inf"):
        raise ValueError(f"temperature: expected a finite value >= 0 (0 = greedy), got {sampling.temperature}")
    if not isinstance(sampling.top_k, int) or sampling.top_k < 0:
        raise ValueError(f"top_k: expected an integer >= 0 (0 = off), got {sampling.top_k!r}")
    if not (0.0 < sampling.top_p <= 1.0):
        raise ValueError(f"top_p: expected a value in (0, 1] (1 = off), got {sampling.top_p}")


class Drafter(Protocol):
    """Proposes a draft tree per step; sees the target's verdict after each step.

    ``vocab_size`` is the drafter's vocabulary (None when it works on any vocabulary, e.g. n-gram lookup);
    generate checks it against the target's.
    """

    vocab_size: Optional[int]

    def reset(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target: torch.nn.Module) -> None:
        """Start a new generate call: left-padded prompts ``[B, P]`` and their mask (HF convention)."""

    def propose(self, history: torch.Tensor, lengths: torch.Tensor, max_nodes: int, sampling: Sampling,
                generator: Optional[torch.Generator]) -> DraftTree:
        """``history[b, :lengths[b]]``: row b's tokens so far (prompt without padding, then every emitted
        token; the last one is the root). Return at most ``max_nodes`` nodes (root included) per row."""

    def observe(self, tree: DraftTree, target_logits: torch.Tensor, accepted_nodes: torch.Tensor,
                accept_len: torch.Tensor, next_token: torch.Tensor) -> None:
        """After verification: the target's logits ``[B, T, V]`` over the tree (row i predicts node i's child),
        the accepted path (as ``verify_greedy`` returns it) and the bonus token per row."""
