"""Speculative generate on SmolLM2-135M-Instruct: ours per drafter x tree policy against HF's own greedy and
prompt-lookup ``generate``, in one run, on the same prompts, on the same machine.

Prompts: passages of the standard library's ``pydoc_data.topics`` (sorted keys, evenly spaced, each cut
to :data:`PASSAGE_TOKENS` tokens) in three kinds: ``continuation`` (the raw passage, continued),
``summarize`` ("Summarize: ..." in the chat template) and ``repetition`` (the passage, then the start of
a copy "with its typos fixed": an edit-style task whose answer is mostly a copy, where n-gram drafting
should shine). Every method decodes greedily
(float32) with SmolLM2's eos, batch 1; a row's output is compared token for token with HF greedy.

Reported per method and kind: tau (tokens per verification forward, bonus included), target forwards per
token, tokens/s, speedup over HF plain greedy and over HF prompt lookup (total time of the same prompts,
which produce the same tokens when outputs are identical), identical-to-greedy (rows), and where our time
goes (drafting vs the verify step, which holds the target forward). Also the target's forward cost by
tokens verified (the curve the tree budget is chosen from).

CPU timing uses ``torch.set_num_threads(1)`` for stability; the machine may be shared with other jobs, so
absolute numbers move between runs while ratios within one run are comparable.

Run: ``python -m efficient_ops.bench.speculative_generate [--quick]`` or ``efficient-ops bench --family
speculative``. Results: ``<out_dir>/<device>/speculative_generate.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, List

import torch
from tqdm.auto import tqdm

from efficient_ops.nn.loading import load_causal_lm, smollm2_gguf
from efficient_ops.pipelines.speculative import generate

from . import common

FAMILY = "speculative_generate"
KINDS = ("continuation", "summarize", "repetition")
PASSAGE_TOKENS = 160
REPEAT_HEAD_TOKENS = 24
HF_PLD_TOKENS = (3, 10)  # HF prompt_lookup_num_tokens settings (the baseline measured both)


def passages(n: int, tokenizer, max_tokens: int) -> List[str]:
    """``n`` passages of pydoc_data.topics (evenly spaced over the sorted keys), each cut to ``max_tokens``."""
    from pydoc_data.topics import topics

    keys = sorted(k for k in topics if len(topics[k]) > 1500)
    picked = [keys[i * len(keys) // n] for i in range(n)]
    return [tokenizer.decode(tokenizer(topics[k]).input_ids[:max_tokens]) for k in picked]


def prompt_ids(kind: str, passage: str, tokenizer) -> torch.Tensor:
    """continuation: the passage; summarize: "Summarize:" + passage in the chat template; repetition: the
    passage, then the start of a second copy (an edit-and-return-the-text task: the answer is mostly copy)."""
    if kind == "continuation":
        return tokenizer(passage, return_tensors="pt").input_ids
    if kind == "repetition":
        head = tokenizer.decode(tokenizer(passage).input_ids[:REPEAT_HEAD_TOKENS])
        return tokenizer(f"{passage}\n\nThe same text, copied with its typos fixed:\n\n{head}",
                         return_tensors="pt").input_ids
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"Summarize:\n\n{passage}"}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt").input_ids


def methods(model, tokenizer, quick: bool) -> Dict[str, tuple]:
    """Our methods: name -> (drafter factory, generate keyword arguments)."""
    from efficient_ops.pipelines.speculative import drafters

    table = {
        "ours prompt_lookup chain (8)": (lambda: drafters.PromptLookupDrafter(num_matches=1), dict(max_nodes=8)),
        "ours prompt_lookup trie (16)": (lambda: drafters.PromptLookupDrafter(num_matches=4), dict(max_nodes=16)),
        "ours token_recycling static (16)": (lambda: drafters.TokenRecyclingDrafter(), dict(max_nodes=16)),
    }
    table["ours prompt_lookup chain (4)"] = (lambda: drafters.PromptLookupDrafter(num_matches=1), dict(max_nodes=4))
    # the target's 4-bit copy (one quantize_model per policy; each drafter is reused over the prompts)
    table["ours self 4-bit chain (6)"] = (lambda: drafters.self_drafter(model, bits=4, group_size=64, tree="chain"),
                                          dict(max_nodes=6))
    table["ours self 4-bit dynamic (16)"] = (
        lambda: drafters.self_drafter(model, bits=4, group_size=64, tree="dynamic"), dict(max_nodes=16))
    return table


def forward_cost(model, tokenizer, device, sizes=(1, 4, 8, 16, 32), prefix=200, reps=3) -> List[dict]:
    """ms per target forward over a chain of T tokens after a ``prefix``-token context, on our runner."""
    from efficient_ops.pipelines.speculative.runner import TreeRunner, attention_swapped

    ids = torch.randint(0, tokenizer.vocab_size, (1, prefix), device=device)
    rows = []
    with attention_swapped(model):
        runner = TreeRunner(model, 1, prefix + max(sizes) + 1)
        runner.prefill(ids, torch.ones_like(ids))
        for t in sizes:
            tokens = torch.randint(0, tokenizer.vocab_size, (1, t), device=device)
            parents = torch.arange(-1, t - 1, device=device)
            runner.forward_tree(tokens, parents)  # warm-up
            start = time.perf_counter()
            for _ in range(reps):
                runner.forward_tree(tokens, parents)
            rows.append({"tokens": t, "ms": 1e3 * (time.perf_counter() - start) / reps})
    return rows


def run(device, out_dir: str = "bench/results", quick: bool = False) -> dict:
    """The whole benchmark on ``device`` (CPU here; a GPU run uses the same prompts in float16)."""
    device = torch.device(device)
    try:
        smollm2_gguf()
    except FileNotFoundError as exc:  # the model is an optional extra; the kernel benchmarks still run
        print(f"speculative_generate: skipped: {exc}")
        return {}
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        return _run(device, out_dir, quick)
    finally:
        torch.set_num_threads(threads)


def _run(device, out_dir, quick):
    info, _ = common.start_run(device, "speculative generate: SmolLM2-135M-Instruct, greedy, batch 1"
                               + (" (quick)" if quick else ""))
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    model, tokenizer = load_causal_lm("smollm2", dtype=dtype, device=device)
    per_kind, new_tokens = (1, 32) if quick else (6, 64)
    texts = passages(per_kind * len(KINDS), tokenizer, PASSAGE_TOKENS)
    prompts = [(kind, prompt_ids(kind, texts[i * len(KINDS) + j], tokenizer).to(device))
               for i in range(per_kind) for j, kind in enumerate(KINDS)]
    eos = tokenizer.eos_token_id
    hf = dict(do_sample=False, max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=eos, top_k=None,
              top_p=None, temperature=None)
    runners = {"HF greedy": None}  # name -> generate settings; every prompt runs every method in turn, so
    for n in (HF_PLD_TOKENS[:1] if quick else HF_PLD_TOKENS):  # load drift on a shared machine hits all alike
        runners[f"HF prompt lookup (n={n})"] = {"prompt_lookup_num_tokens": n}
    drafters = {name: (make(), kwargs) for name, (make, kwargs) in methods(model, tokenizer, quick).items()}
    records = []  # one per (method, prompt)
    for kind, ids in tqdm(prompts, desc="prompts (every method)", unit="prompt"):
        model.generate(ids, **(hf | {"max_new_tokens": 2}))  # warm-up
        ref = None
        for name, extra in runners.items():
            start = time.perf_counter()
            out = model.generate(ids, **hf, **(extra or {}))
            secs = time.perf_counter() - start
            new = out[0, ids.shape[1]:]
            ref = new if ref is None else ref
            record = dict(method=name, kind=kind, seconds=secs, tokens=len(new), identical=bool(torch.equal(new, ref)))
            if extra is None:
                record.update(forwards=len(new), tau=1.0)
            records.append(record)
        for name, (drafter, kwargs) in drafters.items():
            out = generate(model, ids, drafter=drafter, max_new_tokens=new_tokens, eos_token_id=eos,
                           pad_token_id=eos, **kwargs)
            s = out.stats
            new = out.sequences[0, ids.shape[1]:ids.shape[1] + s.new_tokens]
            records.append(dict(method=name, kind=kind, seconds=s.seconds, tokens=s.new_tokens,
                                forwards=s.target_forwards, tau=s.mean_accepted_length,
                                identical=bool(torch.equal(new, ref)), draft_seconds=s.draft_seconds,
                                verify_seconds=s.verify_seconds, histogram=s.acceptance_histogram))
    rows = summarize(records)
    cost = forward_cost(model, tokenizer, device)
    note = (f"SmolLM2-135M-Instruct ({dtype}), batch 1, greedy, {len(prompts)} prompts ({per_kind} per kind; "
            f"passages of {PASSAGE_TOKENS} tokens from pydoc_data.topics), up to {new_tokens} new tokens each "
            f"(eos ends a row). torch threads: {torch.get_num_threads()}; the machine may be shared, ratios "
            "within this run are the comparable numbers. Speedup = total time of HF's method on the same "
            "prompts / ours. tau: tokens per verification forward (bonus included); (n) = tree budget.")
    columns = ["method", "kind", "tau", "forwards_per_token", "tokens_per_s", "speedup_vs_greedy",
               "speedup_vs_pld", "identical", "draft_share"]
    table = common.markdown_table(rows, columns)
    table += "\n\nTarget forward cost on our runner (1 thread, 200-token prefix):\n\n"
    table += common.markdown_table(cost, ["tokens", "ms"])
    payload = {"device": info, "note": note, "quick": quick, "rows": rows, "records": records,
               "forward_cost": cost, "new_tokens": new_tokens}
    stem = common.write_results(out_dir, FAMILY, payload, table, quick=quick)
    plot(rows, f"{stem}.png")
    print(table)
    print(f"results: {stem}.json, {stem}.md, {stem}.png")
    return payload


def summarize(records: List[dict]) -> List[dict]:
    """One row per (method, kind) and per method over all kinds."""
    rows = []
    methods_seen = list(dict.fromkeys(r["method"] for r in records))
    pld_name = next((m for m in methods_seen if m.startswith("HF prompt lookup")), None)
    for kind in KINDS + ("all",):
        pick = [r for r in records if kind in ("all", r["kind"])]
        total = {m: sum(r["seconds"] for r in pick if r["method"] == m) for m in methods_seen}
        for m in methods_seen:
            rs = [r for r in pick if r["method"] == m]
            tokens = sum(r["tokens"] for r in rs)
            row = dict(method=m, kind=kind, tokens_per_s=tokens / max(total[m], 1e-9),
                       speedup_vs_greedy=total["HF greedy"] / max(total[m], 1e-9),
                       speedup_vs_pld=total[pld_name] / max(total[m], 1e-9) if pld_name else None,
                       identical=f"{sum(r['identical'] for r in rs)}/{len(rs)}")
            if all("forwards" in r for r in rs):
                forwards = sum(r["forwards"] for r in rs)
                row["forwards_per_token"] = forwards / max(tokens, 1)
                verify = sum(r["forwards"] - 1 for r in rs)  # the prefill forward excluded
                row["tau"] = 1.0 if m == "HF greedy" else \
                    sum(r["tau"] * (r["forwards"] - 1) for r in rs) / max(verify, 1)
            if all("draft_seconds" in r for r in rs):
                row["draft_share"] = sum(r["draft_seconds"] for r in rs) / max(total[m], 1e-9)
            rows.append(row)
    return rows


def plot(rows: List[dict], path: str) -> None:
    """tau and speedup over HF greedy per method and kind (PNG); skipped with a message without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    ours = [r for r in rows if r["method"].startswith("ours") or r["method"].startswith("HF prompt")]
    names = list(dict.fromkeys(r["method"] for r in ours))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(KINDS)
    for k, kind in enumerate(KINDS):
        by = {r["method"]: r for r in ours if r["kind"] == kind}
        xs = [i + k * width for i in range(len(names))]
        axes[0].bar(xs, [by[n].get("tau") or 0 for n in names], width, label=kind)
        axes[1].bar(xs, [by[n]["speedup_vs_greedy"] for n in names], width, label=kind)
    for ax, title in zip(axes, ("tau (tokens per verification forward)", "speedup over HF greedy")):
        ax.set_xticks([i + width for i in range(len(names))], names, rotation=30, ha="right", fontsize=7)
        ax.set_title(title)
        ax.legend(fontsize=7)
    axes[1].axhline(1.0, color="gray", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    run(args.device, args.out, args.quick)
