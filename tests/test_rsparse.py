"""R-Sparse on the CPU: calibration, the reference against the formula in float64, the three properties
(sparsity 0 and full rank are dense; error falls as the rank grows), the Triton kernel under the
interpreter against the reference, input validation, opcheck, torch.compile, autograd, and the module
and model conversion."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import efficient_ops
from efficient_ops import backends
from efficient_ops.formats.rsparse import DEFAULT_ALPHAS, RSparseWeights, budget, calibrate
from efficient_ops.nn import RSparseLinear, rsparsify_model

from conftest import rel_err, tiny_llama

needs_interpreter = pytest.mark.skipif(not backends.interpreter_enabled(),
                                       reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


def low_rank_weight(n, k, seed=0, dtype=torch.float32):
    """A weight with a decaying spectrum (as trained weights have), so the rank branch matters."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, min(n, k), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, min(n, k), generator=g, dtype=torch.float64))
    s = torch.exp(-torch.arange(min(n, k), dtype=torch.float64) / 6)
    return ((u * s) @ v.T).to(dtype)


def make(k, n, sparsity=0.5, alpha=0.5, dtype=torch.float32, rows=256, seed=0):
    """(nn.Linear, RSparseWeights, calibration inputs) for a [n, k] layer."""
    lin = nn.Linear(k, n, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    with torch.no_grad():
        lin.weight.copy_(low_rank_weight(n, k, seed))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(rows, k, generator=g) * torch.rand(k, generator=g) * 2  # channels of different scales
    return lin, calibrate(lin, x, sparsity=sparsity, alpha=alpha, dtype=dtype), x


# ---------------------------------------------------------------- calibration

@pytest.mark.parametrize("k, n, s, a", [(4096, 4096, 0.5, 0.5), (4096, 14336, 0.4, 0.25), (300, 77, 0.9, 0.0),
                                        (64, 32, 0.5, 1.0)])
def test_budget_follows_the_paper(k, n, s, a):
    channels, rank = budget(k, n, s, a)
    assert channels == round(k * (1 - s) * a)
    assert rank == min(round((1 - a) * (1 - s) * k * n / (k + n)), k, n)
    # both branches together read about (1 - s) of the dense weight's elements
    assert abs(channels * n + rank * (k + n) - (1 - s) * k * n) <= (k + n)


@pytest.mark.parametrize("s, a", [(0.5, 0.5), (0.7, 1.0), (0.4, 0.2)])
def test_threshold_keeps_the_budgeted_channels_on_average(s, a):
    lin, rw, x = make(96, 40, sparsity=s, alpha=a)
    kept = (x.abs() * rw.col_norms > rw.threshold).float().sum(1).mean().item()
    channels, rank = budget(96, 40, s, a)
    assert abs(kept - channels) <= 0.01 * 96 + 1
    assert rw.rank == rank and rw.alpha == a and rw.sparsity == s


def test_factors_are_the_svd():
    lin, rw, _ = make(48, 40, sparsity=0.0, alpha=0.0)  # alpha is forced to 1 at sparsity 0
    assert rw.alpha == 1.0 and rw.threshold == float("-inf") and rw.rank == 0
    lin, rw, _ = make(48, 40, sparsity=0.3, alpha=0.0)
    w = lin.weight.detach()
    assert torch.allclose(rw.col_norms, w.norm(dim=0))
    assert torch.allclose(rw.v.T @ rw.v, torch.eye(rw.rank), atol=1e-5)  # orthonormal V_r
    s = torch.linalg.svdvals(w)[:rw.rank]
    assert torch.allclose(rw.us_t.norm(dim=1), s, rtol=1e-4)  # rows of (U_r S_r)^T have norm S_j
    full = calibrate(lin, torch.randn(8, 48), sparsity=0.3, alpha=0.0)  # rank 0.7*48*40/88 = 15
    assert full.rank == 15


def test_alpha_search_picks_the_least_error():
    lin, rw, x = make(64, 48, sparsity=0.5, alpha=None)
    alphas = [a for a, _ in rw.alpha_errors]
    assert alphas == list(DEFAULT_ALPHAS)
    best = min(rw.alpha_errors, key=lambda e: e[1])
    assert rw.alpha == best[0]
    # the decaying spectrum makes a mix of both branches beat sparse channels alone (alpha = 1)
    assert rw.alpha < 1.0 and best[1] < dict(rw.alpha_errors)[1.0]
    # and the recorded error is what the layer really does on the calibration inputs
    y = efficient_ops.rsparse_linear(x, rw)
    assert abs(rel_err(y, x @ lin.weight.detach().T) - best[1]) < 1e-4


def test_calibrate_rejects_bad_arguments():
    lin = nn.Linear(16, 8)
    with pytest.raises(ValueError, match="x_calib"):
        calibrate(lin, torch.randn(4, 15))
    with pytest.raises(ValueError, match="sparsity"):
        calibrate(lin, torch.randn(4, 16), sparsity=1.0)
    with pytest.raises(ValueError, match="alpha"):
        calibrate(lin, torch.randn(4, 16), alpha=1.5)
    with pytest.raises(TypeError, match="linear"):
        calibrate("not a layer", torch.randn(4, 16))


# ---------------------------------------------------------------- the reference and the properties

def test_reference_matches_the_formula_in_float64():
    lin, rw, _ = make(37, 29, sparsity=0.5, alpha=0.5, dtype=torch.float64)
    w = lin.weight.detach()
    u, s, vh = torch.linalg.svd(w)
    r = rw.rank
    x = torch.randn(5, 37, dtype=torch.float64) * 2
    b = torch.randn(29, dtype=torch.float64)
    expected = torch.empty(5, 29, dtype=torch.float64)
    for row in range(5):  # the paper's formula, one row and one channel at a time
        m = torch.tensor([float(abs(x[row, i].item()) * rw.col_norms[i].item() > rw.threshold) for i in range(37)],
                         dtype=torch.float64)
        assert 0 < m.sum() < 37  # both branches in use
        expected[row] = w @ (x[row] * m) + u[:, :r] @ torch.diag(s[:r]) @ vh[:r] @ (x[row] * (1 - m)) + b
    got = efficient_ops.rsparse_linear(x, rw, b)
    assert rel_err(got, expected) < 1e-12


def test_sparsity_zero_is_dense():
    lin, _, x = make(50, 30)
    rw = calibrate(lin, x, sparsity=0.0)
    y = efficient_ops.rsparse_linear(x[:7], rw, lin.bias.detach())
    assert rel_err(y, lin(x[:7]).detach()) < 1e-6


@pytest.mark.parametrize("threshold", [0.0, 0.5, 2.0, float("inf")])
def test_full_rank_is_dense_for_any_mask(threshold):
    lin, rw, x = make(24, 40, sparsity=0.5, alpha=0.5, dtype=torch.float64)
    w = lin.weight.detach()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    full = RSparseWeights(rw.weight_t, rw.col_norms, vh.T.contiguous(), (u * s).T.contiguous(), threshold)
    xs = x[:6].double()
    assert rel_err(efficient_ops.rsparse_linear(xs, full), xs @ w.T) < 1e-12


def test_error_falls_as_the_rank_grows_at_a_fixed_mask():
    lin, rw, x = make(64, 48, sparsity=0.5, alpha=0.5, dtype=torch.float64)
    w = lin.weight.detach()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    xs = x[:32].double()
    errors = []
    for r in range(0, 49, 4):
        rwr = RSparseWeights(rw.weight_t, rw.col_norms, vh[:r].T.contiguous(), (u[:, :r] * s[:r]).T.contiguous(),
                             rw.threshold)
        errors.append(rel_err(efficient_ops.rsparse_linear(xs, rwr), xs @ w.T))
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-12 < errors[0]


# ---------------------------------------------------------------- Triton under the interpreter

@needs_interpreter
@pytest.mark.parametrize("m, k, n, alpha, sparsity", [
    (1, 200, 130, 0.5, 0.5),    # one row, several tiles and splits
    (3, 77, 45, 0.0, 0.6),      # no sparse channels at all (threshold inf)
    (8, 130, 9, 0.3, 0.9),      # high sparsity, rank 1
    (5, 64, 64, 1.0, 0.5),      # rank 0 (TEAL-like)
    (19, 96, 150, 0.5, 0.4),    # two blocks of 16 rows
    (2, 33, 17, 1.0, 0.0),      # dense (threshold -inf)
])
@pytest.mark.parametrize("bias", [False, True])
def test_triton_matches_reference(m, k, n, alpha, sparsity, bias, poison_outputs):
    lin, rw, _ = make(k, n, sparsity=sparsity, alpha=alpha, dtype=torch.float16, seed=m + k)
    x = (torch.randn(m, k) * torch.rand(k) * 2).half()
    b = torch.randn(n).half() if bias else None
    ref = efficient_ops.rsparse_linear(x, rw, b, backend="reference")
    out = efficient_ops.rsparse_linear(x, rw, b, backend="triton")
    assert out.dtype == torch.float16 and out.shape == (m, n)
    assert rel_err(out, ref) < 2e-3
    if sparsity == 0.0:  # independent check: the dense layer
        assert rel_err(out, F.linear(x.float(), lin.weight.detach(), None if b is None else b.float())) < 2e-3


@needs_interpreter
def test_triton_strided_and_batched_x():
    _, rw, _ = make(70, 40, dtype=torch.float16)
    wide = (torch.randn(6, 100) * 2).half()
    x = wide[:, 10:80]  # row stride 100, unit column stride
    ref = efficient_ops.rsparse_linear(x.contiguous(), rw, backend="reference")
    assert rel_err(efficient_ops.rsparse_linear(x, rw, backend="triton"), ref) < 2e-3
    x3 = (torch.randn(2, 3, 70) * 2).half()
    out = efficient_ops.rsparse_linear(x3, rw, backend="triton")
    assert out.shape == (2, 3, 40)
    assert rel_err(out, efficient_ops.rsparse_linear(x3, rw, backend="reference")) < 2e-3


@needs_interpreter
def test_triton_rows_keep_their_own_masks():
    # row 0 is large everywhere (all channels active), row 1 tiny (all through the rank branch)
    _, rw, _ = make(64, 32, sparsity=0.5, alpha=0.5, dtype=torch.float16)
    x = torch.stack([torch.full((64,), 50.0), torch.full((64,), 1e-3)]).half()
    m = x.float().abs() * rw.col_norms > rw.threshold
    assert m[0].all() and not m[1].any()
    out = efficient_ops.rsparse_linear(x, rw, backend="triton")
    dense = x[0].float() @ rw.weight_t.float()
    low_rank = (x[1].float() @ rw.v.float()) @ rw.us_t.float()
    assert rel_err(out[0], dense) < 2e-3 and rel_err(out[1], low_rank) < 2e-3


def test_empty_inputs():
    _, rw, _ = make(16, 8)
    assert efficient_ops.rsparse_linear(torch.randn(0, 16), rw).shape == (0, 8)


# ---------------------------------------------------------------- validation, backends, opcheck, compile, autograd

def test_bad_inputs_name_the_argument():
    _, rw, _ = make(16, 8, dtype=torch.float16)
    x = torch.randn(2, 16).half()
    op = torch.ops.efficient_ops.rsparse_linear

    def call(**kw):
        args = dict(x=x, weight_t=rw.weight_t, col_norms=rw.col_norms, threshold=rw.threshold, v=rw.v, us_t=rw.us_t,
                    bias=None)
        args.update(kw)
        return op(*args.values())

    with pytest.raises(TypeError, match="x: dtype"):
        call(x=x.float())
    with pytest.raises(ValueError, match="x: last dimension"):
        call(x=x[:, :15])
    with pytest.raises(TypeError, match="col_norms"):
        call(col_norms=rw.col_norms.half())
    with pytest.raises(ValueError, match="us_t"):
        call(us_t=rw.us_t[:, :7].contiguous())
    with pytest.raises(ValueError, match="v: expected 16 rows"):
        call(v=rw.v[:15].contiguous())
    with pytest.raises(ValueError, match="weight_t: must be contiguous"):
        call(weight_t=rw.weight_t.T.contiguous().T)
    with pytest.raises(ValueError, match="threshold"):
        call(threshold=float("nan"))
    with pytest.raises(ValueError, match="bias"):
        call(bias=torch.zeros(9).half())
    with pytest.raises(TypeError, match="v: dtype"):
        call(v=rw.v.float())
    with pytest.raises(TypeError, match="rw"):
        efficient_ops.rsparse_linear(x, rw.weight_t)


def test_backend_errors_say_why():
    _, rw, _ = make(16, 8, dtype=torch.float32)
    x = torch.randn(2, 16)
    with pytest.raises(backends.BackendUnavailableError, match="needs CUDA tensors"):
        efficient_ops.rsparse_linear(x, rw, backend="cuda")
    if backends.interpreter_enabled():
        with pytest.raises(backends.BackendUnavailableError, match="float16/bfloat16"):
            efficient_ops.rsparse_linear(x, rw, backend="triton")


def test_opcheck():
    _, rw, _ = make(40, 24, dtype=torch.float32)
    args = (torch.randn(3, 40), rw.weight_t, rw.col_norms, rw.threshold, rw.v, rw.us_t, torch.randn(24))
    torch.library.opcheck(torch.ops.efficient_ops.rsparse_linear.default, (*args, "reference"))
    if backends.interpreter_enabled():
        _, rwh, _ = make(40, 24, dtype=torch.float16)
        args = (torch.randn(3, 40).half(), rwh.weight_t, rwh.col_norms, rwh.threshold, rwh.v, rwh.us_t, None)
        torch.library.opcheck(torch.ops.efficient_ops.rsparse_linear.default, (*args, "triton"),
                              test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    lin, rw, _ = make(32, 24)
    b = lin.bias.detach()

    def f(x):
        return torch.relu(efficient_ops.rsparse_linear(x, rw, b)) * 2

    compiled = torch.compile(f, fullgraph=True)
    x = torch.randn(4, 32)
    assert rel_err(compiled(x), f(x)) < 1e-6
    x2 = torch.randn(7, 32)
    assert rel_err(compiled(x2), f(x2)) < 1e-6


def test_autograd_through_the_fixed_mask():
    lin, rw, _ = make(40, 24, dtype=torch.float64)
    x = torch.randn(5, 40, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, b: efficient_ops.rsparse_linear(x, rw, b), (x, b))


# ---------------------------------------------------------------- the module and model conversion

def test_module_sparse_decode_dense_prefill():
    lin, _, x = make(48, 32)
    layer = RSparseLinear.from_linear(lin, x, sparsity=0.5, alpha=0.5)
    assert layer.max_sparse_rows == 8 and layer.rank == budget(48, 32, 0.5, 0.5)[1]
    with torch.no_grad():
        decode = layer(x[:8])
        assert rel_err(decode, efficient_ops.rsparse_linear(x[:8], layer.weights, lin.bias)) < 1e-7
        assert rel_err(decode, lin(x[:8])) > 1e-3  # really sparse
        assert rel_err(layer(x[:9]), lin(x[:9])) < 1e-6  # prefill crossover: dense
        layer.max_sparse_rows = None
        assert rel_err(layer(x[:9]), efficient_ops.rsparse_linear(x[:9], layer.weights, lin.bias)) < 1e-7


def test_module_state_dict_round_trip():
    lin, _, x = make(48, 32)
    layer = RSparseLinear.from_linear(lin, x, sparsity=0.6, alpha=0.5)
    empty = RSparseLinear(48, 32, layer.rank, dtype=torch.float32)
    empty.load_state_dict(layer.state_dict())
    assert empty.threshold == layer.threshold and empty.alpha == 0.5 and empty.sparsity == 0.6
    with torch.no_grad():
        assert torch.equal(empty(x[:3]), layer(x[:3]))


def test_rsparsify_hf_causal_lm():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 12))
    calib = [torch.randint(0, 128, (1, 16)) for _ in range(2)]
    with torch.no_grad():
        dense = model(ids).logits
        rsparsify_model(model, calib, sparsity=0.0, progress=False, max_sparse_rows=None)
        assert rel_err(model(ids).logits, dense) < 1e-5  # sparsity 0 is the dense model
        model = tiny_llama()
        rsparsify_model(model, calib, sparsity=0.5, progress=False, max_sparse_rows=None)
        sparse = model(ids).logits
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    layers = [m for m in model.modules() if isinstance(m, RSparseLinear)]
    assert len(layers) == 2 * 7 and type(model.lm_head) is nn.Linear
    assert all(0.0 <= m.alpha <= 1.0 and m.sparsity == 0.5 for m in layers)
    assert 1e-3 < rel_err(sparse, dense) < 0.5
    assert generated.shape == (1, 16)


def test_rsparsify_needs_inputs():
    with pytest.raises(ValueError, match="saw no input"):
        rsparsify_model(nn.Sequential(nn.Linear(4, 4)), [], progress=False)


@pytest.mark.skipif(backends.extension() is None or torch.cuda.is_available(),
                    reason="needs efficient_ops._C and no GPU (the launch must fail)")
@pytest.mark.parametrize("rank_alpha", [0.5, 1.0])
def test_cuda_runner_passes_the_extension_checks(fake_cuda_launch, rank_alpha):
    """The op's cuda runner on CPU tensors with a stand-in stream: the real binding accepts its keyword
    arguments and every size, stride and pointer check, and only the kernel launch fails (no GPU)."""
    from efficient_ops.ops import rsparse as ops

    _, rw, _ = make(70, 40, alpha=rank_alpha, dtype=torch.bfloat16)
    x = (torch.randn(3, 100) * 2).bfloat16()[:, 10:80]  # strided rows, as the op passes them
    with pytest.raises(RuntimeError, match="rsparse_gemv: CUDA launch failed"):
        ops._run_cuda(x, rw.weight_t, rw.col_norms, rw.threshold, rw.v, rw.us_t, torch.randn(40).bfloat16())
