"""The packed low-bit formats (4, 3, 2, ternary, 1 bit), the quantization grids, and PTQ1.61 mixed precision."""

import numpy as np
import pytest
import torch

from efficient_ops.formats.lowbit import (FORMATS, MixedQuantizedWeight, QuantizedWeight, dequantize_weight, get_format,
                                 pack_levels, quantize_weight, quantize_weight_mixed, select_salient_channels,
                                 unpack_levels, validate_packed)

ALL_BITS = [4, 3, 2, 1.58, 1]


def _bits_of(words: np.ndarray, first_bit: int, width: int) -> np.ndarray:
    """Unsigned field of ``width`` bits starting at ``first_bit`` of each uint32 word, read bit by bit."""
    out = np.zeros(words.shape, dtype=np.int64)
    for b in range(width):
        out |= ((words >> np.uint32(first_bit + b)) & np.uint32(1)).astype(np.int64) << b
    return out


def unpack_independent(qweight: torch.Tensor, bits) -> np.ndarray:
    """Levels [N, K_pad] straight from the layout table of efficient_ops.formats.lowbit's docstring."""
    words = qweight.numpy().view(np.uint32)
    n = words.shape[0]
    if bits in (4, 2, 1):
        per_word = 32 // bits
        out = np.zeros((n, words.shape[1] * per_word), dtype=np.int64)
        for j in range(per_word):
            out[:, j::per_word] = _bits_of(words, bits * j, bits)
        return out
    if bits == 3:
        blocks = words.reshape(n, -1, 12)
        out = np.zeros((n, blocks.shape[1], 128), dtype=np.int64)
        for w in range(8):
            for j in range(16):
                out[:, :, 16 * w + j] = _bits_of(blocks[:, :, w], 2 * j, 2)
        for v in range(4):
            for j in range(32):
                out[:, :, 32 * v + j] |= _bits_of(blocks[:, :, 8 + v], j, 1) << 2
        return out.reshape(n, -1)
    data = words.astype("<u4").view(np.uint8).reshape(n, -1, 32).astype(np.int64)  # ternary: bytes
    out = np.zeros((n, data.shape[1], 160), dtype=np.int64)
    for j in range(5):
        out[:, :, 32 * j:32 * j + 32] = (data // 3 ** j) % 3
    return out.reshape(n, -1)


def dequantize_independent(qw: QuantizedWeight) -> np.ndarray:
    n, k = qw.shape
    q = unpack_independent(qw.qweight, qw.bits).astype(np.float64)
    k_pad = q.shape[1]
    group = k_pad if qw.group_size == -1 else qw.group_size
    s = np.repeat(qw.scales.double().numpy(), group, axis=1)[:, :k_pad]
    z = np.repeat(qw.zeros.double().numpy(), group, axis=1)[:, :k_pad]
    return ((q - z) * s)[:, :k]


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("k", [1, 7, 33, 160, 200, 1000])
def test_pack_round_trip(bits, k):
    """Random levels of any length (not a multiple of the pack factor) survive packing, read back both by
    unpack_levels and by an independent reader of the documented layout."""
    fmt = get_format(bits)
    q = torch.randint(0, fmt.levels, (5, k), dtype=torch.int32)
    packed = pack_levels(q, bits)
    k_pad = -(-k // fmt.k_align) * fmt.k_align
    assert packed.dtype == torch.int32 and packed.shape == (5, fmt.words(k_pad))
    assert packed.shape[1] * 32 / k_pad == {4: 4, 3: 3, 2: 2, 1.58: 1.6, 1: 1}[bits]  # bits per weight stored
    assert torch.equal(unpack_levels(packed, bits, k), q)
    independent = unpack_independent(packed, bits)
    assert np.array_equal(independent[:, :k], q.numpy()) and not independent[:, k:].any()


def test_pack_rejects_bad_levels():
    with pytest.raises(ValueError, match="0..2"):
        pack_levels(torch.full((2, 12), 3), 1.58)
    with pytest.raises(ValueError, match="q:"):
        pack_levels(torch.zeros(12, dtype=torch.int32), 4)


@pytest.mark.parametrize("bits, grid, symmetric", [(4, "int", False), (4, "int", True), (3, "int", False),
                                                   (3, "int", True), (3, "seq", False), (2, "seq", False),
                                                   (2, "int", False), (1.58, "seq", False), (1.58, "int", True),
                                                   (1, "binary", False)])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("shape", [(16, 256), (7, 200), (3, 33)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_format_and_dequantize(bits, grid, symmetric, group_size, shape, dtype):
    torch.manual_seed(0)
    n, k = shape
    w = torch.randn(n, k, dtype=dtype)
    qw = quantize_weight(w, bits=bits, group_size=group_size, grid=grid, symmetric=symmetric)
    fmt = get_format(bits)
    k_pad = -(-k // fmt.k_align) * fmt.k_align
    group = k_pad if group_size == -1 else group_size
    assert qw.qweight.shape == (n, fmt.words(k_pad)) and qw.qweight.dtype == torch.int32
    assert qw.scales.shape == qw.zeros.shape == (n, -(-k_pad // group))
    assert qw.scales.dtype == dtype  # the default scale dtype is the weight's
    assert qw.shape == (n, k) and qw.dtype == dtype and qw.bits == bits
    levels = unpack_independent(qw.qweight, bits)
    assert levels.min() >= 0 and levels.max() < fmt.levels
    deq = dequantize_weight(qw, dtype=torch.float64)
    assert deq.shape == (n, k) and deq.dtype == torch.float64
    # float16/bfloat16 scales: (q - z) * s is exact in float32; float32 scales: one float32 rounding
    np.testing.assert_allclose(deq.numpy(), dequantize_independent(qw), rtol=3e-7 if dtype == torch.float32 else 0,
                               atol=1e-12)
    assert dequantize_weight(qw).dtype == dtype


def _grouped(t, group):
    return t.reshape(t.shape[0], -1, group)


@pytest.mark.parametrize("bits, expected", [(2, [-0.75, -0.25, 0.25, 0.75]), (1.58, [-2 / 3, 0, 2 / 3])])
def test_seq_levels_are_paretoq_grid(bits, expected):
    """ParetoQ SEQ: every dequantized weight is alpha times one of the grid points, alpha = scale * L / 2."""
    torch.manual_seed(2)
    w = torch.randn(8, 320)
    qw = quantize_weight(w, bits=bits, group_size=64, scale_dtype=torch.float32)
    levels = get_format(bits).levels
    alpha = qw.scales.repeat_interleave(64, 1)[:, :320] * levels / 2
    ratio = dequantize_weight(qw) / alpha
    nearest = torch.tensor(expected)[(ratio[..., None] - torch.tensor(expected)).abs().argmin(-1)]
    assert torch.allclose(ratio, nearest, atol=1e-6)
    assert len(torch.unique(nearest)) == len(expected)
    # no clipping search: alpha is the group's max |w|
    plain = quantize_weight(w, bits=bits, group_size=64, scale_dtype=torch.float32, clip_search=False)
    assert torch.allclose(plain.scales[:, :5] * levels / 2, _grouped(w, 64).abs().amax(-1), rtol=1e-6)


def test_int_symmetric_is_lsq_clamp():
    torch.manual_seed(3)
    w = torch.randn(4, 128)
    qw = quantize_weight(w, bits=3, group_size=128, symmetric=True, scale_dtype=torch.float32)
    alpha = w.abs().amax(1, keepdim=True) / 3
    assert torch.allclose(qw.scales, alpha, rtol=1e-6) and (qw.zeros == 4).all()
    expected = torch.clamp(torch.round(w / alpha), -4, 3) * alpha
    assert torch.allclose(dequantize_weight(qw), expected, atol=1e-6)


@pytest.mark.parametrize("center", [False, True])
def test_binary_is_alpha_sign(center):
    torch.manual_seed(4)
    w = torch.randn(6, 256) + (0.3 if center else 0.0)
    qw = quantize_weight(w, bits=1, group_size=128, center=center, scale_dtype=torch.float32)
    g = _grouped(w, 128)
    mu = g.mean(-1, keepdim=True) if center else torch.zeros_like(g[..., :1])
    alpha = (g - mu).abs().mean(-1, keepdim=True)
    expected = mu + alpha * torch.where(g >= mu, 1.0, -1.0)
    assert torch.allclose(dequantize_weight(qw), expected.reshape(6, 256), atol=1e-5)


def test_error_ordering_on_gaussian_weights():
    """Fewer bits, more error: 4 < 3 < 2-bit seq < ternary < binary (group 128, defaults)."""
    torch.manual_seed(5)
    w = torch.randn(256, 1024)
    errors = [((dequantize_weight(quantize_weight(w, bits=b)) - w).norm() / w.norm()).item() for b in ALL_BITS]
    assert errors == sorted(errors), errors
    assert errors[0] < 0.12 and errors[-1] < 0.62, errors  # int4 ~0.10; binary sqrt(1 - 2/pi) ~0.60


@pytest.mark.parametrize("bits, grid", [(4, "int"), (3, "int"), (2, "int"), (2, "seq"), (1.58, "seq")])
def test_clip_search_never_worse(bits, grid):
    torch.manual_seed(6)
    w = torch.randn(64, 512)
    w[:, ::97] *= 6  # outliers: clipping should pay off
    err = {c: (dequantize_weight(quantize_weight(w, bits=bits, grid=grid, clip_search=c)) - w).norm().item()
           for c in (False, True)}
    assert err[True] <= err[False] * (1 + 1e-6), err


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_rtn_error_bound(group_size):
    """Asymmetric int4 RTN puts every weight within half a step of a level; the RMS error matches step / sqrt(12)."""
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


@pytest.mark.parametrize("bits", ALL_BITS)
def test_all_zero_group_is_exact(bits):
    w = torch.zeros(4, 128)
    w[1, :64] = torch.randn(64)
    assert torch.equal(dequantize_weight(quantize_weight(w, bits=bits, group_size=64), torch.float32)[[0, 2, 3]],
                       torch.zeros(3, 128))


def test_select_salient_channels():
    torch.manual_seed(7)
    x = torch.randn(50, 40)
    x[:, [3, 17, 31]] *= 10
    idx = select_salient_channels(x, fraction=3 / 40)
    assert idx.tolist() == [3, 17, 31]
    assert len(select_salient_channels(x, 0.2)) == 8
    assert len(select_salient_channels(x[:, :2], 0.01)) == 1  # at least one, at most K - 1
    with pytest.raises(ValueError, match="fraction"):
        select_salient_channels(x, 1.0)


def test_mixed_is_ptq161():
    """Salient columns: per-row 4-bit min-max; the rest: per-row mu + alpha * sign(w - mu)."""
    torch.manual_seed(8)
    w = torch.randn(12, 300)
    salient = torch.tensor([5, 0, 299, 77])
    mqw = quantize_weight_mixed(w, salient, scale_dtype=torch.float32)
    assert isinstance(mqw, MixedQuantizedWeight) and mqw.salient.bits == 4 and mqw.rest.bits == 1
    assert mqw.perm[:4].tolist() == [0, 5, 77, 299] and sorted(mqw.perm.tolist()) == list(range(300))
    deq = dequantize_weight(mqw)
    s_cols = [0, 5, 77, 299]
    expected_salient = dequantize_weight(quantize_weight(w[:, s_cols], bits=4, group_size=-1,
                                                         scale_dtype=torch.float32))
    assert torch.allclose(deq[:, s_cols], expected_salient, atol=1e-6)
    rest = [c for c in range(300) if c not in s_cols]
    r = w[:, rest]
    mu = r.mean(1, keepdim=True)
    alpha = (r - mu).abs().mean(1, keepdim=True)
    assert torch.allclose(deq[:, rest], mu + alpha * torch.where(r >= mu, 1.0, -1.0), atol=1e-5)
    # salient channels in 4 bits beat all-binary on the same weight
    binary = dequantize_weight(quantize_weight(w, bits=1, group_size=-1, center=True))
    assert (deq - w).norm() < (binary - w).norm()


@pytest.mark.parametrize("salient, match", [([], "non-empty"), ([0, 0], "duplicates"), ([300], r"\[0, 300\)"),
                                            (list(range(300)), "at least one")])
def test_mixed_rejects_bad_channels(salient, match):
    with pytest.raises(ValueError, match=match):
        quantize_weight_mixed(torch.randn(4, 300), salient)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(bits=5), ValueError, "bits"),
    (dict(bits=1.6), ValueError, "bits"),
    (dict(group_size=48), ValueError, "group_size"),
    (dict(scale_dtype=torch.int32), TypeError, "scale_dtype"),
    (dict(bits=1, grid="int"), ValueError, "grid"),
    (dict(bits=2, grid="binary"), ValueError, "grid"),
    (dict(bits=2, grid="nf"), ValueError, "grid"),
    (dict(bits=2, grid="seq", symmetric=True), ValueError, "symmetric"),
    (dict(bits=4, center=True), ValueError, "center"),
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


@pytest.mark.parametrize("bits", ALL_BITS)
def test_validate_catches_corrupted_metadata(bits):
    qw = quantize_weight(torch.randn(8, 200), bits=bits, group_size=64)
    qw.validate()
    args = (qw.qweight, qw.scales, qw.zeros)
    with pytest.raises(ValueError, match="qweight"):
        validate_packed(qw.qweight[:, :-1], qw.scales, qw.zeros, bits, 64, 200)
    with pytest.raises(ValueError, match="qweight"):  # in_features that packs to another width
        validate_packed(*args, bits, 64, 400)
    with pytest.raises(ValueError, match="scales"):  # group size that disagrees with the scales
        validate_packed(*args, bits, 32, 200)
    with pytest.raises(TypeError, match="qweight"):
        validate_packed(qw.qweight.to(torch.int64), qw.scales, qw.zeros, bits, 64, 200)
    with pytest.raises(TypeError, match="zeros"):
        validate_packed(qw.qweight, qw.scales, qw.zeros.half(), bits, 64, 200)
    other = [b for b in FORMATS if get_format(b).words(256) != get_format(bits).words(256)][0]
    with pytest.raises(ValueError, match="qweight"):  # another format's width
        validate_packed(*args, other, 64, 200)
    with pytest.raises(ValueError, match="contiguous"):
        validate_packed(qw.qweight, qw.scales.t().contiguous().t(), qw.zeros, bits, 64, 200)
