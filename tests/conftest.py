"""Test setup: Triton's interpreter on machines without a GPU, the ``gpu`` marker, shared helpers."""

import os
import shutil
import subprocess

import torch

if not torch.cuda.is_available():
    # Must be set before any Triton kernel is defined: the CPU tests run the Triton kernels
    # under the interpreter on CPU tensors. On a GPU machine Triton runs compiled.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def gpu_kernel_backends():
    """The kernel backends ("cuda", "triton") that can run on this GPU; a GPU test fails when there is none."""
    from efficient_ops import backends

    names = [b for b in ("cuda", "triton") if backends.device_status(b, torch.device("cuda")) is None]
    assert names, "no GPU backend is available: is efficient_ops._C built and Triton installed?"
    return names


@pytest.fixture
def fake_cuda_launch(monkeypatch):
    """Stand-ins for the current CUDA stream (handle 0) and the device's SM count (132), so that an op's cuda
    runner reaches the real extension with CPU tensors: every host-side check runs, only the launch fails."""
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: type("S", (), {"cuda_stream": 0})())
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: type("P", (), {"multi_processor_count": 132})())


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN anywhere gives inf, so NaN never passes."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.fixture
def poison_outputs(monkeypatch):
    """Make every ``torch.empty`` float result NaN, so an output element a kernel never writes fails."""
    original = torch.empty

    def empty(*args, **kwargs):
        t = original(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)


def nvcc_path():
    """nvcc as setup.py finds it (CUDA_HOME / CUDA_PATH, CUDACXX, PATH, /usr/local/cuda), or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            path = os.path.join(os.environ[var], "bin", "nvcc")
            return path if os.path.isfile(path) else None
    for path in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if path and os.path.isfile(path):
            return path
    return None


def tiny_llama():
    """A randomly initialised two-layer Hugging Face Llama (7 linears per layer, vocabulary 128)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(cfg).eval()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_emulation(exe, *args, timeout: int = 600) -> str:
    """Run an emulation binary (UBSan halting on the first error); assert it succeeded; return its stdout."""
    run = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "UBSAN_OPTIONS": "halt_on_error=1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def extension_has(name: str) -> bool:
    """Whether the built efficient_ops._C exports ``name``."""
    from efficient_ops import backends

    ext = backends.extension()
    return ext is not None and hasattr(ext, name)


def build_emulation(tmp_path_factory, family: str, harness: str = None):
    """Compile the CPU emulation of ``csrc/<family>/<family>_gemv.cu`` (its harness is
    ``tests/csrc/<family>_gemv_emulation.cu``) under AddressSanitizer and UBSan; skip without nvcc.
    With ``harness``, compile ``tests/csrc/<harness>.cu`` instead, which includes its kernel sources itself
    (paths relative to ``csrc/``)."""
    if nvcc_path() is None:
        pytest.skip("nvcc not found")
    exe = tmp_path_factory.mktemp(f"{family}_emulation") / "emulation"
    if harness is None:
        source = os.path.join(REPO, "csrc", family, f"{family}_gemv.cu")
        defines = [f'-DEO_SRC="{source}"', "-I" + os.path.dirname(source)]
        harness_path = os.path.join(REPO, "tests", "csrc", f"{family}_gemv_emulation.cu")
    else:
        defines = []
        harness_path = os.path.join(REPO, "tests", "csrc", f"{harness}.cu")
    build = subprocess.run(
        # -O0: with the sanitizers, -O1 takes over a minute to build every kernel variant for the host;
        # -O0 builds in ~10-15 s.
        [nvcc_path(), "-std=c++17", "-O0", "-g", "-arch=sm_80", "-Xcompiler=-fsanitize=address,-fsanitize=undefined",
         *defines, "-I" + os.path.join(REPO, "csrc"), harness_path, "-o", str(exe)],
        capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    return exe
