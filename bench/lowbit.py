"""Low-bit GEMM benchmark: every available lowbit_gemm backend against dense F.linear (cuBLAS on a GPU) in the
same dtype, measured in the same run.

Shapes are Llama-3-8B / 70B linear layers, ``K x N`` = in_features x out_features, at
M in 1, 4, 16, 64, 256, 4096. Bytes moved count the packed weight, scales, zeros, x and
the output once each; FLOPs are ``2 M N K``. Without a GPU the reference backend runs at
small sizes, which says nothing about kernel speed but proves the path end to end.

Run: ``efficient-ops bench --family lowbit`` (or ``python -m efficient_ops.bench.lowbit``).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from efficient_ops import backends, lowbit_linear
from efficient_ops.quant import quantize_weight

from . import common

GPU_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]
GPU_MS = [1, 4, 16, 64, 256, 4096]
CPU_SHAPES = [(512, 512), (1024, 2048)]
CPU_MS = [1, 16, 64]

# The speed goals on H100 (W4A16, group 128): (min M, max M, minimum speedup over cuBLAS).
TARGETS = [(1, 1, 3.6), (16, 16, 3.3), (256, 4096, 1.0)]
COPY_TARGET = 0.85  # M = 1: fraction of measured copy bandwidth

COLUMNS = ["backend", "M", "K", "N", "us", "f_linear_us", "speedup", "GB/s", "%copy", "TFLOP/s", "%mm"]


def _cases(device, dtype, shapes, ms, group_size):
    for k, n in shapes:
        w = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5
        qw = quantize_weight(w, bits=4, group_size=group_size)
        for m in ms:
            yield k, n, m, w, qw


def run(device: torch.device, out_dir: str = "bench/results", quick: bool = False, dtype=None,
        group_size: int = 128) -> dict:
    """Benchmark lowbit_gemm on ``device``; write ``<out_dir>/<device>/lowbit.{json,md}`` and return the payload."""
    gpu = device.type == "cuda"
    dtype = dtype or (torch.float16 if gpu else torch.float32)
    shapes, ms = (GPU_SHAPES, GPU_MS) if gpu else (CPU_SHAPES, CPU_MS)
    if quick:
        shapes, ms = shapes[:1], ms[:3]
    info = common.device_info(device)
    note = ("" if gpu else "No CUDA GPU: the reference backend on the CPU at small sizes, against F.linear on "
            "the CPU. These numbers prove the path runs; they say nothing about GPU kernel speed.")
    if note:
        print(note)
    peaks = common.measure_peaks(device)
    # On a GPU the kernels compete (the reference is an oracle, not a contender); on the CPU only the
    # reference runs (the Triton interpreter is a test tool, far too slow to time).
    names = [b for b in ("cuda", "triton") if backends.device_status(b, device) is None] if gpu else ["reference"]
    rows = []
    cases = list(_cases(device, dtype, shapes, ms, group_size))
    for k, n, m, w, qw in tqdm(cases, desc="lowbit_gemm", unit="case"):
        weight_bytes = qw.nbytes()
        act_bytes = (m * k + m * n) * torch.finfo(dtype).bits // 8
        sets = common.rotations(weight_bytes + act_bytes, device)
        xs = [torch.randn(m, k, device=device, dtype=dtype) for _ in range(sets)]
        qws = [qw] + [quantize_weight(torch.randn_like(w), group_size=group_size) for _ in range(sets - 1)]
        dense = [w] + [torch.randn_like(w) for _ in range(sets - 1)]
        f_linear_us = common.time_calls([lambda x=x, d=d: F.linear(x, d) for x, d in zip(xs, dense)], device)
        for name in names:
            if name == "cuda" and m > 16:
                continue
            us = common.time_calls([lambda x=x, q=q: lowbit_linear(x, q, backend=name) for x, q in zip(xs, qws)],
                                   device)
            gbps = (weight_bytes + act_bytes) / us / 1e3
            tflops = 2 * m * n * k / us / 1e6
            rows.append(dict(op="lowbit_gemm", backend=name, M=m, K=k, N=n, dtype=str(dtype).split(".")[-1],
                             bits=4, group_size=group_size, us=us, f_linear_us=f_linear_us, speedup=f_linear_us / us,
                             **{"GB/s": gbps, "TFLOP/s": tflops,
                                "%copy": 100 * gbps / peaks["copy_gbps"] if peaks["copy_gbps"] else None,
                                "%mm": 100 * tflops / peaks["matmul_tflops"] if peaks["matmul_tflops"] else None}))
        del xs, qws, dense
    payload = {"family": "lowbit", "device": info, "peaks": peaks, "note": note, "rows": rows,
               "targets": check_targets(rows, peaks) if gpu else []}
    table = common.markdown_table(rows, COLUMNS)
    if payload["targets"]:
        table += "\n\nTargets (H100 goals of the W4A16 issue; best backend per case):\n\n" + \
            common.markdown_table(payload["targets"], ["target", "K", "N", "measured", "met"])
    folder = common.write_results(out_dir, "lowbit", payload, table)
    peak_line = (f"measured peaks: copy {peaks['copy_gbps']:.0f} GB/s, bf16 matmul {peaks['matmul_tflops']:.0f} TFLOP/s"
                 if gpu else "")
    print(f"\nlowbit_gemm on {info['name']} ({str(dtype)}, group {group_size}) {peak_line}\n{table}\n"
          f"results: {folder}/lowbit.json, lowbit.md")
    return payload


def check_targets(rows, peaks):
    """Compare the best backend per (M, K, N) with the speed goals; one row per goal and shape."""
    best = {}
    for r in rows:
        key = (r["M"], r["K"], r["N"])
        if key not in best or r["speedup"] > best[key]["speedup"]:
            best[key] = r
    out = []
    for lo, hi, goal in TARGETS:
        for (m, k, n), r in sorted(best.items()):
            if lo <= m <= hi:
                out.append(dict(target=f"M={m} >= {goal}x cuBLAS", K=k, N=n, measured=f"{r['speedup']:.2f}x",
                                met=r["speedup"] >= goal))
                if m == 1 and peaks["copy_gbps"]:
                    out.append(dict(target=f"M=1 >= {COPY_TARGET:.0%} copy BW", K=k, N=n,
                                    measured=f"{r['%copy']:.0f}%", met=r["%copy"] >= 100 * COPY_TARGET))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--quick", action="store_true", help="one shape, three batch sizes")
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run(device, args.out, args.quick, group_size=args.group_size)


if __name__ == "__main__":
    main()
