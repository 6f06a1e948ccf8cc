"""Fuzz: low-bit GEMM (``lowbit_linear`` over every format, mixed precision), quantization and packing."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import efficient_ops as eo

from ._helpers import (
    all_backends,
    assert_close,
    expect_clear_error,
    generator,
    randn,
    seeds,
)

BITS = st.sampled_from(sorted(eo.FORMATS))
GROUPS = st.sampled_from([32, 64, 128, -1])


def _x(seed, lead, k, dtype, transposed):
    g = generator(seed)
    if transposed:  # a view whose last dimension is not contiguous
        return randn((k, *lead), dtype, g).movedim(0, -1)
    return randn((*lead, k), dtype, g)


@pytest.mark.parametrize("backend", all_backends())
@given(bits=BITS, group=GROUPS, n=st.integers(1, 40), k=st.integers(1, 300),
       lead=st.lists(st.integers(0, 4), min_size=1, max_size=2), transposed=st.booleans(), bias=st.booleans(),
       seed=seeds)
def test_lowbit_linear_matches_dense(backend, bits, group, n, k, lead, transposed, bias, seed):
    """Every backend equals F.linear on the dequantized weight (the independent implementation)."""
    dtype = torch.float32 if backend == "reference" else torch.float16
    w = randn((n, k), dtype, generator(seed + 1))
    qw = eo.quantize_weight(w, bits, group)
    x = _x(seed, lead, k, dtype, transposed)
    b = randn((n,), dtype, generator(seed + 2)) if bias else None
    out = eo.lowbit_linear(x, qw, b, backend=backend)
    ref = F.linear(x.double(), eo.dequantize_weight(qw, torch.float64), None if b is None else b.double())
    assert out.shape == (*lead, n) and out.dtype == dtype
    assert_close(out, ref, dtype, what=f"{backend} bits={bits} group={group}")


@pytest.mark.parametrize("backend", all_backends())
@given(n=st.integers(1, 24), k=st.integers(2, 260), m=st.integers(1, 5), salient_bits=BITS, rest_bits=BITS,
       data=st.data(), seed=seeds)
def test_mixed_matches_dense(backend, n, k, m, salient_bits, rest_bits, data, seed):
    dtype = torch.float32 if backend == "reference" else torch.float16
    salient = data.draw(st.lists(st.integers(0, k - 1), min_size=1, max_size=k - 1, unique=True))
    w = randn((n, k), dtype, generator(seed))
    mqw = eo.quantize_weight_mixed(w, salient, salient_bits, rest_bits)
    x = randn((m, k), dtype, generator(seed + 1))
    ref = F.linear(x.double(), eo.dequantize_weight(mqw, torch.float64))
    assert_close(eo.lowbit_linear(x, mqw, backend=backend), ref, dtype, what=backend)


@given(bits=BITS, n=st.integers(1, 8), k=st.integers(1, 400), seed=seeds)
def test_pack_unpack_roundtrip(bits, n, k, seed):
    levels = eo.FORMATS[bits].levels
    q = torch.randint(0, levels, (n, k), generator=generator(seed))
    assert torch.equal(eo.unpack_levels(eo.pack_levels(q, bits), bits, k), q.int())


@given(n=st.integers(1, 8), k=st.integers(1, 300), log_scale=st.floats(-8, 6), group=GROUPS,
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=seeds)
def test_quantize_error_bounded(n, k, log_scale, group, dtype, seed):
    """4-bit min-max levels: every weight dequantizes within one step of itself (half a step of rounding, half of
    the rounded zero point, and the stored scale's rounding), at any magnitude the weight's dtype can hold; scales
    are never inf or zero for a nonzero group."""
    scale = 10.0 ** log_scale
    if dtype != torch.float32:
        scale = min(max(scale, 1e-3), 1e3)  # inside float16's normal range
    w = randn((n, k), dtype, generator(seed), scale)
    qw = eo.quantize_weight(w, 4, group)
    assert torch.isfinite(qw.scales.float()).all() and torch.isfinite(qw.zeros.float()).all()
    deq = eo.dequantize_weight(qw, torch.float64)
    wd = w.double()
    step = (wd.amax(1).clamp_min(0) - wd.amin(1).clamp_max(0)) / 15  # the row's range bounds each group's
    err = (deq - wd).abs()
    assert (err <= step[:, None] * 1.02 + 1e-300).all(), f"max error {float(err.max()):.3g}, step {float(step.max()):.3g}"


BAD_X = ["int", "float64", "last_dim", "scalar", "meta", "none"]


@given(kind=st.sampled_from(BAD_X), k=st.integers(1, 200), seed=seeds)
def test_bad_x_rejected(kind, k, seed):
    qw = eo.quantize_weight(randn((8, k), torch.float32, generator(seed)), 4, 32)
    x = randn((2, k), torch.float32, generator(seed + 1))
    x = {"int": x.int(), "float64": x.double(), "last_dim": x[:, :-1] if k > 1 else x.repeat(1, 2),
         "scalar": x[0, 0], "meta": x.to("meta"), "none": None}[kind]
    expect_clear_error(lambda: eo.lowbit_linear(x, qw), "x" if kind != "meta" else "qweight")


@given(k=st.integers(2, 200), data=st.data(), seed=seeds)
def test_bad_perm_rejected(k, data, seed):
    mqw = eo.quantize_weight_mixed(randn((8, k), torch.float32, generator(seed)), [0])
    perm = mqw.perm.clone()
    i = data.draw(st.integers(0, k - 1))
    perm[i] = data.draw(st.sampled_from([-1, k, int(perm[(i + 1) % k])]))
    bad = type(mqw)(perm, mqw.salient, mqw.rest, mqw.shape, mqw.dtype)
    expect_clear_error(lambda: eo.lowbit_linear(randn((2, k), torch.float32, generator(seed)), bad), "perm")
