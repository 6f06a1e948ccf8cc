"""One verification step: the target's forward over the draft tree, logits warped by the sampling settings,
the acceptance rule (``verify_greedy`` / ``verify_sampling`` / ``verify_typical``), and ``compact_kv`` over all
layers in one call. Batched tensor code; no Python loop over nodes or rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

import efficient_ops

from .protocol import DraftTree, Sampling, warp
from .runner import TreeRunner

ACCEPTANCE = ("exact", "typical")


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
