"""Adaptive Token Allocation against a brute-force port of the released formula, and the budget invariants."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from efficient_ops.pipelines.tempo import allocate_tokens, truncated_allocation, uniform_allocation
from efficient_ops.pipelines.tempo.assembly import arrange, segment_block_mask, tome_merge


def brute_force(scores, budget, k_max, k_min=4):
    """adaptive_linear_budget_allocation written out element by element in numpy float32; returns
    (allocation, branch) with branch in uniform / ideal / protected."""
    n = len(scores)
    if n * k_min > budget:
        k_min = max(1, budget // n)
    s = np.asarray(scores, dtype=np.float32)
    lo, hi = s.min(), s.max()
    if np.float32(hi - lo) < 1e-8:
        return [min(k_max, budget // n)] * n, "uniform"
    s_hat = [np.float32((x - lo) / np.float32(hi - lo)) for x in s]
    ideal = [k_min + int(np.floor(np.float32(x * np.float32(k_max - k_min)))) for x in s_hat]
    if sum(ideal) <= budget:
        return [min(max(a, k_min), k_max) for a in ideal], "ideal"
    extra = budget - n * k_min
    total = float(np.sum(np.asarray(s_hat, dtype=np.float32), dtype=np.float32))
    w = [np.float32(1.0) / np.float32(n)] * n if total < 1e-8 else [np.float32(x / np.float32(total)) for x in s_hat]
    alloc = [int(np.floor(np.float32(x * np.float32(extra)))) for x in w]
    remainder = extra - sum(alloc)
    # one each to the largest weights; among equal weights the released code takes whatever order torch's
    # (unstable) descending argsort gives, so the port asks the same call for the tie order only
    order = torch.argsort(torch.tensor(np.asarray(w, dtype=np.float32)), descending=True).tolist()
    assert [w[i] for i in order] == sorted(w, reverse=True)
    for i in order[:max(remainder, 0)]:
        alloc[i] += 1
    return [min(max(k_min + a, k_min), k_max) for a in alloc], "protected"


CASES = [  # (scores, budget, K) chosen to reach every branch
    ([0.3] * 6, 100, 16),                                  # uniform: tied scores
    ([0.3] * 6, 50, 16),                                   # uniform, budget-limited
    ([0.1, 0.9, 0.5, 0.2], 1000, 128),                     # ideal
    ([0.1, 0.9, 0.5, 0.2, 0.8, 0.85], 40, 16),             # budget protection
    ([0.0, 1.0, 1.0, 1.0, 0.0], 30, 16),                   # protection with tied weights
    ([0.2, 0.4, 0.6, 0.8, 1.0, 0.3, 0.1, 0.9], 10, 128),   # n * k_min > B: k_min lowered to 1
]


@pytest.mark.parametrize("scores,budget,k_max", CASES)
def test_ata_matches_brute_force_branches(scores, budget, k_max):
    want, _ = brute_force(scores, budget, k_max)
    assert allocate_tokens(torch.tensor(scores), budget, k_max).tolist() == want


def test_ata_reaches_every_branch():
    assert {brute_force(*c)[1] for c in CASES} == {"uniform", "ideal", "protected"}


def test_ata_random_and_tied_scores():
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = int(torch.randint(1, 60, (1,), generator=gen))
        k = int(torch.randint(1, 130, (1,), generator=gen))
        budget = int(torch.randint(n, n * k + 50, (1,), generator=gen))
        scores = torch.rand(n, generator=gen)
        if trial % 3 == 1:
            scores = (scores * 3).floor() / 2  # many ties
        want, _ = brute_force(scores.tolist(), budget, k)
        assert allocate_tokens(scores, budget, k).tolist() == want, (n, k, budget)


@settings(max_examples=150, deadline=None)
@given(scores=st.lists(st.floats(0, 1, width=32), min_size=1, max_size=80), k=st.integers(1, 256),
       extra=st.integers(0, 4000), k_min=st.integers(1, 8), fill=st.booleans())
def test_ata_never_exceeds_budget(scores, k, extra, k_min, fill):
    n = len(scores)
    budget = n + extra
    alloc = allocate_tokens(torch.tensor(scores), budget, k, k_min, fill=fill)
    assert alloc.dtype == torch.long and alloc.shape == (n,)
    assert int(alloc.sum()) <= budget
    assert int(alloc.min()) >= 1 and int(alloc.max()) <= k
    if fill:
        plain = allocate_tokens(torch.tensor(scores), budget, k, k_min)
        assert (alloc >= plain).all()
        assert int(alloc.sum()) == min(budget, n * k)  # every token handed out, or every segment full


def test_fill_gives_unused_budget_to_relevant_segments():
    scores = torch.tensor([0.0, 0.0, 1.0, 0.5, 0.0])
    plain = allocate_tokens(scores, 200, 64)
    assert plain.tolist() == [4, 4, 64, 34, 4] and int(plain.sum()) < 200
    filled = allocate_tokens(scores, 200, 64, fill=True)
    assert int(filled.sum()) == 200 and filled[2] == 64 and filled[3] == 64


def test_budget_errors_and_baselines():
    with pytest.raises(ValueError, match="budget: 3 visual tokens cannot give each of the 5 segments"):
        allocate_tokens(torch.rand(5), 3, 16)
    with pytest.raises(ValueError, match="scores: expected a non-empty 1-D"):
        allocate_tokens(torch.rand(0), 3, 16)
    with pytest.raises(ValueError, match="scores: every score must be finite"):
        allocate_tokens(torch.tensor([0.1, float("nan")]), 30, 16)
    assert uniform_allocation(5, 42, 16).tolist() == [8] * 5
    assert uniform_allocation(2, 42, 16).tolist() == [16] * 2
    assert truncated_allocation(4, 40, 16).tolist() == [16, 16, 8, 0]


def test_tome_and_tail():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.01], [0.0, -1.0]])
    assert torch.equal(tome_merge(x, 4), x)
    assert tome_merge(x, 1).shape == (1, 2) and tome_merge(x, 3).shape == (3, 2)
    y = torch.tensor([[1.0, 0.0], [1.0, 0.02], [0.0, 1.0], [0.0, -1.0]])
    out = tome_merge(y, 3)  # token 0 (A) merges into its match 1 (B): their mean, in token 1's place
    assert torch.allclose(out, torch.tensor([[1.0, 0.01], [0.0, 1.0], [0.0, -1.0]]))
    mem = torch.arange(2 * 5 * 1, dtype=torch.float32).view(2, 5, 1)
    tail = arrange(mem, torch.tensor([2, 5]), "tail")
    assert tail[0, :2, 0].tolist() == [3.0, 4.0] and tail[1, :, 0].tolist() == mem[1, :, 0].tolist()


def test_segment_block_mask_covers_the_token_rule():
    cu = torch.tensor([0, 20, 25, 60, 61], dtype=torch.int32)
    prefix, total, block, window = 7, 7 + 61 + 9, 16, 1
    mask = segment_block_mask(prefix, cu, total, block, window)
    group = torch.full((total,), 5)
    group[:prefix] = 0
    for i in range(4):
        group[prefix + cu[i]:prefix + cu[i + 1]] = 1 + i
    gq, gk = group[:, None], group[None, :]
    allowed = (gk == 0) | (gq == 5) | ((gq >= 1) & (gk >= 1) & (gq - gk >= 0) & (gq - gk <= window))
    allowed &= torch.ones(total, total, dtype=torch.bool).tril()
    nb = -(-total // block)
    dense = torch.zeros(nb, nb, dtype=torch.bool)
    for m in range(nb):
        for n in range(nb):
            dense[m, n] = allowed[m * block:(m + 1) * block, n * block:(n + 1) * block].any()
    got = torch.zeros(nb, nb, dtype=torch.bool)
    for m in range(nb):
        got[m, mask.kv_indices[0, 0, m, :mask.kv_num_blocks[0, 0, m]].long()] = True
    assert torch.equal(got, dense) and not dense.all()  # exact at block level, and actually sparse
