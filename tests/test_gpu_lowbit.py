"""lowbit_gemm and lowbit_gemm_mixed on a CUDA GPU: every backend and format against the reference, CUDA-graph
capture. Run with ``pytest -m gpu``."""

import pytest
import torch

import efficient_ops
from efficient_ops import backends
from efficient_ops import quantize_weight, quantize_weight_mixed

from conftest import gpu_kernel_backends, rel_err

pytestmark = pytest.mark.gpu
TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float32: 1e-3}


def gpu_backends(m, dtype):
    return [b for b in gpu_kernel_backends() if not (b == "cuda" and (m > 16 or dtype == torch.float32))]


# (bits, grid) of every packed format; the mixed layout is "ptq1.61"
FORMATS = [(4, "int"), (3, "int"), (2, "seq"), (2, "int"), (1.58, "seq"), (1, "binary"), ("ptq1.61", None)]


def make(m, n, k, dtype, group_size, bias, seed=0, scale_dtype=None, bits=4, grid=None):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g) / k ** 0.5
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype) if bias else None
    if bits == "ptq1.61":
        salient = torch.randperm(k, device="cuda", generator=g)[:max(1, k // 5)]
        qw = quantize_weight_mixed(w.to(dtype), salient, rest_group_size=group_size, scale_dtype=scale_dtype)
    else:
        qw = quantize_weight(w.to(dtype), bits=bits, group_size=group_size, grid=grid, scale_dtype=scale_dtype)
    return x, qw, b


def test_extension_built_for_this_gpu():
    assert backends.device_status("cuda", torch.device("cuda")) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, 16, 17, 64, 300])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("n, k", [(72, 200), (1000, 1100), (256, 4096)])
def test_backends_match_reference(dtype, m, group_size, n, k, poison_outputs):
    x, qw, b = make(m, n, k, dtype, group_size, bias=m % 2 == 1, seed=m + n)
    ref = efficient_ops.lowbit_linear(x, qw, b, backend="reference")
    for name in gpu_backends(m, dtype):
        out = efficient_ops.lowbit_linear(x, qw, b, backend=name)
        assert rel_err(out, ref) < TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 11, 16, 17, 200])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("n, k", [(72, 333), (256, 4096)])
@pytest.mark.parametrize("bits, grid", FORMATS[1:])
def test_every_format_matches_reference(dtype, m, group_size, n, k, bits, grid, poison_outputs):
    x, qw, b = make(m, n, k, dtype, group_size, bias=m % 2 == 1, seed=m + n, bits=bits, grid=grid)
    ref = efficient_ops.lowbit_linear(x, qw, b, backend="reference")
    for name in gpu_backends(m, dtype):
        assert rel_err(efficient_ops.lowbit_linear(x, qw, b, backend=name), ref) < TOL[dtype], (name, bits)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_mixed_scale_dtype(scale_dtype):
    x, qw, b = make(4, 96, 384, torch.bfloat16, 128, bias=True, scale_dtype=scale_dtype)
    ref = efficient_ops.lowbit_linear(x, qw, b, backend="reference")
    for name in gpu_backends(4, torch.bfloat16):
        assert rel_err(efficient_ops.lowbit_linear(x, qw, b, backend=name), ref) < 1e-2, name


@pytest.mark.parametrize("k, n", [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (28672, 8192)])
@pytest.mark.parametrize("m", [1, 16, 256])
@pytest.mark.parametrize("bits, grid", FORMATS)
def test_llama_shapes(k, n, m, bits, grid):
    x, qw, _ = make(m, n, k, torch.bfloat16, 128, bias=False, bits=bits, grid=grid)
    ref = efficient_ops.lowbit_linear(x, qw, backend="reference")
    for name in gpu_backends(m, torch.bfloat16):
        assert rel_err(efficient_ops.lowbit_linear(x, qw, backend=name), ref) < 1e-2, name


@pytest.mark.parametrize("bits, grid", FORMATS)
def test_misaligned_and_strided_x(bits, grid):
    """x whose base pointer and row stride are not 16-byte aligned takes the CUDA scalar-load path."""
    x, qw, b = make(3, 64, 250, torch.float16, 64, bias=True, bits=bits, grid=grid)
    buf = torch.randn(3 * 253 + 1, device="cuda", dtype=torch.float16)
    xs = buf[1:].as_strided((3, 250), (253, 1))
    xs.copy_(x)
    ref = efficient_ops.lowbit_linear(x, qw, b, backend="reference")
    for name in gpu_backends(3, torch.float16):
        assert rel_err(efficient_ops.lowbit_linear(xs, qw, b, backend=name), ref) < 1e-2, name


def test_default_backend_on_gpu(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    dev = torch.device("cuda")
    assert backends.select("lowbit_gemm", dev, None, lambda b: None) == "cuda"
    x, qw, _ = make(32, 64, 128, torch.float16, 128, bias=False)
    with pytest.raises(backends.BackendUnavailableError, match="M <= 16"):
        efficient_ops.lowbit_linear(x, qw, backend="cuda")


@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("bits, grid", FORMATS)
def test_cuda_graph_capture_and_replay(m, bits, grid):
    x, qw, b = make(m, 512, 1024, torch.float16, 128, bias=True, bits=bits, grid=grid)
    for name in gpu_backends(m, torch.float16):
        static_x = x.clone()
        efficient_ops.lowbit_linear(static_x, qw, b, backend=name)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = efficient_ops.lowbit_linear(static_x, qw, b, backend=name)
        for seed in range(3):
            static_x.copy_(torch.randn(m, 1024, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
            graph.replay()
            torch.cuda.synchronize()
            eager = efficient_ops.lowbit_linear(static_x, qw, b, backend=name)
            assert torch.equal(static_out, eager), name


@pytest.mark.parametrize("bits", [4, 3, 1.58])
def test_opcheck_on_gpu(bits):
    x, qw, b = make(3, 64, 256, torch.float16, 128, bias=True, bits=bits)
    for name in gpu_backends(3, torch.float16):
        torch.library.opcheck(torch.ops.efficient_ops.lowbit_gemm.default,
                              (x, qw.qweight, qw.scales, qw.zeros, b, bits, 128, 256, name))


def test_opcheck_mixed_on_gpu():
    x, mqw, b = make(3, 64, 256, torch.float16, 128, bias=True, bits="ptq1.61")
    a, r = mqw.salient, mqw.rest
    for name in gpu_backends(3, torch.float16):
        torch.library.opcheck(torch.ops.efficient_ops.lowbit_gemm_mixed.default,
                              (x, mqw.perm, a.qweight, a.scales, a.zeros, r.qweight, r.scales, r.zeros, b, a.bits,
                               a.group_size, r.bits, r.group_size, a.in_features, name))
