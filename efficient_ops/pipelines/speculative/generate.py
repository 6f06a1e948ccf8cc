"""``generate``: speculative decoding over any Hugging Face causal LM, lossless (greedy output equals the
target's own greedy output; sampled output is distributed as the target's)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from .drafters import PromptLookupDrafter
from .protocol import Drafter, DraftTree, Sampling, check_sampling, warp
from .runner import TreeRunner, attention_swapped
from .verify import ACCEPTANCE, verify_step

MODES = ("iid", "without_replacement", "deterministic")


@dataclass
class GenerateStats:
    """``mean_accepted_length`` (tau): tokens emitted per verification forward, bonus token included, over
    the rows still generating; ``target_forwards``: every target forward (the prefill and each verification
    step); ``acceptance_histogram[k]``: how many (row, step) pairs accepted k draft tokens;
    ``new_tokens``: tokens emitted (before eos padding); ``seconds`` and ``tokens_per_second``: wall clock;
    ``draft_seconds`` / ``verify_seconds``: host wall clock in ``propose`` / the verify step (target forward,
    acceptance, compaction; on a GPU these include only what synchronised)."""

    mean_accepted_length: float = 0.0
    target_forwards: int = 0
    acceptance_histogram: List[int] = field(default_factory=list)
    new_tokens: int = 0
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    max_nodes: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    @property
    def forwards_per_token(self) -> float:
        return self.target_forwards / max(1, self.new_tokens)


@dataclass
class GenerateOutput:
    """``sequences``: ``[B, P + max_new_tokens]``, the (left-padded) prompts then the new tokens, rows that hit
    eos padded with ``pad_token_id`` (HF's layout; HF also stops early when every row has ended, this keeps
    the full width). ``stats``: :class:`GenerateStats`."""

    sequences: torch.Tensor
    stats: GenerateStats


def _as_ids(value, name) -> Optional[List[int]]:
    if value is None:
        return None
    ids = [value] if isinstance(value, int) else list(value)
    if not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ValueError(f"{name}: expected a token id or a list of token ids >= 0, got {value!r}")
    return ids


def _check_inputs(model, input_ids, attention_mask, max_new_tokens, max_nodes, acceptance):
    if not hasattr(model, "get_output_embeddings") or not hasattr(model, "config"):
        raise ValueError(f"model: expected a Hugging Face PreTrainedModel (a causal LM such as AutoModelForCausalLM "
                         f"gives), got {type(model).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected an integer tensor [B, P] with P >= 1, got "
                         f"{list(getattr(input_ids, 'shape', []))}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids: expected an integer tensor, got {input_ids.dtype}")
    device = next(model.parameters()).device
    if input_ids.device != device:
        raise ValueError(f"input_ids: on {input_ids.device}, but the model is on {device}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape or attention_mask.device != device:
        raise ValueError(f"attention_mask: expected shape {list(input_ids.shape)} on {device}, got "
                         f"{list(attention_mask.shape)} on {attention_mask.device}")
    mask = attention_mask.long()
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("attention_mask: expected 0/1 entries")
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError("attention_mask: padding must be on the left (HF's convention for generation): each row "
                         "is 0...0 1...1")
    if (mask.sum(1) == 0).any():
        raise ValueError("attention_mask: every row needs at least one prompt token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(max_nodes, int) or max_nodes < 1:
        raise ValueError(f"max_nodes: expected an integer >= 1 (the tree budget, root included), got {max_nodes!r}")
    if acceptance not in ACCEPTANCE:
        raise ValueError(f"acceptance: expected one of {ACCEPTANCE}, got {acceptance!r}")
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None \
        else model.config.get_text_config().vocab_size
    if ((input_ids < 0) | (input_ids >= vocab)).any():
        raise ValueError(f"input_ids: token ids must be in [0, {vocab}) (the target's vocabulary)")
    return mask, vocab


def _check_tree(tree: DraftTree, root: torch.Tensor, max_nodes: int, vocab: int, sampling: Sampling) -> None:
    b = root.shape[0]
    if not isinstance(tree, DraftTree):
        raise TypeError(f"drafter: propose() must return a DraftTree, got {type(tree).__name__}")
    t = tree.tokens
    if t.dim() != 2 or t.shape[0] != b or not 1 <= t.shape[1] <= max_nodes:
        raise ValueError(f"drafter: tree tokens must be [B={b}, T] with 1 <= T <= max_nodes={max_nodes}, got "
                         f"{list(t.shape)}")
    if ((t < 0) | (t >= vocab)).any():
        raise ValueError(f"drafter: tree tokens must be in [0, {vocab})")
    if (t[:, 0] != root).any():
        raise ValueError("drafter: node 0 of every tree must be the row's last token (history[b, lengths[b] - 1])")
    if tree.mode not in MODES:
        raise ValueError(f"drafter: tree mode must be one of {MODES}, got {tree.mode!r}")
    if not sampling.greedy and tree.mode != "deterministic":
        q = tree.draft_probs
        if q is None or tuple(q.shape) != (b, t.shape[1], vocab):
            raise ValueError(f"drafter: a {tree.mode!r} tree needs draft_probs [B, T, V={vocab}], got "
                             f"{None if q is None else list(q.shape)}")


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             drafter: Optional[Drafter] = None, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: Optional[torch.Generator] = None,
             eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
             max_nodes: int = 16, acceptance: str = "exact", posterior_threshold: float = 0.09,
             posterior_alpha: float = 0.3, max_cache_len: Optional[int] = None, cuda_graphs: bool = False,
             streamer=None, progress: bool = False) -> GenerateOutput:
    """Generate ``max_new_tokens`` per row with speculative decoding.

    Args:
        model: a Hugging Face causal LM (decoder-only, attention through transformers' AttentionInterface:
            Llama, Qwen2/3, Mistral, SmolLM2, ...), possibly converted by ``quantize_model`` / ``rsparsify_model``.
        input_ids, attention_mask: ``[B, P]`` prompts, left-padded (HF's convention); mask defaults to all ones.
        drafter: proposes the draft trees (default: ``PromptLookupDrafter()``).
        max_new_tokens: exactly this many new tokens per row (after eos: ``pad_token_id``).
        do_sample, temperature, top_k, top_p: as HF's ``generate`` (note HF's own default top_k is 50; here
            0 = off); applied to target and draft distributions before verification.
        generator: for every random draw (first token, acceptance tests, residual draws).
        eos_token_id, pad_token_id: default from ``model.generation_config``; pad falls back to the first eos.
        max_nodes: tree budget per step, root included (tokens verified per target forward).
        acceptance: "exact" (lossless) or "typical" (Medusa's typical acceptance with ``posterior_threshold``
            and ``posterior_alpha``; lossy, faster when sampling).
        max_cache_len: cache capacity; default just what the call needs. A smaller one raises.
        cuda_graphs: capture the target's forward over the tree once per tree size and replay it (CUDA, and
            float16/bfloat16 for the tree_attention kernels). The verify ops find the tree depth on the host,
            so verification and the one compact_kv launch run eagerly between replays.
        streamer: an HF streamer (``put`` / ``end``, e.g. ``TextStreamer``), batch 1 only.
        progress: a tqdm bar over the new tokens.
    """
    mask, vocab = _check_inputs(model, input_ids, attention_mask, max_new_tokens, max_nodes, acceptance)
    sampling = Sampling(temperature=float(temperature) if do_sample else 0.0, top_k=top_k, top_p=float(top_p))
    check_sampling(Sampling(float(temperature), top_k, float(top_p)))
    if do_sample and temperature == 0:
        raise ValueError("temperature: must be > 0 with do_sample=True (use do_sample=False for greedy)")
    drafter = PromptLookupDrafter() if drafter is None else drafter
    if getattr(drafter, "vocab_size", None) is not None and drafter.vocab_size != vocab:
        raise ValueError(f"drafter: its vocabulary has {drafter.vocab_size} tokens but the target's has {vocab}; "
                         "the drafter must share the target's tokenizer and vocabulary")
    gen_config = getattr(model, "generation_config", None)
    eos = _as_ids(eos_token_id if eos_token_id is not None else getattr(gen_config, "eos_token_id", None),
                  "eos_token_id")
    pad = pad_token_id if pad_token_id is not None else getattr(gen_config, "pad_token_id", None)
    if pad is None and eos:
        pad = eos[0]
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError("streamer: streaming needs batch size 1")

    b, p = input_ids.shape
    device = input_ids.device
    # a finished row keeps its cache but may have accepted one tree's worth past its end: 2 trees of room
    need = p + max_new_tokens + 2 * max_nodes
    if max_cache_len is not None and max_cache_len < need:
        raise ValueError(f"max_cache_len: {max_cache_len} cannot hold the longest prompt ({p}) + max_new_tokens "
                         f"({max_new_tokens}) + two trees of max_nodes ({max_nodes}) = {need}")
    runner = TreeRunner(model, b, max_cache_len or need, cuda_graphs)
    rows = torch.arange(b, device=device)
    lengths = mask.sum(1)
    # one spare last column in history and new: clipped writes land there
    history = torch.zeros(b, p + max_new_tokens + 1, dtype=torch.long, device=device)
    order = torch.argsort((mask == 0).to(torch.int8), dim=1, stable=True)
    history[:, :p] = input_ids.long().gather(1, order)
    hist_len = lengths.clone()
    new = torch.full((b, max_new_tokens + 1), pad if pad is not None else 0, dtype=torch.long, device=device)
    n_new = torch.zeros(b, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    eos_t = torch.tensor(eos or [], dtype=torch.long, device=device)
    stats = GenerateStats(max_nodes=max_nodes)
    emitted_per_step, histogram = [], torch.zeros(max_nodes, dtype=torch.long)
    bar = tqdm(total=b * max_new_tokens, desc="speculative generate", unit="tok", disable=not progress)

    def emit(tokens: torch.Tensor, count: torch.Tensor) -> None:
        """Append ``tokens[b, :count[b]]`` to every unfinished row, clipped at max_new_tokens and after eos."""
        nonlocal done
        width = tokens.shape[1]
        j = torch.arange(width, device=device)
        take = torch.where(done, 0, torch.minimum(count, max_new_tokens - n_new))
        valid = j[None, :] < take[:, None]
        if eos:
            is_eos = valid & torch.isin(tokens, eos_t)
            first = torch.where(is_eos.any(1), is_eos.long().argmax(1) + 1, take)
            take = torch.minimum(take, first)
            valid = j[None, :] < take[:, None]
            done = done | is_eos.any(1)
        new.scatter_(1, torch.where(valid, n_new[:, None] + j, max_new_tokens), tokens)
        history.scatter_(1, torch.where(valid, hist_len[:, None] + j, history.shape[1] - 1), tokens)
        n_new.add_(take)
        hist_len.add_(take)
        done = done | (n_new >= max_new_tokens)
        if streamer is not None and int(take[0]):
            streamer.put(tokens[0, : int(take[0])].cpu())
        bar.update(int(take.sum()))

    start = time.perf_counter()
    with attention_swapped(model):
        drafter.reset(input_ids, mask, model)
        if streamer is not None:
            streamer.put(input_ids[0, mask[0].bool()].cpu())
        last_logits = runner.prefill(input_ids, mask)
        stats.target_forwards = 1
        if sampling.greedy:
            first = last_logits.argmax(-1)
        else:
            first = torch.multinomial(warp(last_logits, sampling), 1, generator=generator)[:, 0]
        emit(first[:, None], torch.ones_like(first))
        while not bool(done.all()):
            t0 = time.perf_counter()
            tree = drafter.propose(history, hist_len, max_nodes, sampling, generator)
            _check_tree(tree, history[rows, hist_len - 1], max_nodes, vocab, sampling)
            active = ~done
            t1 = time.perf_counter()
            step = verify_step(runner, tree, sampling, done, generator, acceptance, posterior_threshold,
                               posterior_alpha)
            stats.draft_seconds += t1 - t0
            stats.verify_seconds += time.perf_counter() - t1
            drafter.observe(tree, step.logits, step.accepted_nodes, step.accept_len, step.next_token)
            stats.target_forwards += 1
            path = tree.tokens.gather(1, step.accepted_nodes[:, 1:].clamp_min(0))  # [B, P - 1]
            tokens = torch.cat([path, step.next_token[:, None]], 1)
            tokens.scatter_(1, step.accept_len[:, None], step.next_token[:, None])  # the bonus right after the path
            emitted_per_step.append((step.accept_len + 1)[active].cpu())
            histogram += torch.bincount(step.accept_len[active].cpu(), minlength=max_nodes)[:max_nodes]
            emit(tokens, step.accept_len + 1)
    stats.seconds = time.perf_counter() - start
    bar.close()
    if streamer is not None:
        streamer.end()
    stats.new_tokens = int(n_new.sum())
    stats.tokens_per_second = stats.new_tokens / max(stats.seconds, 1e-9)
    per_step = torch.cat(emitted_per_step) if emitted_per_step else torch.zeros(0)
    stats.mean_accepted_length = float(per_step.float().mean()) if per_step.numel() else 1.0
    last = int(histogram.nonzero().max()) + 1 if histogram.any() else 1
    stats.acceptance_histogram = histogram[:last].tolist()
    return GenerateOutput(torch.cat([input_ids.long(), new[:, :max_new_tokens]], 1), stats)
