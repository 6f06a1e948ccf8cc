"""Drafters and tree policies of the speculative pipeline, against brute-force Python walks and the draft
model's own forward passes (CPU, tiny random Llama configs)."""

import copy
import itertools
import math

import pytest
import torch

import efficient_ops
from efficient_ops.pipelines.speculative.drafters import (
    DraftModelDrafter,
    PromptLookupDrafter,
    TokenRecyclingDrafter,
    self_drafter,
)
from efficient_ops.pipelines.speculative.protocol import DraftTree, Sampling
from efficient_ops.pipelines.speculative.trees import (
    DynamicTree,
    chain,
    ranked_tree,
    select_top_nodes,
    static_tree,
    stop_deepening,
)

transformers = pytest.importorskip("transformers")

GREEDY = Sampling()


def tiny_llama(vocab=48, seed=0, layers=2, hidden=32):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512)
    return transformers.LlamaForCausalLM(cfg).eval()


def node_paths(tokens, parents):
    """Root-to-node token paths (root excluded) of one row, by brute-force parent walks."""
    paths = []
    for i in range(len(tokens)):
        path, node = [], i
        while node > 0:
            path.append(int(tokens[node]))
            node = int(parents[node])
        paths.append(tuple(reversed(path)))
    return paths


def left_pad(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    return ids, mask


def history_of(rows, extra=16):
    hist = torch.zeros(len(rows), max(len(r) for r in rows) + extra, dtype=torch.long)
    for b, r in enumerate(rows):
        hist[b, :len(r)] = torch.tensor(r)
    return hist, torch.tensor([len(r) for r in rows])


# ------------------------------------------------------------------------------------------------ trees

def test_chain_and_static_trees_are_valid():
    assert chain(1).parents.tolist() == [-1]
    assert chain(4).parents.tolist() == [-1, 0, 1, 2]
    tree = static_tree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 2, 3]
    assert tree.ranks.tolist() == [0, 0, 1, 0, 1, 0, 0]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 2, 3]
    for sub in (tree.truncate(4), tree.up_to_depth(2), tree.up_to_depth(1)):
        efficient_ops.validate_parents(sub.parents)
    assert tree.up_to_depth(1).parents.tolist() == [-1, 0, 0]
    assert tree.truncate(3).num_nodes == 3


@pytest.mark.parametrize("choices, match", [([[0, 0]], "before its parent"), ([[0], [0]], "twice"),
                                            ([[-1]], "ranks >= 0"), ([[]], "non-empty")])
def test_static_tree_rejects_bad_choices(choices, match):
    with pytest.raises(ValueError, match="choices"):
        static_tree(choices)
    with pytest.raises(ValueError, match=match):
        static_tree(choices)


def test_ranked_tree_picks_the_most_probable_paths():
    probs = [0.6, 0.2, 0.1]
    for n, max_depth in ((1, None), (10, None), (25, 3)):
        tree = ranked_tree(probs, n, max_depth)
        efficient_ops.validate_parents(tree.parents)
        assert tree.num_nodes == n
        # brute force: every rank path up to depth 6, the n - 1 largest products
        paths = [p for d in range(1, (max_depth or 6) + 1) for p in itertools.product(range(3), repeat=d)]
        value = sorted((math.prod(probs[r] for r in p) for p in paths), reverse=True)[: n - 1]
        got = []
        for i in range(1, n):  # the tree's own paths, by parent walks
            ranks, node = [], i
            while node > 0:
                ranks.append(probs[int(tree.ranks[node])])
                node = int(tree.parents[node])
            got.append(math.prod(ranks))
        assert got == pytest.approx(value)
        # best-first: every prefix is the best smaller tree
        assert all(a >= b * (1 - 1e-9) for a, b in zip(got, got[1:]))


def test_select_top_nodes_keeps_ancestors_and_budget():
    torch.manual_seed(1)
    b, n = 3, 30
    parents = torch.full((b, n), -1)
    scores = torch.zeros(b, n)
    for i in range(n):  # a random pool in topological order with non-increasing scores along paths
        p = torch.randint(-1, i, (b,)) if i else torch.full((b,), -1)
        parents[:, i] = p
        base = torch.where(p >= 0, scores.gather(1, p.clamp_min(0)[:, None])[:, 0], torch.zeros(b))
        scores[:, i] = base - torch.rand(b) * (torch.rand(b) > 0.3)  # ties (zero steps) included
    for budget in (1, 5, 12, n + 1, n + 5):
        index, tree_parents = select_top_nodes(scores, parents, budget)
        efficient_ops.validate_parents(tree_parents)
        assert tree_parents.shape[1] == min(budget, n + 1)
        for row in range(b):
            chosen = sorted(index[row].tolist())
            assert chosen == index[row].tolist()
            best = sorted(range(n), key=lambda i: (-float(scores[row, i]), i))[: budget - 1]
            assert chosen == sorted(best)


class PathModel:
    """A fake draft whose next-token log-probabilities are a fixed function of the whole path from the root,
    so a wrong ``attend`` (ancestry) gives different trees."""

    def __init__(self, vocab, seed=0):
        self.vocab = vocab
        self.g = torch.Generator().manual_seed(seed)
        self.table = {}
        self.fed = None

    def logprobs(self, path):
        if path not in self.table:
            self.table[path] = (torch.randn(self.vocab, generator=self.g) * 2).log_softmax(-1)
        return self.table[path]

    def expand(self, tokens, attend, depth):
        b, k = tokens.shape
        self.fed = tokens if self.fed is None else torch.cat([self.fed, tokens], 1)
        out = torch.empty(b, k, self.vocab)
        for row in range(b):
            for j in range(k):
                path = (row,) + tuple(self.fed[row][attend[row, j]].tolist())
                assert len(path) == depth + 1
                out[row, j] = self.logprobs(path)
        return out


def eagle2_brute_force(model, rows, topk, depth, num_nodes, stop_threshold=None):
    """EAGLE-2 by hand, rows in lockstep: pools of (score, path), the frontier the topk best candidates of the
    last depth, rerank at the end. Deepening stops when every row's frontier can no longer enter its final
    tree, or (adaptive stop) when every row's best path predicts a rejection risk above the threshold."""
    pools, frontiers = [], []
    for row in rows:
        pools.append([(float(s), (int(t),)) for s, t in zip(*model.logprobs((row,)).topk(topk))])
        frontiers.append(pools[-1][:])
    for _ in range(2, depth + 1):
        hopeless = [len(pool) >= num_nodes - 1 and max(s for s, _ in fr) <= sorted(s for s, _ in pool)[-(num_nodes - 1)]
                    for pool, fr in zip(pools, frontiers)]
        risky = [stop_threshold is not None and 1 - math.exp(max(s for s, _ in fr)) > stop_threshold
                 for fr in frontiers]
        if all(hopeless) or all(risky):
            break
        for r, row in enumerate(rows):
            cands = []
            for s, path in frontiers[r]:
                lp = model.logprobs((row,) + path)
                cands += [(s + float(c), path + (int(t),)) for c, t in zip(*lp.topk(topk))]
            pools[r] += cands
            frontiers[r] = sorted(cands, key=lambda x: -x[0])[:topk]
    result = []
    for pool in pools:
        best = sorted(range(len(pool)), key=lambda i: (-pool[i][0], i))[: num_nodes - 1]
        result.append(sorted(pool[i][1] for i in best))
    return result


@pytest.mark.parametrize("topk, depth, num_nodes, stop", [(3, 4, 12, None), (4, 5, 30, None), (2, 6, 8, None),
                                                          (3, 6, 40, 0.9), (5, 1, 6, None)])
def test_dynamic_tree_matches_brute_force_eagle2(topk, depth, num_nodes, stop):
    vocab, b = 17, 3
    model = PathModel(vocab)
    root = torch.stack([model.logprobs((row,)) for row in range(b)])
    tokens, parents = DynamicTree(topk, depth, stop).grow(root, model.expand, num_nodes)
    efficient_ops.validate_parents(parents)
    assert tokens.shape == parents.shape and tokens.shape[1] <= num_nodes
    expect = eagle2_brute_force(model, range(b), topk, depth, num_nodes, stop)
    for row in range(b):
        assert sorted(node_paths(tokens[row], parents[row])[1:]) == expect[row]


def test_stop_deepening():
    lp = torch.tensor([[math.log(0.5), math.log(0.2)], [math.log(0.9), -5.0]])
    assert stop_deepening(lp, None) is False
    assert stop_deepening(lp, 0.6) is False  # row 1 still predicts only a 10% rejection risk
    assert stop_deepening(lp, 0.05) is True
    with pytest.raises(ValueError, match="stop_threshold"):
        DynamicTree(stop_threshold=1.5)


# ------------------------------------------------------------------------------------------------ prompt lookup

def prompt_lookup_brute_force(seq, max_ngram, min_ngram, num_tokens, num_matches, max_nodes):
    """Longest n-gram suffix match, most recent matches first, merged into a trie listed match by match."""
    cands = []
    for n in range(max_ngram, min_ngram - 1, -1):
        if len(seq) < n + 1:
            continue
        suffix = seq[-n:]
        starts = [j for j in range(len(seq) - n) if seq[j:j + n] == suffix]
        if starts:
            cands = [seq[j + n: j + n + num_tokens] for j in sorted(starts, reverse=True)[:num_matches]]
            break
    nodes = {(): 0}
    tokens, parents = [seq[-1]], [-1]
    for cand in cands:
        for d in range(1, len(cand) + 1):
            if tuple(cand[:d]) not in nodes and len(tokens) < max_nodes:
                nodes[tuple(cand[:d])] = len(tokens)
                tokens.append(cand[d - 1])
                parents.append(nodes[tuple(cand[:d - 1])])
    return tokens, parents


@pytest.mark.parametrize("max_ngram, min_ngram, num_tokens, num_matches, max_nodes",
                         [(3, 1, 5, 4, 16), (2, 2, 10, 1, 11), (4, 1, 3, 6, 9), (3, 2, 4, 3, 4), (1, 1, 2, 2, 1)])
def test_prompt_lookup_matches_brute_force(max_ngram, min_ngram, num_tokens, num_matches, max_nodes):
    g = torch.Generator().manual_seed(max_ngram * 100 + num_matches)
    drafter = PromptLookupDrafter(max_ngram, min_ngram, num_tokens, num_matches)
    for trial in range(6):
        rows = [torch.randint(0, 4 + trial, (int(torch.randint(1, 40, (1,), generator=g)),),
                              generator=g).tolist() for _ in range(4)]
        hist, lengths = history_of(rows, extra=int(torch.randint(0, 5, (1,), generator=g)))
        tree = drafter.propose(hist, lengths, max_nodes, GREEDY)
        efficient_ops.validate_parents(tree.parents)
        assert tree.mode == "deterministic" and tree.num_nodes <= max_nodes
        width = 1
        for b, seq in enumerate(rows):
            tokens, parents = prompt_lookup_brute_force(seq, max_ngram, min_ngram, num_tokens, num_matches, max_nodes)
            width = max(width, len(tokens))
            t = len(tokens)
            assert tree.tokens[b, :t].tolist() == tokens and tree.parents[b, :t].tolist() == parents
            # filler: children of the root carrying the root token
            assert (tree.tokens[b, t:] == seq[-1]).all() and (tree.parents[b, t:] == 0).all()
        assert tree.num_nodes == width


def test_prompt_lookup_rejects_bad_parameters():
    for kwargs, name in (({"min_ngram": 0}, "min_ngram"), ({"max_ngram": 1, "min_ngram": 2}, "max_ngram"),
                         ({"num_tokens": 0}, "num_tokens"), ({"num_matches": 0}, "num_matches")):
        with pytest.raises(ValueError, match=name):
            PromptLookupDrafter(**kwargs)


# ------------------------------------------------------------------------------------------------ token recycling

def test_token_recycling_table_update_and_tree_walk():
    vocab, k = 23, 3
    g = torch.Generator().manual_seed(3)
    tree = static_tree([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [2, 2]])
    drafter = TokenRecyclingDrafter(vocab, k=k, tree=tree, seed_from_prompt=False)
    drafter.reset(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), None)
    table = {}  # brute force: token -> its candidates, last observation wins
    for step in range(5):
        tokens = torch.randint(0, 6, (2, 7), generator=g)  # small range: repeated tokens in and across rows
        logits = torch.randn(2, 7, vocab, generator=g)
        for b in range(2):
            for i in range(7):
                table[int(tokens[b, i])] = [int(x) for x in logits[b, i].topk(k).indices]
        drafter.observe(DraftTree(tokens, chain(7).parents), logits,
                        None, None, None)
        for tok in range(vocab):
            assert drafter.table[tok].tolist() == table.get(tok, [0] * k)
        rows = [torch.randint(0, 6, (5,), generator=g).tolist() for _ in range(2)]
        hist, lengths = history_of(rows)
        for budget in (1, 4, 10, 20):
            proposal = drafter.propose(hist, lengths, budget, GREEDY)
            t = min(budget, tree.num_nodes)
            assert proposal.tokens.shape == (2, t) and proposal.parents.tolist() == tree.parents[:t].tolist()
            for b in range(2):  # brute-force walk down the table
                expect = [rows[b][-1]]
                for i in range(1, t):
                    parent_token = expect[int(tree.parents[i])]
                    expect.append(table.get(parent_token, [0] * k)[int(tree.ranks[i])])
                assert proposal.tokens[b].tolist() == expect


def test_token_recycling_seeds_unobserved_rows_from_the_prompt():
    vocab, k = 30, 4
    g = torch.Generator().manual_seed(8)
    drafter = TokenRecyclingDrafter(vocab, k=k)
    tokens = torch.randint(0, vocab, (1, 6), generator=g)
    logits = torch.randn(1, 6, vocab, generator=g)
    drafter.observe(DraftTree(tokens, chain(6).parents), logits, None, None, None)
    before = drafter.table.clone()
    rows = [torch.randint(0, 12, (n,), generator=g).tolist() for n in (9, 4, 1)]
    ids, mask = left_pad(rows)
    drafter.reset(ids, mask, None)
    expect = before.clone()
    for seq in rows:  # brute force: row-major, later bigrams win; observed rows keep the target's candidates
        for a, nxt in zip(seq, seq[1:]):
            if a not in tokens[0].tolist():
                expect[a, 0] = nxt
    assert torch.equal(drafter.table, expect)
    assert (drafter.table[:, 1:] == before[:, 1:]).all()


def test_token_recycling_table_under_2mb_at_32k_vocab():
    drafter = TokenRecyclingDrafter(32000)
    assert drafter.table.dtype == torch.int32
    assert drafter.table_bytes == drafter.table.numel() * 4 + 32000 < 2 * 1024 * 1024  # int32 table + flags
    with pytest.raises(ValueError, match="tree"):
        TokenRecyclingDrafter(100, k=2, tree=[[0], [3]])
    with pytest.raises(ValueError, match="k"):
        TokenRecyclingDrafter(100, k=0)


def test_token_recycling_takes_vocab_from_target():
    model = tiny_llama()
    drafter = TokenRecyclingDrafter()
    assert drafter.vocab_size is None
    drafter.reset(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long), model)
    assert drafter.vocab_size == 48 and drafter.table.shape == (48, drafter.k)


# ------------------------------------------------------------------------------------------------ draft model

def greedy_continuation(model, seq, n):
    out = model.generate(torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(seq):].tolist()


def test_draft_model_chain_is_its_greedy_continuation_batched_over_steps():
    model = tiny_llama()
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, 48, (n,), generator=g).tolist() for n in (5, 9, 2)]
    drafter = DraftModelDrafter(model)
    ids, mask = left_pad(rows)
    drafter.reset(ids, mask, None)
    for step in range(3):  # ragged growth between steps: the draft cache gets masked holes
        hist, lengths = history_of(rows)
        tree = drafter.propose(hist, lengths, 6, GREEDY)
        assert tree.parents.tolist() == chain(6).parents.tolist() and tree.mode == "deterministic"
        for b, seq in enumerate(rows):
            assert tree.tokens[b].tolist() == [seq[-1]] + greedy_continuation(model, seq, 5)
        rows = [seq + torch.randint(1, 48, (int(n),), generator=g).tolist() for seq, n in zip(rows, (1, 3, 0))]


@torch.no_grad()
def full_logprobs(model, seq):
    return model(torch.tensor([seq])).logits[0, -1].float().log_softmax(-1)


def test_draft_model_static_tree_ranks_follow_its_own_distribution():
    model = tiny_llama(seed=2)
    rows = [[3, 7, 1, 9], [5, 2]]
    tree_shape = static_tree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [1, 0, 2]])
    drafter = DraftModelDrafter(model, tree=tree_shape)
    ids, mask = left_pad(rows)
    drafter.reset(ids, mask, None)
    hist, lengths = history_of(rows)
    tree = drafter.propose(hist, lengths, 16, GREEDY)
    assert tree.parents.tolist() == tree_shape.parents.tolist()
    for b, seq in enumerate(rows):
        paths = node_paths(tree.tokens[b], tree.parents)
        for i in range(1, tree.num_nodes):
            parent_path = list(paths[int(tree.parents[i])])
            ranked = full_logprobs(model, seq + parent_path).topk(3).indices.tolist()
            assert int(tree.tokens[b, i]) == ranked[int(tree_shape.ranks[i])]


def test_draft_model_dynamic_tree_matches_eagle2_on_full_forwards():
    """The drafter's cached, 4-D-masked tree forwards give the same tree as EAGLE-2 over plain full forwards."""
    model = tiny_llama(seed=3)
    rows = [[4, 8, 15, 16], [23, 42, 1, 2, 3, 4]]
    drafter = DraftModelDrafter(model, tree=DynamicTree(topk=3, depth=4))
    ids, mask = left_pad(rows)
    drafter.reset(ids, mask, None)
    hist, lengths = history_of(rows)
    tree = drafter.propose(hist, lengths, 12, GREEDY)
    efficient_ops.validate_parents(tree.parents)

    class Full(PathModel):
        def logprobs(self, path):
            return full_logprobs(model, rows[path[0]] + list(path[1:]))

    expect = eagle2_brute_force(Full(48), range(2), 3, 4, 12)
    for b in range(2):
        assert sorted(node_paths(tree.tokens[b], tree.parents[b])[1:]) == expect[b]
        assert int(tree.tokens[b, 0]) == rows[b][-1]


def test_draft_model_iid_sampling_carries_warped_q():
    model = tiny_llama(seed=4)
    rows = [[1, 2, 3], [4, 5, 6, 7, 8]]
    sampling = Sampling(temperature=0.7, top_k=10, top_p=0.9)
    drafter = DraftModelDrafter(model, tree=[[0], [1], [0, 0], [0, 1]])
    ids, mask = left_pad(rows)
    drafter.reset(ids, mask, None)
    hist, lengths = history_of(rows)
    tree = drafter.propose(hist, lengths, 8, sampling, torch.Generator().manual_seed(0))
    assert tree.mode == "iid" and tree.draft_probs.shape == (2, 5, 48)
    for b, seq in enumerate(rows):
        for node, path in ((0, []), (1, [int(tree.tokens[b, 1])])):
            logits = model(torch.tensor([seq + path])).logits[0, -1].float() / 0.7
            kth = logits.topk(10).values[-1]
            logits = logits.masked_fill(logits < kth, -math.inf)
            probs, order = logits.softmax(-1).sort(descending=True)
            keep = (probs.cumsum(0) - probs) < 0.9  # HF's top-p: the smallest set reaching 0.9
            q = torch.zeros(48).scatter(0, order[keep], probs[keep])
            q = q / q.sum()
            torch.testing.assert_close(tree.draft_probs[b, node], q, atol=1e-5, rtol=1e-4)
        for child in range(1, 5):  # every child was drawn from a token with q > 0
            assert tree.draft_probs[b, int(tree.parents[child]), int(tree.tokens[b, child])] > 0


def test_draft_model_adaptive_stop_shortens_the_chain():
    model = tiny_llama(seed=6)
    drafter = DraftModelDrafter(model, stop_threshold=0.5)  # a random tiny model is never confident
    ids, mask = left_pad([[1, 2, 3]])
    drafter.reset(ids, mask, None)
    hist, lengths = history_of([[1, 2, 3]])
    assert drafter.propose(hist, lengths, 8, GREEDY).num_nodes == 2


def test_draft_model_rejects_bad_parameters():
    model = tiny_llama()
    with pytest.raises(ValueError, match="tree"):
        DraftModelDrafter(model, tree="bushy")
    with pytest.raises(ValueError, match="mode"):
        DraftModelDrafter(model, tree="dynamic", mode="iid")
    with pytest.raises(ValueError, match="mode"):
        DraftModelDrafter(model, mode="greedy")
    with pytest.raises(ValueError, match="stop_threshold"):
        DraftModelDrafter(model, stop_threshold=0)
    with pytest.raises(ValueError, match="num_tokens"):
        DraftModelDrafter(model, num_tokens=0)
    with pytest.raises(TypeError, match="draft_model"):
        DraftModelDrafter(torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="reset"):
        DraftModelDrafter(model).propose(*history_of([[1, 2]]), 4, GREEDY)
    assert DraftModelDrafter(model).vocab_size == 48


def test_self_drafter_quantizes_a_copy():
    target = tiny_llama(hidden=64)
    drafter = self_drafter(target, bits=4, group_size=32)
    assert drafter.model is not target
    assert any(isinstance(m, efficient_ops.nn.QuantLinear) for m in drafter.model.modules())
    assert not any(isinstance(m, efficient_ops.nn.QuantLinear) for m in target.modules())
    ids, mask = left_pad([[1, 2, 3, 4]])
    drafter.reset(ids, mask, target)
    tree = drafter.propose(*history_of([[1, 2, 3, 4]]), 5, GREEDY)
    assert tree.tokens[0].tolist() == [4] + greedy_continuation(drafter.model, [1, 2, 3, 4], 4)
    with pytest.raises(ValueError, match="calib_batches"):
        self_drafter(target, sparsity=0.5)


# ------------------------------------------------------------------------------------------------ through generate

def all_drafters(target, draft):
    return {"prompt_lookup": PromptLookupDrafter(), "token_recycling": TokenRecyclingDrafter(),
            "draft_chain_adaptive": DraftModelDrafter(draft, stop_threshold=0.7),
            "draft_static": DraftModelDrafter(draft, tree="static"),
            "draft_dynamic": DraftModelDrafter(draft, tree=DynamicTree(topk=3, depth=4)),
            "self_4bit": self_drafter(target, bits=4, group_size=32)}


def test_generate_with_every_drafter_equals_hf_greedy_batched():
    from efficient_ops.pipelines.speculative import generate

    target, draft = tiny_llama(seed=0, hidden=64), tiny_llama(seed=1, layers=1)
    rows = [[5, 9, 5, 9, 5, 9, 2, 3], [7, 1, 7, 1, 7], [3, 4, 8, 11, 3, 4, 8, 30, 12, 3, 4]]
    ids, mask = left_pad(rows)
    alone = [greedy_continuation(target, seq, 12) for seq in rows]
    for name, drafter in all_drafters(target, draft).items():
        out = generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=12, max_nodes=8,
                       pad_token_id=0, eos_token_id=[])
        assert out.sequences[:, ids.shape[1]:].tolist() == alone, name
        assert out.stats.target_forwards <= 13, name


def test_generate_sampling_with_draft_models_runs():
    from efficient_ops.pipelines.speculative import generate

    target, draft = tiny_llama(seed=0), tiny_llama(seed=1, layers=1)
    ids, mask = left_pad([[1, 2, 3], [4, 5, 6, 7, 8]])
    for drafter in (DraftModelDrafter(draft, tree="static"), DraftModelDrafter(draft, tree="dynamic"),
                    DraftModelDrafter(copy.deepcopy(target))):
        out = generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=10, max_nodes=6,
                       do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                       generator=torch.Generator().manual_seed(0), pad_token_id=0, eos_token_id=[])
        assert out.sequences.shape == (2, ids.shape[1] + 10)
        assert ((out.sequences >= 0) & (out.sequences < 48)).all()
