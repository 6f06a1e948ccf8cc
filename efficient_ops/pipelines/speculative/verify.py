"""One verification step: the target's forward over the draft tree, logits warped by the sampling settings,
the acceptance rule (``verify_greedy`` / ``verify_sampling`` / ``verify_typical``), and ``compact_kv`` over all
layers in one call. Batched tensor code; no Python loop over nodes or rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

import efficient_ops

from .protocol import DraftTree, Sampling
from .runner import TreeRunner

ACCEPTANCE = ("exact", "typical")


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


@dataclass
class StepResult:
    """What one step accepted: ``accept_len`` [B] draft nodes (root excluded), ``accepted_nodes`` [B, P]
    (the path from the root, -1 padded), ``next_token`` [B] (the bonus token), ``logits`` [B, T, V]."""

    accept_len: torch.Tensor
    accepted_nodes: torch.Tensor
    next_token: torch.Tensor
    logits: torch.Tensor


def verify_step(runner: TreeRunner, tree: DraftTree, sampling: Sampling, frozen: torch.Tensor,
                generator: Optional[torch.Generator] = None, acceptance: str = "exact",
                posterior_threshold: float = 0.09, posterior_alpha: float = 0.3) -> StepResult:
    """Run the target over ``tree``, accept a path per row, and compact the cache (rows in ``frozen`` keep
    their prefix). ``acceptance`` "exact" is lossless (greedy: ``verify_greedy``; sampling:
    ``verify_sampling`` with the tree's mode); "typical" is Medusa's typical acceptance (lossy)."""
    logits = runner.forward_tree(tree.tokens, tree.parents)
    if acceptance == "typical":
        probs = warp(logits, sampling) if not sampling.greedy else logits.float().softmax(-1)
        accept_len, accepted, next_token = efficient_ops.verify_typical(tree.tokens, tree.parents, probs,
                                                                         posterior_threshold, posterior_alpha)
    elif sampling.greedy:
        accept_len, accepted, next_token = efficient_ops.verify_greedy(tree.tokens, tree.parents, logits)
    else:
        probs = warp(logits, sampling)
        # the deterministic rule never reads q: the target's own probabilities stand in for the argument
        q = probs if tree.mode == "deterministic" else tree.draft_probs.float()
        accept_len, accepted, next_token = efficient_ops.verify_sampling(tree.tokens, tree.parents, probs, q,
                                                                          mode=tree.mode, generator=generator)
    runner.compact(accepted, accept_len, frozen)
    return StepResult(accept_len, accepted, next_token, logits)
