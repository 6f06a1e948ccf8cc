"""``efficient-ops generate``: speculative decoding from the shell, streaming the text, then tau, tokens/s
and the acceptance histogram."""

from __future__ import annotations

import argparse

import torch

DRAFTERS = ("prompt_lookup", "token_recycling", "draft_model", "self")
TREES = ("chain", "static", "dynamic")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``generate`` sub-command to ``subparsers`` (``argparse``'s ``add_subparsers()`` result)."""
    p = subparsers.add_parser("generate", help="speculative decoding with a drafter; prints tau, tokens/s, "
                                               "acceptance histogram")
    p.add_argument("--model", required=True, help="HF model folder, .gguf file, or 'smollm2'")
    p.add_argument("--drafter", choices=DRAFTERS, default="prompt_lookup")
    p.add_argument("--draft-model", help="the draft checkpoint for --drafter draft_model (same vocabulary)")
    p.add_argument("--tree", choices=TREES, default="chain", help="tree policy of draft_model / self drafters")
    p.add_argument("--bits", type=float, default=4, help="bits of the self-drafter's low-bit copy of the target")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-nodes", type=int, default=16, help="tree budget: tokens verified per target forward")
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=run)
    return p


def make_drafter(name: str, target, tree: str = "chain", draft_model=None, bits: float = 4):
    """The drafter called ``name`` (one of :data:`DRAFTERS`) for ``target``."""
    from . import drafters

    if name == "prompt_lookup":
        return drafters.PromptLookupDrafter()
    if name == "token_recycling":
        return drafters.TokenRecyclingDrafter()
    if name == "draft_model":
        if draft_model is None:
            raise ValueError("--draft-model: required with --drafter draft_model")
        return drafters.DraftModelDrafter(draft_model, tree=tree)
    if name == "self":
        return drafters.self_drafter(target, bits=bits, tree=tree)
    raise ValueError(f"--drafter: expected one of {DRAFTERS}, got {name!r}")


def run(args) -> None:
    """Load the model, generate with the chosen drafter, stream the text and print the statistics."""
    from transformers import TextStreamer

    from efficient_ops.nn.loading import load_causal_lm

    from .generate import generate

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    model, tokenizer = load_causal_lm(args.model, dtype=dtype, device=args.device)
    draft = load_causal_lm(args.draft_model, dtype=dtype, device=args.device)[0] if args.draft_model else None
    drafter = make_drafter(args.drafter, model, args.tree, draft, args.bits)
    text = args.prompt
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids.to(args.device)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    out = generate(model, ids, drafter=drafter, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator,
                   max_nodes=args.max_nodes, eos_token_id=tokenizer.eos_token_id,
                   streamer=TextStreamer(tokenizer, skip_prompt=True))
    s = out.stats
    print(f"\n--\ndrafter {args.drafter} (tree {args.tree}), max_nodes {args.max_nodes}: {s.new_tokens} tokens in "
          f"{s.seconds:.2f} s = {s.tokens_per_second:.1f} tok/s; tau {s.mean_accepted_length:.2f} tokens per "
          f"verification forward; {s.target_forwards} target forwards ({s.forwards_per_token:.2f} per token)")
    total = max(1, sum(s.acceptance_histogram))
    print("accepted draft tokens per step: " + ", ".join(
        f"{k}: {n} ({100 * n / total:.0f}%)" for k, n in enumerate(s.acceptance_histogram) if n))
