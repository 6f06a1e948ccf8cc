"""Tree attention, attention-state merging, verification and KV compaction (efficient_ops.ops.speculative).

Tree attention is checked against SDPA with the explicit boolean mask (an independent implementation) and
against the reference; the Triton kernels run under the interpreter on CPU. Verification is checked
against one-node-at-a-time walks, and the lossless rules by chi-square tests on the emitted tokens, with
deliberately wrong rules to show that the tests can fail.
"""


import pytest
import torch
import torch.nn.functional as F

import efficient_ops as eo
from efficient_ops import tree_mask
from efficient_ops.backends import BackendUnavailableError
from efficient_ops.ops.speculative import verify_sampling_with_uniforms
from efficient_ops.reference import speculative as reference

from conftest import rel_err

pytest.importorskip("triton")


def chain(t):
    return torch.arange(-1, t - 1)


def star(t):
    return torch.tensor([-1] + [0] * (t - 1))


def random_tree(t, gen):
    return torch.tensor([-1] + [int(torch.randint(0, i, (), generator=gen)) for i in range(1, t)])


def make_parents(kind, b, t, gen):
    if kind == "chain":
        return chain(t)
    if kind == "star":
        return star(t)
    if kind == "shared":
        return random_tree(t, gen)
    return torch.stack([random_tree(t, gen) for _ in range(b)])


def sdpa_tree_attention(q, k, v, prefix_lens, parents, scale):
    """Independent: SDPA per batch row with the explicit [T, prefix + T] boolean mask, float64."""
    b, hq, t, d = q.shape
    g = hq // k.shape[1]
    mask = tree_mask(parents).expand(b, t, t)
    out = []
    for i in range(b):
        p = int(prefix_lens[i])
        allowed = torch.cat([torch.ones(t, p, dtype=torch.bool), mask[i]], dim=1)
        keys = k[i, :, : p + t].double().repeat_interleave(g, 0)
        values = v[i, :, : p + t].double().repeat_interleave(g, 0)
        out.append(F.scaled_dot_product_attention(q[i].double(), keys, values, attn_mask=allowed, scale=scale))
    return torch.stack(out)


def attention_inputs(b, hq, hkv, t, d, s_max, dtype, gen):
    q = torch.randn(b, hq, t, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, s_max, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, s_max, d, generator=gen).to(dtype)
    return q, k, v


# ---------------------------------------------------------------------------------------------------- tree attention

@pytest.mark.parametrize("kind", ["chain", "star", "shared", "per_row"])
def test_reference_matches_sdpa_with_explicit_mask(kind):
    gen = torch.Generator().manual_seed(1)
    q, k, v = attention_inputs(3, 4, 2, 9, 16, 40, torch.float64, gen)
    parents = make_parents(kind, 3, 9, gen)
    prefix_lens = torch.tensor([0, 31, 17])
    out = eo.tree_attention(q, k, v, prefix_lens, parents, scale=0.3, backend="reference")
    assert rel_err(out, sdpa_tree_attention(q, k, v, prefix_lens, parents, 0.3)) < 1e-12


CASES = [  # b, hq, hkv, t, d, s_max, prefix_lens, tree kind
    (1, 1, 1, 1, 64, 1, [0], "chain"),
    (2, 4, 2, 7, 64, 300, [0, 293], "per_row"),
    (3, 8, 2, 16, 128, 530, [514, 5, 257], "shared"),
    (1, 4, 4, 33, 64, 200, [100], "star"),
    (2, 2, 1, 5, 128, 70, [64, 65], "chain"),
]


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference_and_sdpa(case, poison_outputs):
    b, hq, hkv, t, d, s_max, prefix, kind = case
    gen = torch.Generator().manual_seed(t * 7 + d)
    q, k, v = attention_inputs(b, hq, hkv, t, d, s_max, torch.float16, gen)
    parents = make_parents(kind, b, t, gen)
    prefix_lens = torch.tensor(prefix)
    out = eo.tree_attention(q, k, v, prefix_lens, parents, backend="triton")
    ref = eo.tree_attention(q, k, v, prefix_lens, parents, backend="reference")
    assert out.dtype == torch.float16 and out.shape == q.shape
    assert rel_err(out, ref) < 2e-3
    assert rel_err(out, sdpa_tree_attention(q, k, v, prefix_lens, parents, d ** -0.5)) < 2e-3


@pytest.mark.parametrize("n_splits", [1, 2, 5, 9])
def test_triton_split_counts_and_strided_inputs(n_splits):
    # more splits than prefix chunks leaves empty splits (lse = -inf) that the merge must ignore; q comes from
    # a [B, T, Hq, D] tensor and the caches from a [B, S, Hkv, D] one, as models lay them out
    from efficient_ops.triton_kernels import speculative as kernels

    gen = torch.Generator().manual_seed(n_splits)
    b, hq, hkv, t, d, s_max = 2, 4, 2, 6, 64, 150
    q = torch.randn(b, t, hq, d, generator=gen).half().transpose(1, 2)
    k = torch.randn(b, s_max, hkv, d, generator=gen).half().transpose(1, 2)
    v = torch.randn(b, s_max, hkv, d, generator=gen).half().transpose(1, 2)
    parents = make_parents("per_row", b, t, gen)
    prefix_lens = torch.tensor([144, 3])
    out = kernels.tree_attention(q, k, v, prefix_lens, parents, 0.11, n_splits=n_splits)
    ref = reference.tree_attention(q, k, v, prefix_lens, parents, 0.11)
    assert rel_err(out, ref) < 2e-3


def test_tree_attention_ignores_cache_outside_prefix_and_tree():
    # slots past prefix + T (stale tokens of an older, longer tree) and other rows' slots must not leak in
    gen = torch.Generator().manual_seed(3)
    q, k, v = attention_inputs(2, 2, 1, 4, 64, 64, torch.float16, gen)
    prefix_lens, parents = torch.tensor([10, 20]), chain(4)
    out = eo.tree_attention(q, k, v, prefix_lens, parents, backend="triton")
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 14:], v2[0, :, 14:] = 100.0, 100.0
    k2[1, :, 24:], v2[1, :, 24:] = 100.0, 100.0
    assert torch.equal(eo.tree_attention(q, k2, v2, prefix_lens, parents, backend="triton"), out)


def test_tree_attention_bad_inputs():
    q, k, v = attention_inputs(2, 4, 2, 3, 64, 20, torch.float16, torch.Generator().manual_seed(0))
    pl, par = torch.tensor([0, 17]), chain(3)
    with pytest.raises(ValueError, match="prefix_lens"):
        eo.tree_attention(q, k, v, torch.tensor([0, 18]), par)
    with pytest.raises(ValueError, match="prefix_lens"):
        eo.tree_attention(q, k, v, torch.tensor([0]), par)
    with pytest.raises(TypeError, match="prefix_lens"):
        eo.tree_attention(q, k, v, pl.float(), par)
    with pytest.raises(ValueError, match="parents"):
        eo.tree_attention(q, k, v, pl, torch.tensor([-1, 2, 0]))
    with pytest.raises(ValueError, match="parents"):
        eo.tree_attention(q, k, v, pl, chain(4))
    with pytest.raises(ValueError, match="query heads"):
        eo.tree_attention(q[:, :3], k, v, pl, par)
    with pytest.raises(TypeError, match="v_cache"):
        eo.tree_attention(q, k, v.float(), pl, par)
    with pytest.raises(ValueError, match="v_cache"):
        eo.tree_attention(q, k, v[:, :, :10], pl, par)
    with pytest.raises(ValueError, match="k_cache"):
        eo.tree_attention(q, k[:1], v[:1], pl, par)
    with pytest.raises(ValueError, match="S_max"):
        eo.tree_attention(q, k[:, :, :2], v[:, :, :2], pl, par)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        eo.tree_attention(q, k, v, pl, par, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="float16/bfloat16"):
        eo.tree_attention(q.float(), k.float(), v.float(), pl, par, backend="triton")
    with pytest.raises(BackendUnavailableError, match="head_dim"):
        eo.tree_attention(q[..., :32], k[..., :32], v[..., :32], pl, par, backend="triton")


def test_tree_attention_opcheck():
    q, k, v = attention_inputs(2, 4, 2, 3, 64, 20, torch.float32, torch.Generator().manual_seed(0))
    torch.library.opcheck(torch.ops.efficient_ops.tree_attention, (q, k, v, torch.tensor([2, 17]), chain(3)),
                          {"backend": "reference"})


# ---------------------------------------------------------------------------------------------------- merge

def attention_with_lse(q, k, v):
    s = q @ k.transpose(-1, -2)
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ v, lse


def test_merge_attention_states_equals_attention_over_the_union():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 5, 4, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(3, 5, 17, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    full, _ = attention_with_lse(q, k, v)
    o_a, lse_a = attention_with_lse(q, k[:, :, :6], v[:, :, :6])
    o_b, lse_b = attention_with_lse(q, k[:, :, 6:], v[:, :, 6:])
    o, lse = eo.merge_attention_states(o_a, lse_a.float(), o_b, lse_b.float())
    assert rel_err(o, full) < 1e-6 and lse.dtype == torch.float32
    assert torch.allclose(lse.double(), torch.logsumexp(q @ k.transpose(-1, -2), -1), atol=1e-5)


def test_merge_attention_states_empty_sides():
    o_a, o_b = torch.randn(2, 4), torch.randn(2, 4)
    inf = float("-inf")
    o, lse = eo.merge_attention_states(o_a, torch.tensor([inf, inf]), o_b, torch.tensor([0.5, inf]))
    assert torch.equal(o[0], o_b[0]) and lse[0] == 0.5
    assert torch.equal(o[1], torch.zeros(4)) and lse[1] == inf
    with pytest.raises(ValueError, match="lse_b"):
        eo.merge_attention_states(o_a, torch.zeros(2), o_b, torch.zeros(3))
    torch.library.opcheck(torch.ops.efficient_ops.merge_attention_states,
                          (o_a, torch.zeros(2), o_b, torch.ones(2)))


# ---------------------------------------------------------------------------------------------------- verify_greedy

def tree_batch(b, t, v, gen, shared=False):
    parents = make_parents("shared" if shared else "per_row", b, t, gen)
    tokens = torch.randint(0, v, (b, t), generator=gen)
    return tokens, parents


@pytest.mark.parametrize("shared", [False, True])
def test_verify_greedy_matches_the_walk(shared):
    gen = torch.Generator().manual_seed(5)
    b, t, v = 64, 12, 4  # a 4-token vocabulary: long accepted paths and duplicate sibling tokens are common
    tokens, parents = tree_batch(b, t, v, gen, shared)
    logits = torch.randn(b, t, v, generator=gen)
    got = eo.verify_greedy(tokens, parents, logits)
    want = reference.verify_greedy(tokens, parents, logits)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    accept_len, accepted, next_token = got
    assert accept_len.max() >= 2
    # the emitted tokens are the target's argmax chain
    best = logits.argmax(-1)
    for row in range(b):
        path = accepted[row, : accept_len[row] + 1]
        for a, c in zip(path[:-1], path[1:]):
            assert tokens[row, c] == best[row, a]
        assert next_token[row] == best[row, path[-1]]


def test_verify_bad_inputs():
    tokens, parents = torch.zeros(2, 3, dtype=torch.long), chain(3)
    logits = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match="target_logits"):
        eo.verify_greedy(tokens, parents, logits[:, :2])
    with pytest.raises(ValueError, match="tokens"):
        eo.verify_greedy(tokens + 5, parents, logits)
    with pytest.raises(TypeError, match="tokens"):
        eo.verify_greedy(tokens.float(), parents, logits)
    with pytest.raises(ValueError, match="parents"):
        eo.verify_greedy(tokens, torch.tensor([0, 0, 1]), logits)
    with pytest.raises(ValueError, match="mode"):
        eo.verify_sampling(tokens, parents, logits, logits, mode="typical")
    with pytest.raises(ValueError, match="draft_probs"):
        eo.verify_sampling(tokens, parents, logits, logits[:1])


def test_verify_opcheck():
    gen = torch.Generator().manual_seed(0)
    tokens, parents = tree_batch(3, 6, 5, gen)
    probs = torch.softmax(torch.randn(3, 6, 5, generator=gen), -1)
    ops = torch.ops.efficient_ops
    # the outputs' second dimension (the tree depth) depends on the data: no compile test of those
    torch.library.opcheck(ops.verify_greedy, (tokens, parents, probs), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.verify_typical, (tokens, parents, probs), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.verify_sampling, (tokens, parents, probs, probs, "iid"),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------------- verify_sampling

@pytest.mark.parametrize("backend, b, v", [("reference", 200, 5), ("triton", 40, 37), ("triton", 5, 5000)])
@pytest.mark.parametrize("mode", ["iid", "without_replacement", "deterministic"])
def test_verify_sampling_equals_walk_with_the_same_uniforms(mode, backend, b, v):
    # the triton case with V = 5000 runs the kernel's passes over V in two chunks
    gen = torch.Generator().manual_seed(11)
    t = 10
    tokens, parents = tree_batch(b, t, v, gen)
    target = torch.softmax(2 * torch.randn(b, t, v, generator=gen), -1)
    draft = torch.softmax(2 * torch.randn(b, t, v, generator=gen), -1)
    target[:7, :, 2] = 0  # zero-probability tokens and a draft that puts all mass on one token
    target[:7] /= target[:7].sum(-1, keepdim=True)
    draft[:3] = F.one_hot(tokens[:3], v).double()
    u_accept = torch.rand(b, t, generator=gen, dtype=torch.float64)
    u_final = torch.rand(b, generator=gen, dtype=torch.float64)
    got = verify_sampling_with_uniforms(tokens, parents.long(), target, draft, mode, u_accept, u_final, backend)
    want = reference.verify_sampling(tokens, parents, target, draft, mode, u_accept, u_final)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    if v < 100:
        assert 0 < (got[0] > 0).float().mean() < 1


V = 5
PARENTS_2x3 = torch.tensor([-1, 0, 0, 0, 1, 1, 2, 2, 3, 3])  # 3 children of the root, 2 under each


def language_models(seed):
    """A target and a draft two-step model over V tokens: first-token distributions [V] and next-token
    distributions [V, V] (given the first) and [V, V, V] (given the first two)."""
    gen = torch.Generator().manual_seed(seed)

    def dist(*shape, temperature):
        return torch.softmax(torch.randn(*shape, V, generator=gen, dtype=torch.float64) / temperature, -1)

    target = (dist(temperature=1.0), dist(V, temperature=1.0), dist(V, V, temperature=1.0))
    draft = (dist(temperature=0.7), dist(V, temperature=0.7), dist(V, V, temperature=0.7))
    return target, draft


def draw_trees(n, target, draft, drawing, gen):
    """n draft trees (PARENTS_2x3) whose children are drawn from the draft as ``drawing`` says, with the
    target's and the draft's distribution at every node."""
    def children(q, k):  # q [n, V] -> [n, k] tokens
        if drawing == "iid":
            return torch.multinomial(q, k, replacement=True, generator=gen)
        if drawing == "without_replacement":
            return torch.multinomial(q, k, replacement=False, generator=gen)
        return q.topk(k, -1).indices

    p0, p1, p2 = target
    q0, q1, q2 = draft
    first = children(q0.expand(n, V), 3)  # nodes 1..3
    second = torch.cat([children(q1[first[:, i]], 2) for i in range(3)], 1)  # nodes 4..9
    tokens = torch.cat([torch.zeros(n, 1, dtype=torch.long), first, second], 1)
    parent_token = first[:, [0, 0, 1, 1, 2, 2]]
    target_probs = torch.cat([p0.expand(n, 1, V), p1[first], p2[parent_token, second]], 1)
    draft_probs = torch.cat([q0.expand(n, 1, V), q1[first], q2[parent_token, second]], 1)
    return tokens, target_probs, draft_probs


def first_two_emitted(tokens, accept_len, accepted, next_token, target, gen):
    """The first two emitted tokens per draw; a draw that emitted only one continues from the target."""
    n = tokens.shape[0]
    rows = torch.arange(n)
    emitted = tokens[rows[:, None], accepted[:, 1:3].clamp_min(0)]
    emitted[:, 0] = torch.where(accept_len >= 1, emitted[:, 0], next_token)
    emitted[:, 1] = torch.where(accept_len >= 2, emitted[:, 1], next_token)
    short = accept_len == 0
    emitted[short, 1] = torch.multinomial(target[1][emitted[short, 0]], 1, generator=gen)[:, 0]
    return emitted


def chi_square_p(counts, probs):
    """p-value of Pearson's chi-square goodness of fit (cells with zero expectation must be empty)."""
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = keep.sum() - 1
    return float(torch.special.gammaincc(dof / 2.0, stat / 2.0))


DRAWS = 100_000
P_MIN = 1e-3  # seeded, so each test is deterministic; a correct rule passes at any seed with probability 0.999


def emitted_distribution_p_values(verify, drawing, seed):
    target, draft = language_models(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    tokens, target_probs, draft_probs = draw_trees(DRAWS, target, draft, drawing, gen)
    accept_len, accepted, next_token = verify(tokens, PARENTS_2x3, target_probs, draft_probs, gen)
    emitted = first_two_emitted(tokens, accept_len, accepted, next_token, target, gen)
    joint = target[0][:, None] * target[1]
    p_first = chi_square_p(torch.bincount(emitted[:, 0], minlength=V).double(), target[0])
    p_pair = chi_square_p(torch.bincount(emitted[:, 0] * V + emitted[:, 1], minlength=V * V).double(),
                          joint.flatten())
    return p_first, p_pair, accept_len.double().mean().item()


@pytest.mark.parametrize("mode", ["iid", "without_replacement", "deterministic"])
def test_verify_sampling_is_lossless(mode):
    def verify(tokens, parents, p, q, gen):
        return eo.verify_sampling(tokens, parents, p, q, mode=mode, generator=gen)

    p_first, p_pair, mean_accepted = emitted_distribution_p_values(verify, mode, seed=100)
    assert p_first > P_MIN and p_pair > P_MIN, (p_first, p_pair)
    assert mean_accepted > 0.5  # the drafts are good enough that the tree part matters


@pytest.mark.parametrize("mode, drawing", [("iid", "without_replacement"), ("iid", "deterministic"),
                                           ("without_replacement", "iid")])
def test_chi_square_rejects_a_rule_that_does_not_match_the_drafting(mode, drawing):
    # (The deterministic rule never reads q: it is lossless whatever the children are, so it is not here.)
    def verify(tokens, parents, p, q, gen):
        return eo.verify_sampling(tokens, parents, p, q, mode=mode, generator=gen)

    p_first, p_pair, _ = emitted_distribution_p_values(verify, drawing, seed=100)
    assert min(p_first, p_pair) < 1e-6, (p_first, p_pair)


def test_chi_square_rejects_a_rule_that_skips_the_residual():
    # The classic bug, written out at depth 1: accept child x with probability min(1, p/q), but when every
    # child is rejected draw the next token from p itself instead of the residual norm(max(0, p - q)).
    def wrong(tokens, parents, p, q, gen):
        n = tokens.shape[0]
        u = torch.rand(n, 3, generator=gen, dtype=torch.float64)
        accept_len = torch.zeros(n, dtype=torch.long)
        accepted = torch.full((n, 3), -1)
        accepted[:, 0] = 0
        decided = torch.zeros(n, dtype=torch.bool)
        rows = torch.arange(n)
        for c in (1, 2, 3):  # depth 1 only: accept the first child that passes the ratio test
            x = tokens[:, c]
            ok = ~decided & (u[:, c - 1] * q[rows, 0, x] < p[rows, 0, x])
            accepted[ok, 1] = c
            accept_len[ok] = 1
            decided |= ok
        node = torch.where(decided, accepted[:, 1], 0)
        next_token = torch.multinomial(p[rows, node], 1, generator=gen)[:, 0]
        return accept_len, accepted, next_token

    p_first, p_pair, _ = emitted_distribution_p_values(wrong, "iid", seed=100)
    assert min(p_first, p_pair) < 1e-6, (p_first, p_pair)


# ---------------------------------------------------------------------------------------------------- verify_typical

def test_verify_typical_matches_the_reference():
    gen = torch.Generator().manual_seed(9)
    b, t, v = 100, 12, 4
    tokens, parents = tree_batch(b, t, v, gen)
    probs = torch.softmax(3 * torch.randn(b, t, v, generator=gen), -1)
    got = eo.verify_typical(tokens, parents, probs, posterior_threshold=0.2, posterior_alpha=0.4)
    want = reference.verify_typical(tokens, parents, probs, 0.2, 0.4)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert 0 < (got[0] > 0).float().mean() < 1


# ---------------------------------------------------------------------------------------------------- compact_kv

def expected_compaction(cache, prefix_lens, accepted, accept_len):
    out = cache.clone()
    for b in range(cache.shape[-4]):
        for j in range(int(accept_len[b]) + 1):
            out[..., b, :, int(prefix_lens[b]) + j, :] = cache[..., b, :, int(prefix_lens[b]) + int(accepted[b, j]), :]
    return out


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("layers", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_compact_kv(backend, layers, dtype):
    gen = torch.Generator().manual_seed(2)
    b, hkv, s_max, d = 4, 2, 24, 40
    shape = (b, hkv, s_max, d) if layers is None else (layers, b, hkv, s_max, d)
    k = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    prefix_lens = torch.tensor([0, 5, 9, 3], dtype=torch.int32)
    # [0, 2, 5]: slot 2 is read while slot 2 is written (overlapping moves); a chain; a lone root; a full path
    accepted = torch.tensor([[0, 2, 5, -1], [0, 1, 2, 3], [0, -1, -1, -1], [0, 4, 9, 20]])
    accept_len = torch.tensor([2, 3, 0, 3])
    want_k = expected_compaction(k, prefix_lens, accepted, accept_len)
    want_v = expected_compaction(v, prefix_lens, accepted, accept_len)
    new_lens = eo.compact_kv(k, v, prefix_lens, accepted, accept_len, backend=backend)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
    assert new_lens.dtype == torch.int32 and new_lens.tolist() == [3, 9, 10, 7]


def test_compact_kv_bad_inputs():
    k = torch.zeros(2, 1, 10, 8)
    pl, acc, al = torch.tensor([0, 2]), torch.tensor([[0, 3, -1], [0, 1, 2]]), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="accept_len"):
        eo.compact_kv(k, k.clone(), pl, acc, torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="accepted_nodes"):
        eo.compact_kv(k, k.clone(), pl, torch.tensor([[0, 3, -1], [0, 2, 1]]), al)
    with pytest.raises(ValueError, match="accepted_nodes"):
        eo.compact_kv(k, k.clone(), pl, torch.tensor([[1, 3, -1], [0, 1, 2]]), al)
    with pytest.raises(ValueError, match="prefix_lens"):
        eo.compact_kv(k, k.clone(), torch.tensor([0, 8]), acc, al)
    with pytest.raises(ValueError, match="v_cache"):
        eo.compact_kv(k, k[:, :, :9].clone(), pl, acc, al)
    with pytest.raises(TypeError, match="accept_len"):
        eo.compact_kv(k, k.clone(), pl, acc, al.float())
    with pytest.raises(BackendUnavailableError, match="cuda"):
        eo.compact_kv(k, k.clone(), pl, acc, al, backend="cuda")


def test_compact_kv_opcheck():
    k = torch.randn(2, 2, 1, 10, 8)
    args = (k, k.clone(), torch.tensor([0, 2]), torch.tensor([[0, 3, -1], [0, 1, 2]]), torch.tensor([1, 2]))
    torch.library.opcheck(torch.ops.efficient_ops.compact_kv, args, {"backend": "reference"})


@pytest.mark.skipif(eo.backends.extension() is None or torch.cuda.is_available(),
                    reason="needs efficient_ops._C and no GPU (the launch must fail)")
def test_cuda_runners_pass_the_extension_checks(fake_cuda_launch):
    """The ops' cuda runners on CPU tensors: the real bindings accept their keyword arguments and every size,
    stride and pointer check, and only the kernel launch fails (no GPU)."""
    from efficient_ops.ops import speculative as ops

    gen = torch.Generator().manual_seed(0)
    q, k, v = attention_inputs(2, 8, 2, 16, 128, 600, torch.bfloat16, gen)
    parents = make_parents("per_row", 2, 16, gen)
    with pytest.raises(RuntimeError, match="tree_attention: CUDA launch failed"):
        ops._run_tree_attention_cuda(q, k, v, torch.tensor([500, 3]), parents, 0.088)
    k5 = torch.zeros(3, 2, 2, 40, 128, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="compact_kv: CUDA launch failed"):
        ops._run_compact_kv_cuda(k5, k5.clone(), torch.tensor([0, 5]), torch.tensor([[0, 2, 5], [0, 1, -1]]),
                                 torch.tensor([2, 1]))


def test_tree_attention_and_compact_kv_under_torch_compile():
    gen = torch.Generator().manual_seed(0)
    q, k, v = attention_inputs(2, 4, 2, 5, 16, 30, torch.float32, gen)
    parents, prefix_lens = make_parents("per_row", 2, 5, gen), torch.tensor([3, 25])

    def step(q, k, v):
        o = eo.tree_attention(q, k, v, prefix_lens, parents, backend="reference")
        new = eo.compact_kv(k, v, prefix_lens, torch.tensor([[0, 2, -1], [0, 1, 4]]), torch.tensor([1, 2]),
                            backend="reference")
        return o, new

    want_k, want_v = k.clone(), v.clone()
    want = step(q, want_k, want_v)
    got = torch.compile(step, fullgraph=True)(q, k, v)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
