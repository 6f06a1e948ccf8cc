"""Fuzz: draft trees (helpers), tree attention, attention-state merging, verification and KV compaction."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

import efficient_ops as eo

from ._helpers import (
    all_backends,
    assert_close,
    expect_clear_error,
    generator,
    randn,
    seeds,
)


@st.composite
def trees(draw, max_nodes=12):
    """A parent array in topological order: node i's parent is any earlier node."""
    t = draw(st.integers(1, max_nodes))
    return torch.tensor([-1] + [draw(st.integers(0, i - 1)) for i in range(1, t)])


def ancestors(parents):
    """Brute force: node i's ancestors and itself, as sets."""
    out = []
    for i in range(len(parents)):
        chain, node = set(), i
        while node != -1:
            chain.add(node)
            node = int(parents[node])
        out.append(chain)
    return out


@given(parents=trees())
def test_tree_helpers(parents):
    anc = ancestors(parents)
    mask = eo.tree_mask(parents)[0]
    assert all(bool(mask[i, j]) == (j in anc[i]) for i in range(len(anc)) for j in range(len(anc)))
    assert eo.tree_depths(parents)[0].tolist() == [len(a) - 1 for a in anc]
    leaves = [i for i in range(len(anc)) if i not in set(parents[1:].tolist())]
    paths = eo.tree_paths(parents)[0].tolist()
    assert [[n for n in p if n >= 0][-1] for p in paths] == leaves
    assert all([n for n in p if n >= 0] == sorted(anc[p_leaf]) for p, p_leaf in zip(paths, leaves))
    assert eo.tree_positions(parents, torch.tensor([7]))[0].tolist() == [7 + len(a) - 1 for a in anc]


def sdpa_tree(q, k, v, prefix, parents):
    b, hq, t, _ = q.shape
    anc = ancestors(parents)
    allowed = torch.zeros(b, 1, t, k.shape[2], dtype=torch.bool)
    for i in range(b):
        p = int(prefix[i])
        allowed[i, 0, :, :p] = True
        for node, chain in enumerate(anc):
            allowed[i, 0, node, [p + j for j in chain]] = True
    g = hq // k.shape[1]
    return F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(g, 1),
                                          v.double().repeat_interleave(g, 1), attn_mask=allowed)


@pytest.mark.parametrize("backend", all_backends())
@given(parents=trees(), b=st.integers(1, 3), hkv=st.integers(1, 2), group=st.sampled_from([1, 4]),
       spare=st.integers(0, 40), nan_tail=st.booleans(), seed=seeds)
def test_tree_attention_matches_sdpa(backend, parents, b, hkv, group, spare, nan_tail, seed):
    dtype = torch.float32 if backend == "reference" else torch.float16
    t = parents.numel()
    g = generator(seed)
    s_max = t + spare
    prefix = torch.randint(0, spare + 1, (b,), generator=g)
    q = randn((b, hkv * group, t, 64), dtype, g)
    k, v = randn((b, hkv, s_max, 64), dtype, g), randn((b, hkv, s_max, 64), dtype, g)
    ref = sdpa_tree(q, k, v, prefix, parents)
    if nan_tail:  # slots past the tree are never read
        past = (torch.arange(s_max)[None, :] >= (prefix + t)[:, None])[:, None, :, None]
        k, v = k.masked_fill(past, float("nan")), v.masked_fill(past, float("nan"))
    assert_close(eo.tree_attention(q, k, v, prefix, parents, backend=backend), ref, dtype, what=backend)


@given(rows=st.integers(1, 6), keys=st.integers(1, 30), empty_side=st.sampled_from([None, "a", "b"]), seed=seeds)
def test_merge_equals_attention_over_the_union(rows, keys, empty_side, seed):
    g = generator(seed)
    scores, values = randn((rows, keys), torch.float64, g) * 3, randn((keys, 8), torch.float64, g)
    side = torch.rand(keys, generator=g) < 0.5
    if empty_side == "a":
        side[:] = False
    elif empty_side == "b":
        side[:] = True

    def part(sel):
        if not sel.any():  # no keys: lse -inf, and the output is garbage that must not be used
            return torch.full((rows, 8), float("nan")), torch.full((rows,), float("-inf"))
        s = scores[:, sel]
        return (torch.softmax(s, -1) @ values[sel]).float(), torch.logsumexp(s, -1).float()

    (oa, la), (ob, lb) = part(side), part(~side)
    o, lse = eo.merge_attention_states(oa, la, ob, lb)
    assert_close(o, torch.softmax(scores, -1) @ values, torch.float32, factor=10)
    assert_close(lse, torch.logsumexp(scores, -1), torch.float32, factor=10)


def greedy_walk(tokens, parents, logits):
    """Independent: from the root, take the first child whose token is the row's argmax."""
    kids = [[c for c in range(len(parents)) if int(parents[c]) == n] for n in range(len(parents))]
    node, path = 0, [0]
    while True:
        best = int(logits[node].argmax())
        child = next((c for c in kids[node] if int(tokens[c]) == best), None)
        if child is None:
            return len(path) - 1, path, best
        node = child
        path.append(child)


@given(parents=trees(), b=st.integers(1, 3), vocab=st.integers(2, 6), seed=seeds)
def test_verify_greedy_matches_walk(parents, b, vocab, seed):
    g = generator(seed)
    t = parents.numel()
    tokens = torch.randint(0, vocab, (b, t), generator=g)
    logits = randn((b, t, vocab), torch.float32, g)
    accept_len, accepted, nxt = eo.verify_greedy(tokens, parents, logits)
    for row in range(b):
        n, path, best = greedy_walk(tokens[row], parents, logits[row])
        assert int(accept_len[row]) == n and int(nxt[row]) == best
        assert [x for x in accepted[row].tolist() if x >= 0] == path


@st.composite
def distributions(draw, shape, seed):
    """Probability rows with exact zeros (top-k style truncation) sometimes."""
    g = generator(seed)
    p = torch.softmax(randn(shape, torch.float64, g) * draw(st.sampled_from([0.5, 2.0, 8.0])), -1)
    if draw(st.booleans()):
        p = torch.where(p >= p.topk(min(2, shape[-1]), -1).values[..., -1:], p, 0.0)
        p = p / p.sum(-1, keepdim=True)
    return p.float()


@pytest.mark.parametrize("mode", ["iid", "without_replacement", "deterministic"])
@given(parents=trees(8), b=st.integers(1, 3), vocab=st.integers(2, 8), same=st.booleans(), seed=seeds,
       data=st.data())
def test_verify_sampling_backends_agree(mode, parents, b, vocab, same, seed, data):
    """With the same generator, every backend accepts the same path and draws the same next token."""
    t = parents.numel()
    tokens = torch.randint(0, vocab, (b, t), generator=generator(seed))
    p = data.draw(distributions((b, t, vocab), seed))
    q = p.clone() if same else data.draw(distributions((b, t, vocab), seed + 1))
    results = [eo.verify_sampling(tokens, parents, p, q, mode, generator=generator(seed), backend=bk)
               for bk in all_backends()]
    for other in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(results[0], other))
    nxt = results[0][2]
    assert ((nxt >= 0) & (nxt < vocab)).all()


@given(parents=trees(), b=st.integers(1, 3), vocab=st.integers(2, 6), threshold=st.floats(0, 1),
       alpha=st.floats(0, 1), seed=seeds, data=st.data())
def test_verify_typical_matches_walk(parents, b, vocab, threshold, alpha, seed, data):
    t = parents.numel()
    tokens = torch.randint(0, vocab, (b, t), generator=generator(seed))
    p = data.draw(distributions((b, t, vocab), seed)).double()
    accept_len, accepted, nxt = eo.verify_typical(tokens, parents, p, threshold, alpha)
    anc = ancestors(parents)
    for row in range(b):
        ent = -(p[row] * p[row].clamp_min(1e-30).log()).sum(-1)
        cut = torch.minimum(torch.full_like(ent, threshold), alpha * torch.exp(-ent))
        ok = [all(float(p[row, int(parents[c]), int(tokens[row, c])]) > float(cut[int(parents[c])])
                  for c in anc[n] if c != 0) for n in range(t)]
        best = max(range(t), key=lambda n: (ok[n], len(anc[n]), -n))
        assert int(accept_len[row]) == len(anc[best]) - 1
        assert [x for x in accepted[row].tolist() if x >= 0] == sorted(anc[best])
        assert int(nxt[row]) == int(p[row, best].argmax())


@pytest.mark.parametrize("backend", all_backends())
@given(parents=trees(8), layers=st.sampled_from([None, 2]), b=st.integers(1, 3), spare=st.integers(0, 10),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=seeds, data=st.data())
def test_compact_kv_matches_gather(backend, parents, layers, b, spare, dtype, seed, data):
    t = parents.numel()
    anc = ancestors(parents)
    g = generator(seed)
    s_max = t + spare
    prefix = torch.randint(0, spare + 1, (b,), generator=g)
    lead = (layers,) if layers else ()
    k, v = randn((*lead, b, 2, s_max, 8), dtype, g), randn((*lead, b, 2, s_max, 8), dtype, g)
    nodes = [data.draw(st.integers(0, t - 1)) for _ in range(b)]
    depth = max(len(a) for a in anc)
    accepted = torch.full((b, depth), -1)
    for row, n in enumerate(nodes):
        accepted[row, :len(anc[n])] = torch.tensor(sorted(anc[n]))
    accept_len = torch.tensor([len(anc[n]) - 1 for n in nodes])
    ek, ev = k.clone(), v.clone()
    for row in range(b):
        src = int(prefix[row]) + torch.tensor(sorted(anc[nodes[row]]))
        dst = slice(int(prefix[row]), int(prefix[row]) + len(src))
        ek[..., row, :, dst, :], ev[..., row, :, dst, :] = k[..., row, :, src, :], v[..., row, :, src, :]
    lens = eo.compact_kv(k, v, prefix, accepted, accept_len, backend=backend)
    assert torch.equal(lens, prefix + accept_len + 1)
    assert torch.equal(k, ek) and torch.equal(v, ev)


BAD = ["tokens_float", "tokens_range", "parents_order", "probs_shape", "probs_scaled", "probs_negative",
       "draft_scaled", "threshold_negative"]


@given(kind=st.sampled_from(BAD), parents=trees(6), seed=seeds)
def test_verify_bad_inputs_rejected(kind, parents, seed):
    t = parents.numel()
    assume(kind != "draft_scaled" or t > 1)  # draft rows are read only at nodes with children
    g = generator(seed)
    tokens = torch.randint(0, 5, (2, t), generator=g)
    p = torch.softmax(randn((2, t, 5), torch.float32, g), -1)
    q = torch.softmax(randn((2, t, 5), torch.float32, g), -1)
    arg = {"tokens_float": "tokens", "tokens_range": "tokens", "parents_order": "parents", "probs_shape": "target_probs",
           "probs_scaled": "target_probs", "probs_negative": "target_probs", "draft_scaled": "draft_probs",
           "threshold_negative": "posterior_threshold"}[kind]
    if kind == "tokens_float":
        tokens = tokens.float()
    elif kind == "tokens_range":
        tokens = tokens + 5
    elif kind == "parents_order":
        parents = torch.cat([parents, torch.tensor([t + 1])])
        tokens, p, q = (torch.cat([x, x[:, :1]], 1) for x in (tokens, p, q))
    elif kind == "probs_shape":
        p = p[:1]
    elif kind == "probs_scaled":
        p = p * 2
    elif kind == "probs_negative":
        p = p - 0.5
    elif kind == "draft_scaled":
        q = q * 0.5
    if kind == "threshold_negative":
        expect_clear_error(lambda: eo.verify_typical(tokens, parents, p, -0.1), arg)
        return
    for backend in all_backends():
        expect_clear_error(lambda bk=backend: eo.verify_sampling(tokens, parents, p, q, generator=g, backend=bk), arg)
    if kind not in ("draft_scaled", "probs_scaled", "probs_negative"):
        expect_clear_error(lambda: eo.verify_greedy(tokens, parents, p), arg.replace("target_probs", "target_logits"))
