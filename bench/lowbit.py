"""Low-bit GEMM benchmark: every packed format on every available backend against dense F.linear (cuBLAS on
a GPU) in the same dtype, measured in the same run.

Formats: W4 and W3 (int, group 128), W2 (ParetoQ seq), ternary (1.6 bits stored) and binary (per output
row, as ParetoQ and BitNet scale them), and PTQ1.61 mixed precision (20 % of the input channels 4-bit,
the rest binary, per-row scales). Shapes are Llama-3-8B / 70B linear layers, ``K x N`` = in_features x
out_features, at M in 1, 4, 16, 64, 256, 4096. Bytes moved count the packed weight, scales, zeros (and
the permutation), x and the output once each; FLOPs are ``2 M N K``. Without a GPU the reference
backend runs at small sizes, which says nothing about kernel speed but proves the path end to end.

Run: ``efficient-ops bench --family lowbit`` (or ``python -m efficient_ops.bench.lowbit``).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from efficient_ops import lowbit_linear
from efficient_ops import quantize_weight, quantize_weight_mixed

from . import common

GPU_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]
GPU_MS = [1, 4, 16, 64, 256, 4096]
CPU_SHAPES = [(512, 512), (1024, 2048)]
CPU_MS = [1, 16, 64]


def _mixed(w):
    salient = torch.randperm(w.shape[1], device=w.device)[:w.shape[1] // 5]
    return quantize_weight_mixed(w, salient)


# name -> quantizer of a dense weight [N, K]
FORMATS = {
    "w4-g128": lambda w: quantize_weight(w, bits=4, group_size=128),
    "w3-g128": lambda w: quantize_weight(w, bits=3, group_size=128),
    "w2-seq": lambda w: quantize_weight(w, bits=2, group_size=-1),
    "ternary": lambda w: quantize_weight(w, bits=1.58, group_size=-1),
    "binary": lambda w: quantize_weight(w, bits=1, group_size=-1),
    "ptq1.61": _mixed,
}

# The issues' speed goals on H100: (format, min M, max M, minimum speedup over cuBLAS).
TARGETS = [("w4-g128", 1, 1, 3.6), ("w4-g128", 16, 16, 3.3), ("w4-g128", 256, 4096, 1.0), ("w3-g128", 1, 1, 4.5),
           ("w2-seq", 1, 1, 6.5), ("ternary", 1, 1, 7.5), ("ptq1.61", 1, 1, 6.0)]
COPY_TARGET = ("w4-g128", 0.85)  # M = 1: fraction of measured copy bandwidth

COLUMNS = ["format", "backend", "M", "K", "N", "us", "f_linear_us", "speedup", "GB/s", "%copy", "TFLOP/s", "%mm"]


def run(device: torch.device, out_dir: str = "bench/results", quick: bool = False, dtype=None,
        formats=None) -> dict:
    """Benchmark lowbit_gemm on ``device`` for ``formats`` (names of :data:`FORMATS`, default all); write
    ``<out_dir>/<device>/lowbit.{json,md}`` and return the payload."""
    gpu = device.type == "cuda"
    dtype = dtype or (torch.float16 if gpu else torch.float32)
    shapes, ms = (GPU_SHAPES, GPU_MS) if gpu else (CPU_SHAPES, CPU_MS)
    if quick:
        shapes, ms = shapes[:1], ms[:3]
    note = ("" if gpu else "No CUDA GPU: the reference backend on the CPU at small sizes, against F.linear on "
            "the CPU. These numbers prove the path runs; they say nothing about GPU kernel speed.")
    info, peaks = common.start_run(device, note)
    # On a GPU the kernels compete (the reference is an oracle, not a contender); on the CPU only the
    # reference runs (the Triton interpreter is a test tool, far too slow to time).
    names = common.kernel_backends(device)[0] if gpu else ["reference"]
    formats = list(formats or FORMATS)
    rows = []
    cases = [(k, n, m) for k, n in shapes for m in ms]
    for k, n, m in tqdm(cases, desc="lowbit_gemm", unit="shape"):
        dense_bytes = n * k * torch.finfo(dtype).bits // 8
        act_bytes = (m * k + m * n) * torch.finfo(dtype).bits // 8
        sets = common.rotations(dense_bytes + act_bytes, device)  # the baseline moves the most bytes
        xs = [torch.randn(m, k, device=device, dtype=dtype) for _ in range(sets)]
        dense = [torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5 for _ in range(sets)]
        f_linear_us = common.time_calls([lambda x=x, d=d: F.linear(x, d) for x, d in zip(xs, dense)], device)
        for fmt in formats:
            qws = [FORMATS[fmt](d) for d in dense]
            weight_bytes = qws[0].nbytes()
            for name in names:
                if name == "cuda" and m > 16:
                    continue
                us = common.time_calls([lambda x=x, q=q: lowbit_linear(x, q, backend=name) for x, q in zip(xs, qws)],
                                       device)
                gbps = (weight_bytes + act_bytes) / us / 1e3
                tflops = 2 * m * n * k / us / 1e6
                rows.append(dict(op="lowbit_gemm", format=fmt, backend=name, M=m, K=k, N=n,
                                 dtype=str(dtype).split(".")[-1], bits_per_weight=8 * weight_bytes / (n * k), us=us,
                                 f_linear_us=f_linear_us, speedup=f_linear_us / us,
                                 **{"GB/s": gbps, "TFLOP/s": tflops,
                                    "%copy": 100 * gbps / peaks["copy_gbps"] if peaks["copy_gbps"] else None,
                                    "%mm": 100 * tflops / peaks["matmul_tflops"] if peaks["matmul_tflops"] else None}))
            del qws
        del xs, dense
    payload = {"family": "lowbit", "device": info, "peaks": peaks, "note": note, "rows": rows,
               "targets": check_targets(rows, peaks) if gpu else []}
    table = common.markdown_table(rows, COLUMNS)
    if payload["targets"]:
        table += "\n\nTargets (H100 goals of the low-bit issues; best backend per case):\n\n" + \
            common.markdown_table(payload["targets"], ["format", "target", "K", "N", "measured", "met"])
    folder = common.write_results(out_dir, "lowbit", payload, table)
    peak_line = (f"measured peaks: copy {peaks['copy_gbps']:.0f} GB/s, bf16 matmul {peaks['matmul_tflops']:.0f} TFLOP/s"
                 if gpu else "")
    print(f"\nlowbit_gemm on {info['name']} ({str(dtype)}) {peak_line}\n{table}\n"
          f"results: {folder}/lowbit.json, lowbit.md")
    return payload


def check_targets(rows, peaks):
    """Compare the best backend per (M, K, N) with the speed goals; one row per goal and shape."""
    best = {}
    for r in rows:
        key = (r["format"], r["M"], r["K"], r["N"])
        if key not in best or r["speedup"] > best[key]["speedup"]:
            best[key] = r
    out = []
    for fmt, lo, hi, goal in TARGETS:
        for (f, m, k, n), r in sorted(best.items()):
            if f == fmt and lo <= m <= hi:
                out.append(dict(format=fmt, target=f"M={m} >= {goal}x cuBLAS", K=k, N=n,
                                measured=f"{r['speedup']:.2f}x", met=r["speedup"] >= goal))
                if m == 1 and fmt == COPY_TARGET[0] and peaks["copy_gbps"]:
                    out.append(dict(format=fmt, target=f"M=1 >= {COPY_TARGET[1]:.0%} copy BW", K=k, N=n,
                                    measured=f"{r['%copy']:.0f}%", met=r["%copy"] >= 100 * COPY_TARGET[1]))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--quick", action="store_true", help="one shape, three batch sizes")
    parser.add_argument("--format", action="append", choices=list(FORMATS), help="repeatable; default: all")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run(device, args.out, args.quick, formats=args.format)


if __name__ == "__main__":
    main()
