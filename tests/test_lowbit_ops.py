"""lowbit_gemm and lowbit_gemm_mixed on the CPU: the reference against independent computations, Triton
(interpreter) against the reference for every format, backend selection, input validation, opcheck,
torch.compile, autograd."""


import pytest
import torch
import torch.nn.functional as F

import efficient_ops
from efficient_ops import backends, dequantize_weight, quantize_weight, quantize_weight_mixed

from conftest import rel_err
from test_lowbit_formats import ALL_BITS, dequantize_independent

TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float32: 1e-5}
needs_interpreter = pytest.mark.skipif(not backends.interpreter_enabled(),
                                       reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


def make(m, n, k, dtype, group_size=128, bias=False, seed=0, lead=(), bits=4, **kwargs):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    x = torch.randn(*lead, m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, quantize_weight(w.to(dtype), bits=bits, group_size=group_size, **kwargs), b


def make_mixed(m, n, k, dtype, bias=False, seed=0, salient_bits=4, rest_bits=1, **kwargs):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    salient = torch.randperm(k, generator=g)[:max(1, k // 5)]
    return x, quantize_weight_mixed(w.to(dtype), salient, salient_bits=salient_bits, rest_bits=rest_bits,
                                    **kwargs), b


@pytest.mark.parametrize("bits", ALL_BITS)
def test_reference_matches_float64_and_f_linear(bits):
    x, qw, b = make(5, 40, 200, torch.float32, group_size=64, bias=True, bits=bits)
    out = efficient_ops.lowbit_linear(x, qw, b, backend="reference")
    w64 = torch.from_numpy(dequantize_independent(qw))
    assert rel_err(out, x.double() @ w64.T + b.double()) < 1e-6
    assert rel_err(out, F.linear(x, dequantize_weight(qw, torch.float32), b)) < 1e-6


def test_reference_half_matches_f_linear():
    x, qw, b = make(3, 64, 256, torch.float16, bias=True)
    out = efficient_ops.lowbit_linear(x, qw, b, backend="reference")
    assert out.dtype == torch.float16
    assert rel_err(out, F.linear(x.float(), dequantize_weight(qw, torch.float32), b.float())) < 1e-3


@needs_interpreter
@pytest.mark.parametrize("m", [1, 2, 3, 5, 17])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_matches_reference(m, group_size, dtype, poison_outputs):
    x, qw, b = make(m, 72, 200, dtype, group_size=group_size, bias=m % 2 == 1, seed=m)
    out = efficient_ops.lowbit_linear(x, qw, b, backend="triton")
    ref = efficient_ops.lowbit_linear(x, qw, b, backend="reference")
    assert out.shape == (m, 72) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@needs_interpreter
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("bits, grid", [(3, "int"), (2, "seq"), (2, "int"), (1.58, "seq"), (1, "binary")])
def test_triton_matches_reference_every_format(m, group_size, bits, grid, poison_outputs):
    x, qw, b = make(m, 40, 333, torch.float16, group_size=group_size, bias=m == 3, seed=m, bits=bits, grid=grid)
    out = efficient_ops.lowbit_linear(x, qw, b, backend="triton")
    assert out.shape == (m, 40)
    assert rel_err(out, efficient_ops.lowbit_linear(x, qw, b, backend="reference")) < 1e-2


def test_reference_mixed_matches_dense():
    x, mqw, b = make_mixed(4, 24, 300, torch.float32, bias=True)
    w = torch.from_numpy(dequantize_independent(mqw.salient)), torch.from_numpy(dequantize_independent(mqw.rest))
    dense = torch.empty(24, 300, dtype=torch.float64)
    dense[:, mqw.perm.long()] = torch.cat(w, dim=1)
    out = efficient_ops.lowbit_linear(x, mqw, b, backend="reference")
    assert rel_err(out, x.double() @ dense.T + b.double()) < 1e-6


@needs_interpreter
@pytest.mark.parametrize("m", [1, 4, 20])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("salient_bits, rest_bits, rest_group", [(4, 1, -1), (4, 1.58, 64), (3, 2, 32)])
def test_triton_mixed_matches_reference(m, dtype, salient_bits, rest_bits, rest_group, poison_outputs):
    x, mqw, b = make_mixed(m, 36, 290, dtype, bias=True, seed=m, salient_bits=salient_bits, rest_bits=rest_bits,
                           rest_group_size=rest_group)
    out = efficient_ops.lowbit_linear(x, mqw, b, backend="triton")
    assert rel_err(out, efficient_ops.lowbit_linear(x, mqw, b, backend="reference")) < TOL[dtype]


@needs_interpreter
def test_triton_mixed_corrupt_permutation_stays_in_bounds(monkeypatch):
    """A permutation with out-of-range entries (not a valid mixed weight) is rejected; where the value check
    cannot run (CUDA-graph capture, simulated here) the kernel reads column 0, never outside x."""
    x, mqw, _ = make_mixed(2, 16, 200, torch.float32)
    mqw.perm[3] = 10 ** 6
    mqw.perm[7] = -5
    with pytest.raises(ValueError, match="perm"):
        efficient_ops.lowbit_linear(x, mqw, backend="triton")
    monkeypatch.setattr(efficient_ops.ops.lowbit, "checking_values", lambda t: False)
    out = efficient_ops.lowbit_linear(x, mqw, backend="triton")
    assert torch.isfinite(out).all()


@needs_interpreter
def test_triton_split_k_and_leading_dims(poison_outputs):
    from efficient_ops.triton_kernels.lowbit import _config
    assert _config(1, 40, [("w4", 1024, 128)], torch.device("cpu"))["SPLIT_K"] > 1  # the path this test covers
    x, qw, b = make(1, 40, 1000, torch.float16, bias=True, symmetric=True, lead=(2, 1))
    out = efficient_ops.lowbit_linear(x, qw, b, backend="triton")
    assert out.shape == (2, 1, 1, 40)
    assert rel_err(out, efficient_ops.lowbit_linear(x, qw, b, backend="reference")) < 1e-2


@needs_interpreter
def test_triton_non_contiguous_x():
    x, qw, _ = make(6, 24, 160, torch.float32)
    xt = torch.stack([x, -x], dim=-1).reshape(6, 320)[:, ::2]  # K stride 2: copied, not misread
    assert xt.stride(1) == 2 and torch.equal(xt, x)
    assert rel_err(efficient_ops.lowbit_linear(xt, qw, backend="triton"),
                   efficient_ops.lowbit_linear(x, qw, backend="reference")) < 1e-5


def test_empty_batch():
    x, qw, _ = make(0, 16, 64, torch.float16)
    assert efficient_ops.lowbit_linear(x, qw).shape == (0, 16)


def test_backend_selection(monkeypatch):
    x, qw, _ = make(2, 16, 64, torch.float16)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.select("lowbit_gemm", x.device, None, lambda b: None) == "reference"
    with pytest.raises(backends.BackendUnavailableError, match="needs CUDA tensors"):
        efficient_ops.lowbit_linear(x, qw, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        efficient_ops.lowbit_linear(x, qw, backend="cutlass")
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(backends.BackendUnavailableError, match="EFFICIENT_OPS_BACKEND=cuda"):
        efficient_ops.lowbit_linear(x, qw)
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    efficient_ops.lowbit_linear(x, qw)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(backends.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        efficient_ops.lowbit_linear(x, qw, backend="triton")


def test_bad_inputs_raise_naming_the_argument():
    x, qw, b = make(2, 16, 64, torch.float16, bias=True)
    op = torch.ops.efficient_ops.lowbit_gemm
    args = (qw.qweight, qw.scales, qw.zeros)
    with pytest.raises(TypeError, match="x:"):
        op(x.to(torch.int32), *args, None, 4, 128, 64)
    with pytest.raises(ValueError, match="x: last dimension"):
        op(x[:, :60], *args, None, 4, 128, 64)
    with pytest.raises(ValueError, match="bias"):
        op(x, *args, b[:8], 4, 128, 64)
    with pytest.raises(TypeError, match="bias"):
        op(x, *args, b.float(), 4, 128, 64)
    with pytest.raises(ValueError, match="group_size"):
        op(x, *args, None, 4, 96, 64)
    with pytest.raises(ValueError, match="scales"):  # metadata that disagrees with the tensors
        op(x, *args, None, 4, 32, 64)
    with pytest.raises(ValueError, match="on meta"):
        op(x, qw.qweight.to("meta"), qw.scales, qw.zeros, None, 4, 128, 64)
    with pytest.raises(ValueError, match="bits"):
        op(x, *args, None, 3, 128, 64)
    with pytest.raises(TypeError, match="qw:"):
        efficient_ops.lowbit_linear(x, qw.qweight)


def test_mixed_bad_inputs_name_the_part():
    x, mqw, b = make_mixed(2, 16, 200, torch.float16, bias=True)
    a, r = mqw.salient, mqw.rest
    op = torch.ops.efficient_ops.lowbit_gemm_mixed

    def call(**change):
        args = dict(x=x, perm=mqw.perm, qa=a.qweight, sa=a.scales, za=a.zeros, qb=r.qweight, sb=r.scales, zb=r.zeros,
                    bias=b, bits_a=a.bits, group_a=a.group_size, bits_b=r.bits, group_b=r.group_size,
                    salient=a.in_features)
        args.update(change)
        return op(*args.values())

    call()
    with pytest.raises(ValueError, match="qweight_b"):
        call(bits_b=2)
    with pytest.raises(ValueError, match="scales_a"):
        call(group_a=32)
    with pytest.raises(TypeError, match="perm"):
        call(perm=mqw.perm.long())
    with pytest.raises(ValueError, match="salient_features"):
        call(salient=0)
    with pytest.raises(TypeError, match="scales_b"):
        call(sb=r.scales.float(), zb=r.zeros.float())
    with pytest.raises(ValueError, match="x: last dimension"):
        call(x=x[:, :100])


def test_opcheck_reference():
    x, qw, b = make(3, 24, 160, torch.float32, bias=True)
    torch.library.opcheck(torch.ops.efficient_ops.lowbit_gemm.default,
                          (x, qw.qweight, qw.scales, qw.zeros, b, 4, 128, 160, "reference"))


@needs_interpreter
def test_opcheck_triton():
    x, qw, _ = make(3, 24, 160, torch.float16)
    torch.library.opcheck(torch.ops.efficient_ops.lowbit_gemm.default,
                          (x, qw.qweight, qw.scales, qw.zeros, None, 4, 128, 160, "triton"),
                          test_utils=("test_schema", "test_faketensor"))


def test_opcheck_mixed():
    x, mqw, b = make_mixed(3, 24, 200, torch.float32, bias=True)
    a, r = mqw.salient, mqw.rest
    args = (x, mqw.perm, a.qweight, a.scales, a.zeros, r.qweight, r.scales, r.zeros, b, a.bits, a.group_size,
            r.bits, r.group_size, a.in_features)
    torch.library.opcheck(torch.ops.efficient_ops.lowbit_gemm_mixed.default, (*args, "reference"))
    if backends.interpreter_enabled():
        torch.library.opcheck(torch.ops.efficient_ops.lowbit_gemm_mixed.default, (*args, "triton"),
                              test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    x, qw, b = make(4, 32, 128, torch.float32, bias=True)

    def f(x):
        return torch.relu(efficient_ops.lowbit_linear(x, qw, b)) * 2

    compiled = torch.compile(f, fullgraph=True)  # inductor, as users run it
    assert rel_err(compiled(x), f(x)) < 1e-6
    x2 = torch.randn(7, 128)  # a new batch size re-traces through the fake impl
    assert rel_err(compiled(x2), f(x2)) < 1e-6


@pytest.mark.parametrize("mixed", [False, True])
def test_autograd_matches_dense(mixed):
    x, qw, b = (make_mixed if mixed else make)(3, 24, 160, torch.float32, bias=True)
    x.requires_grad_(True)
    b.requires_grad_(True)
    efficient_ops.lowbit_linear(x, qw, b).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    b_ref = b.detach().clone().requires_grad_(True)
    F.linear(x_ref, dequantize_weight(qw), b_ref).square().sum().backward()
    assert rel_err(x.grad, x_ref.grad) < 1e-5 and rel_err(b.grad, b_ref.grad) < 1e-5
