"""The ``efficient-ops`` command: ``info`` (what can run here and why not) and ``bench`` (microbenchmarks)."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import __version__, backends

# Per op: what each backend covers, shown by ``info`` (an op without a backend's entry has no such backend).
OPS = {
    "lowbit_gemm": {"cuda": "decode GEMV, M <= 16, fp16/bf16; 4/3/2/1.58/1 bits",
                    "triton": "GEMV (M <= 16, split-K) + tensor-core GEMM; 4/3/2/1.58/1 bits",
                    "reference": "PyTorch, any device"},
    "lowbit_gemm_mixed": {"cuda": "PTQ1.61 mixed precision in one launch, M <= 16", "triton": "one launch, any M",
                          "reference": "PyTorch, any device"},
    "rsparse_linear": {"cuda": "fused decode kernel, M <= 8, fp16/bf16", "triton": "one fused launch, any M, fp16/bf16",
                       "reference": "PyTorch, any device"},
    "tree_attention": {"cuda": "split-prefix flash-decoding + masked tree part, tensor cores, D 64/128, T <= 256, "
                               "fp16/bf16",
                       "triton": "split-prefix + masked tree part merged by lse, D 64/128, T <= 256, fp16/bf16",
                       "reference": "PyTorch, any device"},
    "compact_kv": {"cuda": "one launch for all layers, in place", "triton": "one launch for all layers, in place",
                   "reference": "PyTorch, any device"},
    "block_sparse_attention": {"cuda": "FlashAttention-2 style over the listed KV blocks, mma.sync tensor cores, "
                                       "D 64/128, fp16/bf16, lse",
                               "triton": "loops over the listed KV blocks only, D 64/128, fp16/bf16, lse",
                               "reference": "PyTorch, any device"},
    "paged_sparse_decode": {"cuda": "flash-decoding over the page list, D 64/128, fp16/bf16",
                            "triton": "flash-decoding over the page list, D 64/128, fp16/bf16",
                            "reference": "PyTorch, any device"},
    "select_pages": {"reference": "PyTorch tensor code, any device, fixed shapes"},
    "merge_attention_states": {"reference": "PyTorch tensor code, any device"},
    "verify_greedy": {"reference": "batched PyTorch, any device"},
    "verify_typical": {"reference": "batched PyTorch, any device"},
    "verify_sampling": {"triton": "one program per batch row walks the tree on the device",
                        "reference": "batched PyTorch, any device"},
}
FAMILIES = ("lowbit", "rsparse", "speculative", "sparse_attention")  # one bench/<family>.py each


def _gpu_line() -> str:
    try:
        import pynvml
    except ImportError:
        return "GPU: unknown (nvidia-ml-py is not installed)"
    try:
        pynvml.nvmlInit()
        names = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                 for i in range(pynvml.nvmlDeviceGetCount())]
        return f"GPU: {', '.join(map(str, names)) or 'none'} (driver {pynvml.nvmlSystemGetDriverVersion()})"
    except Exception as exc:
        return f"GPU: none found ({type(exc).__name__}: {exc})"


def info() -> None:
    """Print versions, the GPU, the extension's build, and which backends each op can use here."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # missing or broken: info still reports everything else
        triton_version = f"not available ({type(exc).__name__})"
    print(f"efficient_ops {__version__}")
    print(f"torch {torch.__version__} (built with CUDA {torch.version.cuda or 'none'}), "
          f"triton {triton_version}"
          f"{' (interpreter: TRITON_INTERPRET=1)' if backends.interpreter_enabled() else ''}")
    print(_gpu_line())
    ext = backends.extension()
    if ext is None:
        print(f"extension: not available: {backends.extension_status()}")
    else:
        b = ext.build_info()
        rt = b["cuda_runtime_version"]
        print(f"extension: efficient_ops._C built for sm_{', sm_'.join(b['archs'])} with nvcc {b['nvcc_version']}, "
              f"CUDA runtime {rt // 1000}.{rt % 1000 // 10}")
    env = os.environ.get(backends.ENV_VAR)
    print(f"backend override: {backends.ENV_VAR}={env}" if env else f"backend override: none ({backends.ENV_VAR})")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for op, notes in OPS.items():
        print(f"\n{op}:")
        for device in devices:
            for name in (b for b in backends.BACKENDS if b in notes):
                reason = backends.device_status(name, device)
                state = "available" if reason is None else f"unavailable: {reason}"
                print(f"  {device.type:4s} tensors  {name:9s}  {state}  [{notes[name]}]")
        if not torch.cuda.is_available():
            print(f"  cuda tensors  none: no CUDA GPU visible to PyTorch (built with CUDA {torch.version.cuda or 'none'})")


def bench(args) -> None:
    """Run the microbenchmarks of the chosen families on the GPU, or small CPU runs without one."""
    import importlib

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # each family says what a CPU run means
    for family in args.family or FAMILIES:
        module = importlib.import_module(f"efficient_ops.bench.{family}")
        module.run(device, out_dir=args.out, quick=args.quick)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="efficient-ops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, extension build, backends per op")
    p = sub.add_parser("bench", help="kernel microbenchmarks; results under OUT/<device>/<family>.{json,md}")
    p.add_argument("--family", action="append", choices=FAMILIES, help="repeatable; default: all")
    p.add_argument("--out", default="bench/results", help="results folder (default: bench/results)")
    p.add_argument("--quick", action="store_true", help="one shape and three batch sizes per family")
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
    else:
        bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
