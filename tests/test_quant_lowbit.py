"""The packed 4-bit format and round-to-nearest quantization."""

import numpy as np
import pytest
import torch

from efficient_ops.quant import (QuantizedWeight, dequantize_weight, pack_int4, quantize_weight, unpack_int4,
                                 validate_packed)


def unpack_independent(qweight: torch.Tensor) -> np.ndarray:
    """Nibble j of word w is channel 8w + j, read bit by bit from unsigned words."""
    words = qweight.numpy().view(np.uint32)
    n, nw = words.shape
    out = np.zeros((n, nw * 8), dtype=np.int64)
    for j in range(8):
        for b in range(4):
            out[:, j::8] |= ((words >> np.uint32(4 * j + b)) & np.uint32(1)).astype(np.int64) << b
    return out


def dequantize_independent(qw: QuantizedWeight) -> np.ndarray:
    n, k = qw.shape
    q = unpack_independent(qw.qweight).astype(np.float64)
    k_pad = q.shape[1]
    group = k_pad if qw.group_size == -1 else qw.group_size
    s = np.repeat(qw.scales.double().numpy(), group, axis=1)
    z = np.repeat(qw.zeros.double().numpy(), group, axis=1)
    return ((q - z) * s)[:, :k]


@pytest.mark.parametrize("k", [8, 24, 128, 1000])
def test_pack_round_trip(k):
    q = torch.randint(0, 16, (5, k), dtype=torch.int32)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (5, k // 8)
    assert torch.equal(unpack_int4(packed), q)
    assert np.array_equal(unpack_independent(packed), q.numpy())


def test_pack_rejects_ragged_length():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(torch.zeros(2, 12, dtype=torch.int32))


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape", [(16, 256), (7, 200), (3, 33)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_format_and_dequantize(group_size, symmetric, shape, dtype):
    torch.manual_seed(0)
    n, k = shape
    w = torch.randn(n, k, dtype=dtype)
    qw = quantize_weight(w, bits=4, group_size=group_size, symmetric=symmetric)
    k_pad = -(-k // 128) * 128
    group = k_pad if group_size == -1 else group_size
    assert qw.qweight.shape == (n, k_pad // 8) and qw.qweight.dtype == torch.int32
    assert qw.scales.shape == qw.zeros.shape == (n, k_pad // group)
    assert qw.scales.dtype == (dtype if dtype != torch.float32 else torch.float16)
    assert qw.shape == (n, k) and qw.dtype == dtype and qw.bits == 4
    if symmetric:
        assert (qw.zeros == 8).all()
    levels = unpack_independent(qw.qweight)
    assert levels.min() >= 0 and levels.max() <= 15
    deq = dequantize_weight(qw, dtype=torch.float64)
    assert deq.shape == (n, k) and deq.dtype == torch.float64
    np.testing.assert_allclose(deq.numpy(), dequantize_independent(qw), rtol=0, atol=1e-12)
    assert dequantize_weight(qw).dtype == dtype


@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_rtn_error_bound(group_size):
    """Asymmetric RTN puts every weight within half a step of a level; the RMS error matches step / sqrt(12)."""
    torch.manual_seed(1)
    w = torch.randn(256, 1024)
    qw = quantize_weight(w, group_size=group_size, scale_dtype=torch.float32)
    err = dequantize_weight(qw, torch.float64) - w.double()
    group = 1024 if group_size == -1 else group_size
    step = qw.scales.double().repeat_interleave(group, dim=1)
    assert (err.abs() <= step / 2 * (1 + 1e-6)).all()
    predicted = (step.pow(2).mean() / 12).sqrt()
    measured = err.pow(2).mean().sqrt()
    assert 0.9 < (measured / predicted).item() < 1.1
    rel = (err.norm() / w.double().norm()).item()
    bound = {32: 0.085, 128: 0.11, -1: 0.14}[group_size]  # int4 on N(0, 1): wider groups, wider range
    assert rel < bound, rel


def test_all_zero_group_is_exact():
    w = torch.zeros(4, 128)
    w[1, :64] = torch.randn(64)
    assert torch.equal(dequantize_weight(quantize_weight(w, group_size=64), torch.float32)[[0, 2, 3]],
                       torch.zeros(3, 128))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(bits=3), ValueError, "bits"),
    (dict(group_size=48), ValueError, "group_size"),
    (dict(scale_dtype=torch.int32), TypeError, "scale_dtype"),
])
def test_quantize_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        quantize_weight(torch.randn(8, 64), **kwargs)


def test_quantize_rejects_bad_weights():
    with pytest.raises(TypeError, match="w:"):
        quantize_weight(torch.ones(8, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="w:"):
        quantize_weight(torch.randn(64))
    w = torch.randn(8, 64)
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_weight(w)


def test_validate_catches_corrupted_metadata():
    qw = quantize_weight(torch.randn(8, 200), group_size=64)
    qw.validate()
    with pytest.raises(ValueError, match="qweight"):
        validate_packed(qw.qweight[:, :-1], qw.scales, qw.zeros, 4, 64, 200)
    with pytest.raises(ValueError, match="qweight"):  # in_features that packs to another width
        validate_packed(qw.qweight, qw.scales, qw.zeros, 4, 64, 300)
    with pytest.raises(ValueError, match="scales"):  # group size that disagrees with the scales
        validate_packed(qw.qweight, qw.scales, qw.zeros, 4, 32, 200)
    with pytest.raises(TypeError, match="qweight"):
        validate_packed(qw.qweight.to(torch.int64), qw.scales, qw.zeros, 4, 64, 200)
    with pytest.raises(TypeError, match="zeros"):
        validate_packed(qw.qweight, qw.scales, qw.zeros.float(), 4, 64, 200)
    with pytest.raises(ValueError, match="bits"):
        validate_packed(qw.qweight, qw.scales, qw.zeros, 2, 64, 200)
    with pytest.raises(ValueError, match="contiguous"):
        validate_packed(qw.qweight, qw.scales.t().contiguous().t(), qw.zeros, 4, 64, 200)
