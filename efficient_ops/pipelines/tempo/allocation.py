"""Adaptive Token Allocation (ATA) and the baselines' allocators: how many memory tokens each segment keeps.

:func:`allocate_tokens` reproduces ``adaptive_linear_budget_allocation`` of Tempo's released code step by
step, in the same float32 arithmetic:

1. if ``n * k_min > B``: ``k_min = max(1, B // n)``;
2. if ``max(s) - min(s) < 1e-8``: every segment gets ``min(K, B // n)``;
3. else ``s_hat = (s - min) / (max - min)`` and ``k_i = k_min + floor(s_hat_i * (K - k_min))``;
4. only if ``sum(k) > B``: ``extra = B - n * k_min``, ``w = s_hat / sum(s_hat)`` (uniform when that sum is
   ~0), ``k_i = k_min + floor(w_i * extra)``, the remainder one each to the largest ``w`` (descending argsort);
5. clamp to ``[k_min, K]``.

Step 3 often leaves most of the budget unused (a mostly irrelevant video keeps ~k_min per segment);
``fill=True`` hands that back: the unused tokens go to the segments below K in proportion to ``s_hat``
(then one each by descending score), up to K each, until the budget or every segment is full.
"""

from __future__ import annotations

import torch

K_MIN = 4


def _check(scores, budget: int, k_max: int, k_min: int) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        scores = torch.as_tensor(scores)
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"scores: expected a non-empty 1-D tensor (one score per segment), got shape "
                         f"{tuple(scores.shape)}")
    if not torch.isfinite(scores.float()).all():
        raise ValueError("scores: every score must be finite")
    if k_max < 1 or k_min < 1:
        raise ValueError(f"k_max, k_min: must be at least 1, got {k_max}, {k_min}")
    n = scores.numel()
    if budget < n:
        raise ValueError(f"budget: {budget} visual tokens cannot give each of the {n} segments one token; raise the "
                         f"budget to at least {n} or shorten the video")
    return scores.detach().cpu().float()


def allocate_tokens(scores, budget: int, k_max: int, k_min: int = K_MIN, fill: bool = False) -> torch.Tensor:
    """Tempo's Adaptive Token Allocation (``strategy="head"`` keeps each segment's first ``k_i`` tokens).

    Args:
        scores: ``[n]`` relevance scores (any float; computed on as float32, as the released code does).
        budget: visual-token budget B (memory tokens over all segments); must be at least n.
        k_max: memory tokens per segment K.
        k_min: the floor per segment (4 in the released model), lowered to ``max(1, B // n)`` when B is short.
        fill: also hand out the budget the released formula leaves unused (see the module docstring).

    Returns:
        int64 ``[n]`` on the CPU, each in ``[k_min', K]``, summing to at most ``budget``.
    """
    s = _check(scores, budget, k_max, k_min)
    n = s.numel()
    k_max = int(k_max)
    if n * k_min > budget:
        k_min = max(1, budget // n)
    lo, hi = s.min(), s.max()
    if hi - lo < 1e-8:
        alloc = torch.full((n,), min(k_max, budget // n), dtype=torch.long)
        return _fill(alloc, torch.zeros(n), budget, k_max) if fill else alloc
    s_hat = (s - lo) / (hi - lo)
    alloc = k_min + (s_hat * (k_max - k_min)).floor().long()
    if alloc.sum().item() > budget:
        extra = budget - n * k_min
        total = s_hat.sum().item()
        w = torch.ones_like(s_hat) / n if total < 1e-8 else s_hat / total
        extra_alloc = (w * extra).floor().long()
        remainder = int(extra - extra_alloc.sum().item())
        if remainder > 0:
            extra_alloc[torch.argsort(w, descending=True)[:remainder]] += 1
        alloc = k_min + extra_alloc
    alloc = alloc.clamp(min=k_min, max=k_max)
    return _fill(alloc, s_hat, budget, k_max) if fill else alloc


def _fill(alloc: torch.Tensor, s_hat: torch.Tensor, budget: int, k_max: int) -> torch.Tensor:
    alloc = alloc.clone()
    while True:
        free, room = budget - int(alloc.sum()), k_max - alloc
        open_ = room > 0
        if free <= 0 or not open_.any():
            return alloc
        w = torch.where(open_, s_hat, 0.0)
        w = w / w.sum() if w.sum() > 0 else open_.float() / open_.sum()
        give = torch.minimum((w * free).floor().long(), room)
        if give.sum() == 0:  # the proportional shares round to zero: one token each, best scores first
            order = torch.argsort(torch.where(open_, s_hat, -1.0), descending=True)[:min(free, int(open_.sum()))]
            give[order] = 1
        alloc += give


def uniform_allocation(n: int, budget: int, k_max: int) -> torch.Tensor:
    """The uniform-allocation baseline: ``min(K, B // n)`` tokens for every segment."""
    if budget < n:
        raise ValueError(f"budget: {budget} visual tokens cannot give each of the {n} segments one token")
    return torch.full((n,), min(k_max, budget // n), dtype=torch.long)


def truncated_allocation(n: int, budget: int, k_max: int) -> torch.Tensor:
    """Tempo without ATA: every segment keeps all K tokens and the sequence is cut at the budget (tail
    truncation: the last segments lose their tokens, then are dropped)."""
    if budget < 1:
        raise ValueError(f"budget: must be at least 1, got {budget}")
    ends = torch.arange(1, n + 1) * k_max
    return (torch.clamp(budget - (ends - k_max), min=0)).clamp(max=k_max).long()
