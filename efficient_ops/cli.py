"""The ``efficient-ops`` command: ``info`` (what can run here and why not) and ``bench`` (microbenchmarks)."""

from __future__ import annotations

import argparse
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Optional

import torch

from . import __version__, backends
from .pipelines.speculative import cli as speculative_cli
from .pipelines.tempo import cli as tempo_cli

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
FAMILIES = ("lowbit", "rsparse", "speculative", "sparse_attention", "tempo")  # one bench/<family>.py each
# families whose benchmark has more than its bench/<family>.py: the speculative pipeline's generate benchmark
BENCH_MODULES = {"speculative": ("speculative", "speculative_generate")}
RESULTS_ENV = "EFFICIENT_OPS_RESULTS"
SKIP_NOTE = "_C_not_built.txt"  # written by setup.py when the install skipped the extension


# NVML failures a machine without a usable NVIDIA GPU gives, as sentences.
_NVML_REASONS = {
    "NVMLError_LibraryNotFound": "no NVIDIA driver is installed (its NVML library libnvidia-ml.so was not found)",
    "NVMLError_DriverNotLoaded": "the NVIDIA driver is installed but not loaded",
    "NVMLError_NoPermission": "this user may not query the NVIDIA driver",
    "NVMLError_LibRmVersionMismatch": "the NVIDIA driver's library and kernel module versions differ (reboot?)",
}


def _gpu_line() -> str:
    """One readable line: the GPUs NVML sees and the driver version, or why none is seen."""
    try:
        import pynvml
    except ImportError:
        return "GPU: unknown (nvidia-ml-py is not installed)"
    try:
        pynvml.nvmlInit()
        names = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                 for i in range(pynvml.nvmlDeviceGetCount())]
        driver = pynvml.nvmlSystemGetDriverVersion()
    except Exception as exc:
        reason = _NVML_REASONS.get(type(exc).__name__, f"the NVIDIA driver could not be queried: {exc}")
        return f"GPU: none found: {reason}"
    if not names:
        return f"GPU: none found: the NVIDIA driver {driver} sees no GPU"
    return f"GPU: {', '.join(map(str, names))} (driver {driver})"


def _extension_line() -> str:
    """The extension's build (archs, nvcc, runtime), or why it is missing: the reason the install recorded
    (setup.py writes it into the package, since pip hides the build's output) before the import error."""
    ext = backends.extension()
    if ext is not None:
        b = ext.build_info()
        rt = b["cuda_runtime_version"]
        return (f"extension: efficient_ops._C built for sm_{', sm_'.join(b['archs'])} with nvcc {b['nvcc_version']}, "
                f"CUDA runtime {rt // 1000}.{rt % 1000 // 10}")
    return f"extension: not available: {_skip_note() or backends.extension_status()}"


def _skip_note() -> Optional[str]:
    """Why the install skipped the extension, as setup.py recorded it in the package; None without a record."""
    note = resources.files("efficient_ops").joinpath(SKIP_NOTE)
    return note.read_text().strip() if note.is_file() else None


def info(args=None) -> None:
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
    print(_extension_line())
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


def default_out() -> Path:
    """Where ``bench`` writes without ``--out``: ``$EFFICIENT_OPS_RESULTS``, else the user's data folder
    (``$XDG_DATA_HOME/efficient_ops/bench``, ``~/.local/share/...`` by default): an absolute place that does
    not depend on the current directory and survives reinstalls."""
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV]).expanduser().resolve()
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data).expanduser().resolve() / "efficient_ops" / "bench"


def bench(args) -> None:
    """Run the microbenchmarks of the chosen families on the GPU, or small CPU runs without one."""
    import importlib

    out = Path(args.out).expanduser().resolve() if args.out else default_out()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # each family says what a CPU run means
    print(f"results folder: {out}")
    for family in args.family or FAMILIES:
        for name in BENCH_MODULES.get(family, (family,)):
            module = importlib.import_module(f"efficient_ops.bench.{name}")
            module.run(device, out_dir=str(out), quick=args.quick)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="efficient-ops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, extension build, backends per op").set_defaults(func=info)
    p = sub.add_parser("bench", help="kernel microbenchmarks; results under OUT/<device>/<family>[-quick].{json,md}")
    p.add_argument("--family", action="append", choices=FAMILIES, help="repeatable; default: all")
    p.add_argument("--out", default=None,
                   help=f"results folder (default: ${RESULTS_ENV}, else $XDG_DATA_HOME/efficient_ops/bench, "
                        "i.e. ~/.local/share/efficient_ops/bench)")
    p.add_argument("--quick", action="store_true",
                   help="one shape and three batch sizes per family; written to <family>-quick.{json,md}")
    p.set_defaults(func=bench)
    speculative_cli.add_parser(sub)
    tempo_cli.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
