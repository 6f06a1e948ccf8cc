"""Fuzz: R-Sparse (``rsparse.calibrate`` and ``rsparse_linear``)."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import efficient_ops as eo

from ._helpers import (
    all_backends,
    assert_close,
    calibrate,
    expect_clear_error,
    generator,
    randn,
    seeds,
)


def _weights(n, k, rank, seed, dtype, threshold):
    """RSparseWeights built by hand from a random W (its SVD truncated to ``rank``), independent of calibrate."""
    w = randn((n, k), torch.float64, generator(seed))
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    rank = min(rank, min(n, k))
    return eo.RSparseWeights(weight_t=w.T.to(dtype).contiguous(), col_norms=w.norm(dim=0).float(),
                             v=vh[:rank].T.to(dtype).contiguous(), us_t=(u[:, :rank] * s[:rank]).T.to(dtype).contiguous(),
                             threshold=threshold), w


def _formula(rw, x, bias=None):
    m = (x.float().abs() * rw.col_norms > torch.tensor(rw.threshold, dtype=torch.float32)).double()
    xd = x.double()
    y = (xd * m) @ rw.weight_t.double() + ((xd * (1 - m)) @ rw.v.double()) @ rw.us_t.double()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("backend", all_backends())
@given(n=st.integers(1, 48), k=st.integers(1, 64), rank=st.integers(0, 64), lead=st.lists(st.integers(0, 20),
       min_size=1, max_size=2), threshold=st.sampled_from([float("-inf"), 0.0, 0.5, 1.5, float("inf")]),
       transposed=st.booleans(), bias=st.booleans(), seed=seeds)
def test_rsparse_linear_matches_formula(backend, n, k, rank, lead, threshold, transposed, bias, seed):
    dtype = torch.float32 if backend == "reference" else torch.float16
    rw, _ = _weights(n, k, rank, seed, dtype, threshold)
    g = generator(seed + 1)
    x = randn((k, *lead), dtype, g).movedim(0, -1) if transposed else randn((*lead, k), dtype, g)
    b = randn((n,), dtype, generator(seed + 2)) if bias else None
    out = eo.rsparse_linear(x, rw, b, backend=backend)
    assert out.shape == (*lead, n) and out.dtype == dtype
    assert_close(out, _formula(rw, x, b), dtype, what=backend)


@pytest.mark.parametrize("backend", all_backends())
@given(n=st.integers(1, 32), k=st.integers(1, 48), m=st.integers(1, 6), all_active=st.booleans(), seed=seeds)
def test_rsparse_dense_limits(backend, n, k, m, all_active, seed):
    """Independent check against F.linear: every channel active (threshold -inf), or none active with the full rank."""
    dtype = torch.float32 if backend == "reference" else torch.float16
    rw, w = _weights(n, k, min(n, k), seed, dtype, float("-inf") if all_active else float("inf"))
    x = randn((m, k), dtype, generator(seed + 1))
    assert_close(eo.rsparse_linear(x, rw, backend=backend), F.linear(x.double(), w), dtype, factor=3, what=backend)


@given(n=st.integers(2, 24), k=st.integers(2, 24), rows=st.integers(1, 40), sparsity=st.floats(0, 0.95),
       alpha=st.one_of(st.none(), st.floats(0, 1)), seed=seeds)
def test_calibrate_properties(n, k, rows, sparsity, alpha, seed):
    lin = torch.nn.Linear(k, n)
    x = randn((rows, k), torch.float32, generator(seed))
    rw = calibrate(lin, x, sparsity, alpha=alpha)
    rw.validate()
    assert 0 <= rw.rank <= min(n, k) and 0 <= rw.alpha <= 1
    assert all(math.isfinite(err) for _, err in rw.alpha_errors), "NaN in the alpha search"
    if sparsity == 0:
        assert_close(eo.rsparse_linear(x, rw), F.linear(x.double(), lin.weight.double()), torch.float32)


@given(kind=st.sampled_from(["nan", "inf"]), k=st.integers(2, 24), seed=seeds, data=st.data())
def test_calibrate_rejects_non_finite(kind, k, seed, data):
    x = randn((16, k), torch.float32, generator(seed))
    x[data.draw(st.integers(0, 15)), data.draw(st.integers(0, k - 1))] = float(kind)
    expect_clear_error(lambda: calibrate(torch.nn.Linear(k, 8), x, 0.5), "x_calib")


BAD = ["x_dtype", "x_dim", "x_none", "x_meta", "bias_shape", "threshold_nan", "col_norms_dtype", "v_rows", "us_shape"]


@given(kind=st.sampled_from(BAD), seed=seeds)
def test_bad_inputs_rejected(kind, seed):
    rw, _ = _weights(12, 10, 4, seed, torch.float32, 0.5)
    x, bias = randn((3, 10), torch.float32, generator(seed)), None
    arg = kind.split("_")[0]
    if kind == "x_dtype":
        x = x.half()
    elif kind == "x_dim":
        x = x[:, :9]
    elif kind == "x_none":
        x = None
    elif kind == "x_meta":
        x = x.to("meta")
    elif kind == "bias_shape":
        bias = torch.zeros(11)
    elif kind == "threshold_nan":
        rw = dataclasses.replace(rw, threshold=float("nan"))
    elif kind == "col_norms_dtype":
        rw, arg = dataclasses.replace(rw, col_norms=rw.col_norms.half()), "col_norms"
    elif kind == "v_rows":
        rw = dataclasses.replace(rw, v=rw.v[:-1].contiguous())
    elif kind == "us_shape":
        rw, arg = dataclasses.replace(rw, us_t=rw.us_t[:, :-1].contiguous()), "us_t"
    expect_clear_error(lambda: eo.rsparse_linear(x, rw, bias), arg)
