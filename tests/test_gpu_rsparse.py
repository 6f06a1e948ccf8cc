"""rsparse_linear on a CUDA GPU: every kernel backend against the reference (bfloat16 included, which the
interpreter cannot check), odd and Llama shapes, strided and misaligned x, CUDA-graph capture.
Run with ``pytest -m gpu``."""

import pytest
import torch

import efficient_ops
from efficient_ops.formats.rsparse import RSparseWeights, budget, calibrate

from conftest import gpu_kernel_backends, rel_err

pytestmark = pytest.mark.gpu
DTYPES = (torch.float16, torch.bfloat16)


def gpu_backends(m):
    return [b for b in gpu_kernel_backends() if not (b == "cuda" and m > 8)]


def make(k, n, sparsity, alpha, dtype, m, seed=0):
    """Random weights with the budgeted rank and a threshold that keeps the budgeted channels of x."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    channels, rank = budget(k, n, sparsity, alpha)
    x = torch.randn(m, k, device="cuda", generator=g) * torch.rand(k, device="cuda", generator=g) * 2
    col_norms = torch.rand(k, device="cuda", generator=g) + 0.5
    scores = (x.abs() * col_norms).flatten()
    kept = round(scores.numel() * channels / k)
    threshold = float("-inf") if kept >= scores.numel() else \
        float("inf") if kept == 0 else float(scores.kthvalue(scores.numel() - kept).values)
    rw = RSparseWeights(
        weight_t=(torch.randn(k, n, device="cuda", generator=g) / k ** 0.5).to(dtype),
        col_norms=col_norms, threshold=threshold,
        v=(torch.randn(k, rank, device="cuda", generator=g) / k ** 0.5).to(dtype),
        us_t=(torch.randn(rank, n, device="cuda", generator=g) / rank ** 0.5 if rank else
              torch.zeros(0, n, device="cuda")).to(dtype))
    return x.to(dtype), rw, torch.randn(n, device="cuda", generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 17, 64])
@pytest.mark.parametrize("k, n, sparsity, alpha", [(1000, 777, 0.5, 0.5), (257, 4095, 0.9, 0.3), (4096, 33, 0.4, 0.0),
                                                   (129, 1, 0.5, 1.0), (1, 64, 0.5, 0.5), (640, 640, 0.0, 1.0)])
def test_backends_match_reference(dtype, m, k, n, sparsity, alpha, poison_outputs):
    x, rw, b = make(k, n, sparsity, alpha, dtype, m, seed=m * k + n)
    ref = efficient_ops.rsparse_linear(x, rw, b, backend="reference")
    for backend in gpu_backends(m):
        for bias in (None, b):
            out = efficient_ops.rsparse_linear(x, rw, bias, backend=backend)
            expected = ref if bias is not None else efficient_ops.rsparse_linear(x, rw, None, backend="reference")
            assert out.shape == (m, n) and out.dtype == dtype
            assert rel_err(out, expected) < 1e-2, (backend, bias is not None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k, n", [(4096, 4096), (4096, 14336), (14336, 4096)])
@pytest.mark.parametrize("sparsity, alpha", [(0.5, 0.5), (0.5, 1.0), (0.9, 0.5)])
def test_llama_shapes(dtype, k, n, sparsity, alpha):
    for m in (1, 8):
        x, rw, b = make(k, n, sparsity, alpha, dtype, m)
        ref = efficient_ops.rsparse_linear(x, rw, b, backend="reference")
        for backend in gpu_backends(m):
            for _ in range(3):  # repeated launches: the workspace and counters start clean every call
                assert rel_err(efficient_ops.rsparse_linear(x, rw, b, backend=backend), ref) < 1e-2, backend


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_misaligned_x(dtype):
    _, rw, b = make(1000, 300, 0.5, 0.5, dtype, 4)
    wide = torch.randn(4, 1100, device="cuda").to(dtype)
    for x in (wide[:, 1:1001], wide[:, 7:1007], wide.view(-1)[1:4001].view(4, 1000)):
        ref = efficient_ops.rsparse_linear(x.contiguous(), rw, b, backend="reference")
        for backend in gpu_backends(4):
            assert rel_err(efficient_ops.rsparse_linear(x, rw, b, backend=backend), ref) < 1e-2, backend


def test_calibrated_layer_on_gpu():
    lin = torch.nn.Linear(512, 384, device="cuda")
    x = torch.randn(256, 512, device="cuda")
    rw = calibrate(lin, x, sparsity=0.5, dtype=torch.bfloat16)
    xs = x[:8].bfloat16()
    ref = efficient_ops.rsparse_linear(xs, rw, backend="reference")
    for backend in gpu_backends(8):
        assert rel_err(efficient_ops.rsparse_linear(xs, rw, backend=backend), ref) < 1e-2


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture(backend):
    if backend not in gpu_backends(1):
        pytest.skip(f"{backend} is unavailable")
    x, rw, b = make(4096, 4096, 0.5, 0.5, torch.bfloat16, 2)
    static_x = x.clone()
    efficient_ops.rsparse_linear(static_x, rw, b, backend=backend)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = efficient_ops.rsparse_linear(static_x, rw, b, backend=backend)
    for seed in range(3):
        fresh = torch.randn(x.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)).to(x.dtype)
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(static_out, efficient_ops.rsparse_linear(fresh, rw, b, backend=backend)) < 1e-2


def test_opcheck_cuda():
    x, rw, b = make(300, 200, 0.5, 0.5, torch.float16, 3)
    for backend in gpu_backends(3):
        torch.library.opcheck(torch.ops.efficient_ops.rsparse_linear.default,
                              (x, rw.weight_t, rw.col_norms, rw.threshold, rw.v, rw.us_t, b, backend),
                              test_utils=("test_schema", "test_faketensor"))
