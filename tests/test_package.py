"""Packaging: the extension builds where nvcc is, imports never need a GPU, Triton or the extension,
the installed layout, and the ``efficient-ops`` command."""

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
import torch

import efficient_ops
from efficient_ops import backends

from conftest import nvcc_path


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


@pytest.mark.skipif(nvcc_path() is None or os.environ.get("EFFICIENT_OPS_BUILD_CUDA") == "0",
                    reason="nvcc not found (or EFFICIENT_OPS_BUILD_CUDA=0): the extension is not built")
def test_extension_built_and_imports():
    assert backends.extension_status() is None, backends.extension_status()
    build = backends.extension().build_info()
    wanted = os.environ.get("EFFICIENT_OPS_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
    assert sorted(build["archs"]) == sorted(a.strip() for a in wanted if a.strip())
    assert build["cuda_runtime_version"] >= 11000
    assert hasattr(backends.extension(), "lowbit_gemv")


def test_import_touches_no_gpu_and_no_triton():
    r = run_python("import sys, torch, efficient_ops\n"
                   "assert 'triton' not in sys.modules, 'triton imported eagerly'\n"
                   "assert not torch.cuda.is_initialized(), 'CUDA initialized at import'\n"
                   "assert hasattr(torch.ops.efficient_ops, 'lowbit_gemm')")
    assert r.returncode == 0, r.stderr


def test_works_without_triton_and_extension():
    code = ("import sys; sys.modules['triton'] = None; sys.modules['efficient_ops._C'] = None\n"
            "import torch, efficient_ops\n"
            "from efficient_ops import backends, cli\n"
            "from efficient_ops import quantize_weight\n"
            "qw = quantize_weight(torch.randn(16, 64))\n"
            "print(efficient_ops.lowbit_linear(torch.randn(2, 64), qw).shape)\n"
            "print(backends.device_status('triton', torch.device('cpu')))\n"
            "cli.main(['info'])\n")
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert "torch.Size([2, 16])" in r.stdout
    assert "Triton is not installed" in r.stdout and "extension: not available" in r.stdout


def test_installed_top_level_is_only_efficient_ops():
    dist = importlib.metadata.distribution("efficient_ops")
    assert (dist.read_text("top_level.txt") or "").split() == ["efficient_ops"]
    import efficient_ops.bench.lowbit  # noqa: F401  (bench/ and triton_kernels/ install under efficient_ops)
    import efficient_ops.triton_kernels  # noqa: F401


def test_cli_info():
    r = subprocess.run(["efficient-ops", "info"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"efficient_ops {efficient_ops.__version__}" in r.stdout
    assert "lowbit_gemm:" in r.stdout and "reference" in r.stdout and "needs CUDA tensors" in r.stdout


def test_cli_bench_cpu_smoke(tmp_path):
    r = subprocess.run(["efficient-ops", "bench", "--quick", "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr
    assert "No CUDA GPU" in r.stdout
    payload = json.loads((tmp_path / "cpu" / "lowbit.json").read_text())
    assert {row["M"] for row in payload["rows"]} == {1, 16, 64}
    assert all(row["backend"] == "reference" and row["us"] > 0 and row["f_linear_us"] > 0 for row in payload["rows"])
    assert (tmp_path / "cpu" / "lowbit.md").read_text().count("| reference |") == len(payload["rows"])


@pytest.mark.parametrize("archs, capability, runs", [
    (["80", "90a"], (9, 0), True), (["90a"], (9, 0), True), (["90a"], (8, 0), False), (["90a"], (10, 0), False),
    (["80"], (8, 6), True), (["80"], (12, 0), True), (["86"], (8, 0), False), (["100f"], (10, 3), True),
    (["100f"], (12, 0), False)])
def test_arch_compatibility(monkeypatch, archs, capability, runs):
    """sm_XYa runs on X.Y only; sm_XYf on the X family from X.Y; plain XY carries PTX for newer GPUs."""
    import types
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
    monkeypatch.setattr(backends, "extension", lambda: types.SimpleNamespace(build_info=lambda: {"archs": archs}))
    reason = backends._arch_status.__wrapped__(0)
    assert (reason is None) == runs, reason
