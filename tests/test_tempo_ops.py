"""Tempo's kernels: pack_segments and segment_relevance on every backend against independent PyTorch code."""

import pytest
import torch

import efficient_ops
from efficient_ops import backends
from efficient_ops.backends import BackendUnavailableError

from conftest import gpu_kernel_backends, rel_err


def cpu_backends():
    return ["reference"] + (["triton"] if backends.device_status("triton", torch.device("cpu")) is None else [])


def python_concat(features, counts, stamps=None, stamp_lens=None):
    """The per-segment slice + torch.cat the kernel replaces (what Tempo's code does)."""
    chunks, offsets = [], [0]
    for i in range(features.shape[0]):
        c = int(counts[i])
        piece = [] if c == 0 else ([stamps[i, :int(stamp_lens[i])]] if stamps is not None else []) + [features[i, :c]]
        chunks += piece
        offsets.append(offsets[-1] + sum(p.shape[0] for p in piece))
    packed = torch.cat(chunks) if chunks else features.new_empty((0, features.shape[2]))
    return packed, torch.tensor(offsets, dtype=torch.int32)


def strided(x: torch.Tensor) -> torch.Tensor:
    """The same values with non-contiguous strides (a view into a larger buffer, d last but not unit-stride)."""
    big = torch.empty((*x.shape[:-1], 2 * x.shape[-1]), dtype=x.dtype).transpose(0, 1).contiguous().transpose(0, 1)
    big[..., ::2] = x
    return big[..., ::2]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("stamped", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_pack_segments_matches_concat(backend, dtype, stamped, layout, poison_outputs):
    gen = torch.Generator().manual_seed(hash((dtype, stamped, layout)) % 1000)
    n, k, d, length = 7, 9, 37, 5
    features = torch.randn(n, k, d, generator=gen).to(dtype)
    counts = torch.tensor([0, 9, 3, 1, 0, 9, 5])  # 0 and K included
    stamps = torch.randn(n, length, d, generator=gen).to(dtype) if stamped else None
    stamp_lens = torch.tensor([2, 5, 0, 3, 4, 1, 5], dtype=torch.int32) if stamped else None
    if layout == "strided":
        features = strided(features)
        stamps = strided(stamps) if stamped else None
        assert not features.is_contiguous()
    packed, offsets = efficient_ops.pack_segments(features, counts, stamps, stamp_lens, backend=backend)
    want, want_offsets = python_concat(features, counts, stamps, stamp_lens)
    assert offsets.dtype == torch.int32 and torch.equal(offsets, want_offsets)
    assert packed.dtype == dtype and torch.equal(packed, want)


@pytest.mark.parametrize("backend", cpu_backends())
def test_pack_segments_empty(backend):
    features = torch.randn(3, 4, 8)
    packed, offsets = efficient_ops.pack_segments(features, torch.zeros(3, dtype=torch.long), backend=backend)
    assert packed.shape == (0, 8) and offsets.tolist() == [0, 0, 0, 0]


def softmax_yes(h, w_yes, w_no):
    """P(Yes) from a softmax over the two logits, in float64: an independent formulation of the relevance."""
    logits = torch.stack([h.double() @ w_yes.double(), h.double() @ w_no.double()], -1)
    return torch.softmax(logits, -1)[:, 0]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,d", [(1, 16), (19, 37), (40, 600)])
def test_segment_relevance_matches_softmax(backend, dtype, n, d, poison_outputs):
    gen = torch.Generator().manual_seed(n * d)
    h = (torch.randn(n, 2 * d, generator=gen) / d ** 0.5).to(dtype)[:, ::2]  # strided rows
    w_yes, w_no = torch.randn(2, d, generator=gen).to(dtype)
    out = efficient_ops.segment_relevance(h, w_yes, w_no, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (n,)
    assert rel_err(out, softmax_yes(h, w_yes, w_no)) < (1e-5 if dtype == torch.float32 else 1e-3)


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    features, stamps = torch.randn(4, 6, 8, generator=gen), torch.randn(4, 3, 8, generator=gen)
    counts, stamp_lens = torch.tensor([6, 0, 2, 1]), torch.tensor([3, 1, 0, 2])
    torch.library.opcheck(torch.ops.efficient_ops.pack_segments, (features, counts, stamps, stamp_lens),
                          {"backend": "reference"})
    torch.library.opcheck(torch.ops.efficient_ops.pack_segments, (features, counts))
    h, w = torch.randn(5, 8, generator=gen), torch.randn(2, 8, generator=gen)
    torch.library.opcheck(torch.ops.efficient_ops.segment_relevance, (h, w[0], w[1]))


def test_pack_segments_bad_input():
    f = torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match="counts: every entry must be in \\[0, K = 4\\]"):
        efficient_ops.pack_segments(f, torch.tensor([1, 5, 0]))
    with pytest.raises(ValueError, match="counts: every entry"):
        efficient_ops.pack_segments(f, torch.tensor([1, -1, 0]))
    with pytest.raises(ValueError, match="counts: expected shape \\[3\\]"):
        efficient_ops.pack_segments(f, torch.tensor([1, 1]))
    with pytest.raises(TypeError, match="counts: expected an int32 or int64"):
        efficient_ops.pack_segments(f, torch.tensor([1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="features: expected \\[n_segments, K, d\\]"):
        efficient_ops.pack_segments(f[0], torch.tensor([1, 1, 1, 1]))
    with pytest.raises(TypeError, match="features: expected a floating-point"):
        efficient_ops.pack_segments(torch.ones(3, 4, 8, dtype=torch.long), torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="stamps, stamp_lens: give both"):
        efficient_ops.pack_segments(f, torch.tensor([1, 1, 1]), torch.randn(3, 2, 8))
    with pytest.raises(ValueError, match="stamps: expected shape \\[3, L, 8\\]"):
        efficient_ops.pack_segments(f, torch.tensor([1, 1, 1]), torch.randn(3, 2, 7), torch.tensor([1, 1, 1]))
    with pytest.raises(TypeError, match="stamps: dtype"):
        efficient_ops.pack_segments(f, torch.tensor([1, 1, 1]), torch.randn(3, 2, 8).half(), torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="stamp_lens: every entry must be in \\[0, L = 2\\]"):
        efficient_ops.pack_segments(f, torch.tensor([1, 1, 1]), torch.randn(3, 2, 8), torch.tensor([1, 3, 1]))
    with pytest.raises(BackendUnavailableError, match="no compiled CUDA kernel|needs CUDA tensors"):
        efficient_ops.pack_segments(f, torch.tensor([1, 1, 1]), backend="cuda")


def test_segment_relevance_bad_input():
    h = torch.randn(3, 8)
    with pytest.raises(ValueError, match="w_yes: expected shape \\[8\\]"):
        efficient_ops.segment_relevance(h, torch.randn(7), torch.randn(8))
    with pytest.raises(TypeError, match="w_no: dtype"):
        efficient_ops.segment_relevance(h, torch.randn(8), torch.randn(8).half())
    with pytest.raises(ValueError, match="h: expected \\[n_segments, d\\]"):
        efficient_ops.segment_relevance(h[0], torch.randn(8), torch.randn(8))
    if "triton" in cpu_backends():
        with pytest.raises(BackendUnavailableError, match="float16, bfloat16 or float32"):
            efficient_ops.segment_relevance(h.double(), torch.randn(8).double(), torch.randn(8).double(),
                                            backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_tempo_kernels(dtype):
    assert "triton" in gpu_kernel_backends()
    gen = torch.Generator().manual_seed(1)
    n, k, d = 300, 128, 2560
    features = torch.randn(n, k, d, generator=gen).to(dtype)
    counts = torch.randint(0, k + 1, (n,), generator=gen)
    counts[:2] = torch.tensor([0, k])
    stamps = torch.randn(n, 6, d, generator=gen).to(dtype)
    stamp_lens = torch.randint(0, 7, (n,), generator=gen)
    packed, offsets = efficient_ops.pack_segments(features.cuda(), counts.cuda(), stamps.cuda(), stamp_lens.cuda(),
                                                  backend="triton")
    want, want_offsets = python_concat(features, counts, stamps, stamp_lens)
    assert torch.equal(offsets.cpu(), want_offsets) and torch.equal(packed.cpu(), want)
    h = torch.randn(n, d, generator=gen).to(dtype) / d ** 0.5
    w = torch.randn(2, d, generator=gen).to(dtype)
    out = efficient_ops.segment_relevance(h.cuda(), w[0].cuda(), w[1].cuda(), backend="triton")
    assert rel_err(out.cpu(), softmax_yes(h, w[0], w[1])) < 1e-3
