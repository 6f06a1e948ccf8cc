"""One small case per kernel, for ``compute-sanitizer --tool memcheck`` (bench/gpu_check.sh runs it per backend).

Shapes are odd on purpose (lengths not multiples of the tile sizes, ragged batches, -1 padded page lists), so
the kernels' tails and masks are exercised. Each case also compares the kernel with the reference backend and
records the relative error; any exception is recorded and the next case still runs.

    python bench/gpu_sanitize.py --backend cuda --json out.json     # on a GPU (under compute-sanitizer)
    python bench/gpu_sanitize.py --list                             # the cases, no GPU needed
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch

import efficient_ops as eo

DT = torch.float16


def _rel(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _rn(*shape, device):
    return torch.randn(*shape, device=device).to(DT)


def lowbit(backend, device, m=3):
    errs = []
    for bits in eo.FORMATS:
        qw = eo.quantize_weight(torch.randn(72, 333, device=device).to(DT), bits, 64)
        x = _rn(m, 333, device=device)
        errs.append(_rel(eo.lowbit_linear(x, qw, backend=backend), eo.lowbit_linear(x, qw, backend="reference")))
    return max(errs)


def lowbit_gemm(backend, device):
    return lowbit(backend, device, m=70)  # the triton tensor-core GEMM path


def lowbit_mixed(backend, device):
    w = torch.randn(72, 333, device=device).to(DT)
    mqw = eo.quantize_weight_mixed(w, list(range(0, 333, 7)))
    x = _rn(5, 333, device=device)
    return _rel(eo.lowbit_linear(x, mqw, backend=backend), eo.lowbit_linear(x, mqw, backend="reference"))


def rsparse(backend, device):
    lin = torch.nn.Linear(333, 200).to(device)
    rw = eo.calibrate(lin, torch.randn(64, 333, device=device), 0.5).to(dtype=DT)
    x = _rn(3 if backend == "cuda" else 20, 333, device=device)
    return _rel(eo.rsparse_linear(x, rw, backend=backend), eo.rsparse_linear(x, rw, backend="reference"))


def block_sparse(backend, device):
    q, k, v = _rn(2, 4, 77, 64, device=device), _rn(2, 2, 131, 64, device=device), _rn(2, 2, 131, 64, device=device)
    mask = eo.topk_blocks(q, k, 0.5, 32, 32)
    out, lse = eo.block_sparse_attention(q, k, v, mask, return_lse=True, backend=backend)
    ref, ref_lse = eo.block_sparse_attention(q, k, v, mask, return_lse=True, backend="reference")
    return max(_rel(out, ref), _rel(lse, ref_lse))


def paged_decode(backend, device):
    q = _rn(3, 8, 128, device=device)
    k, v = _rn(3, 2, 300, 128, device=device), _rn(3, 2, 300, 128, device=device)
    lens = torch.tensor([300, 17, 1], device=device)
    summary = eo.PageSummary.build(k, lens, 16)
    pages = eo.select_pages(q, summary, lens, 96)
    return _rel(eo.paged_sparse_decode(q, k, v, lens, pages, 16, backend=backend),
                eo.paged_sparse_decode(q, k, v, lens, pages, 16, backend="reference"))


def tree_attention(backend, device):
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3, 3, 5, 8, 8], device=device)
    t = parents.numel()
    q = _rn(2, 8, t, 128, device=device)
    k, v = _rn(2, 2, 300, 128, device=device), _rn(2, 2, 300, 128, device=device)
    prefix = torch.tensor([289, 0], device=device)
    return _rel(eo.tree_attention(q, k, v, prefix, parents, backend=backend),
                eo.tree_attention(q, k, v, prefix, parents, backend="reference"))


def compact_kv(backend, device):
    k, v = _rn(3, 2, 2, 40, 64, device=device), _rn(3, 2, 2, 40, 64, device=device)
    acc = torch.tensor([[0, 2, 5, -1], [0, 1, -1, -1]], device=device)
    alen, prefix = torch.tensor([2, 1], device=device), torch.tensor([30, 0], device=device)
    kr, vr = k.clone(), v.clone()
    eo.compact_kv(k, v, prefix, acc, alen, backend=backend)
    eo.compact_kv(kr, vr, prefix, acc, alen, backend="reference")
    return max(_rel(k, kr), _rel(v, vr))


def verify_sampling(backend, device):
    parents = torch.tensor([-1, 0, 0, 1, 1, 2], device=device)
    tokens = torch.randint(0, 1000, (4, 6), device=device)
    p = torch.softmax(torch.randn(4, 6, 1000, device=device), -1)
    q = torch.softmax(torch.randn(4, 6, 1000, device=device), -1)
    got = eo.verify_sampling(tokens, parents, p, q, generator=torch.Generator(device.type).manual_seed(0), backend=backend)
    ref = eo.verify_sampling(tokens, parents, p, q, generator=torch.Generator(device.type).manual_seed(0),
                             backend="reference")
    return 0.0 if all(torch.equal(a, b) for a, b in zip(got, ref)) else 1.0


CASES = {
    "cuda": {"lowbit_gemv": lowbit, "lowbit_gemv_mixed": lowbit_mixed, "rsparse_gemv": rsparse,
             "block_sparse_attention": block_sparse, "paged_sparse_decode": paged_decode,
             "tree_attention": tree_attention, "compact_kv": compact_kv},
    "triton": {"lowbit_gemv": lowbit, "lowbit_gemm": lowbit_gemm, "lowbit_mixed": lowbit_mixed,
               "rsparse_linear": rsparse, "block_sparse_attention": block_sparse,
               "paged_sparse_decode": paged_decode, "tree_attention": tree_attention, "compact_kv": compact_kv,
               "verify_sampling": verify_sampling},
}
TOLERANCE = 2e-2  # float16 kernels against the float32 reference


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=sorted(CASES), action="append", help="repeatable; default: all")
    parser.add_argument("--kernel", action="append", help="only these kernels (repeatable)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--device", default="cuda", help="cpu: the triton cases under TRITON_INTERPRET=1 (a check of "
                                                         "this driver without a GPU)")
    args = parser.parse_args(argv)
    backends = args.backend or sorted(CASES)
    if args.list:
        for backend in backends:
            print(backend, " ".join(CASES[backend]))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize: no CUDA GPU", file=sys.stderr)
        return 2
    results = []
    for backend in backends:
        for kernel, fn in CASES[backend].items():
            if args.kernel and kernel not in args.kernel:
                continue
            print(f"CASE {backend} {kernel}", flush=True)
            torch.manual_seed(0)
            t0 = time.time()
            row = {"backend": backend, "kernel": kernel}
            try:
                err = fn(backend, device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                row.update(status="ok" if err <= TOLERANCE else "mismatch", rel_err=err)
            except Exception as exc:  # noqa: BLE001 - record, then run the next case
                traceback.print_exc()
                row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500])
            row["seconds"] = round(time.time() - t0, 2)
            print(f"  -> {row}", flush=True)
            results.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
