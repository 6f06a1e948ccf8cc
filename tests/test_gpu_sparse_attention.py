"""Block-sparse attention and sparse decode on a CUDA GPU: every kernel backend against the reference
(bfloat16 included, which the interpreter cannot check), long sequences, every block size pair, GQA, and
CUDA-graph capture of the decode path. Run with ``pytest -m gpu``."""

import pytest
import torch

import efficient_ops as eo

from conftest import gpu_kernel_backends, rel_err

pytestmark = pytest.mark.gpu
DTYPES = (torch.float16, torch.bfloat16)


def qkv(b, hq, hkv, sq, skv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, s, d, generator=g).to("cuda", dtype)
                 for h, s in ((hq, sq), (hkv, skv), (hkv, skv)))


def check(out, lse, ref, ref_lse):
    assert rel_err(out, ref) < 1e-2
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite], ref_lse[finite], atol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_m, block_n", [(16, 16), (32, 64), (64, 128), (128, 128), (128, 32)])
@pytest.mark.parametrize("causal", [True, False])
def test_block_sparse_backends_match_reference(dtype, block_m, block_n, causal, poison_outputs):
    q, k, v = qkv(2, 8, 2, 1000, 1300, 128, dtype, seed=block_m + block_n)
    mask = eo.topk_blocks(q, k, density=0.3, block_m=block_m, block_n=block_n, causal=causal)
    ref, ref_lse = eo.block_sparse_attention(q, k, v, mask, return_lse=True, backend="reference")
    for backend in gpu_kernel_backends():
        out, lse = eo.block_sparse_attention(q, k, v, mask, return_lse=True, backend=backend)
        check(out, lse, ref, ref_lse)


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_sparse_head_dim_256_on_triton(dtype):
    q, k, v = qkv(1, 4, 2, 700, 900, 256, dtype, seed=2)
    mask = eo.topk_blocks(q, k, density=0.4, block_m=64, block_n=64)
    out, lse = eo.block_sparse_attention(q, k, v, mask, return_lse=True, backend="triton")
    check(out, lse, *eo.block_sparse_attention(q, k, v, mask, return_lse=True, backend="reference"))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_block_sparse_long_sequence_patterns(backend):
    if backend not in gpu_kernel_backends():
        pytest.skip(f"{backend} unavailable")
    q, k, v = qkv(1, 4, 1, 8192, 8192, 64, torch.bfloat16, seed=1)
    for mask in (eo.streaming(8192, 8192, sink=64, window=1024, block_m=128, block_n=64, n_heads=4, dense_heads=[2]),
                 eo.vertical_slash(q, k, n_vertical=256, n_slash=256, block_m=64, block_n=64),
                 eo.anchor(q, k, theta=2.0, block_m=128, block_n=128)):
        out, lse = eo.block_sparse_attention(q, k, v, mask, return_lse=True, backend=backend)
        ref, ref_lse = eo.block_sparse_attention(q[:, :, -512:], k, v, _last_rows(mask, 512), return_lse=True,
                                                 backend="reference")
        check(out[:, :, -512:], lse[:, :, -512:], ref, ref_lse)


def _last_rows(mask, rows):
    """The mask of the last ``rows`` queries (a whole number of query blocks), for a cheaper reference."""
    blocks = rows // mask.block_m
    return eo.BlockSparseMask(mask.kv_num_blocks[:, :, -blocks:].contiguous(),
                              mask.kv_indices[:, :, -blocks:].contiguous(), mask.block_m, mask.block_n, rows,
                              mask.kv_len, mask.causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page, g_heads, d", [(16, 4, 128), (64, 8, 64), (16, 1, 128)])
def test_paged_decode_backends_match_reference_and_capture(dtype, page, g_heads, d):
    g = torch.Generator().manual_seed(page + d)
    b, hkv, s_max = 3, 2, 5000
    q = torch.randn(b, hkv * g_heads, d, generator=g).to("cuda", dtype)
    k = torch.randn(b, hkv, s_max, d, generator=g).to("cuda", dtype)
    v = torch.randn(b, hkv, s_max, d, generator=g).to("cuda", dtype)
    seq_lens = torch.tensor([5000, 1234, 1], device="cuda")
    summary = eo.PageSummary.build(k, seq_lens, page)
    pages = eo.select_pages(q, summary, seq_lens, 1024)
    ref = eo.paged_sparse_decode(q, k, v, seq_lens, pages, page, backend="reference")
    for backend in gpu_kernel_backends():
        out = eo.paged_sparse_decode(q, k, v, seq_lens, pages, page, backend=backend)
        assert rel_err(out, ref) < 1e-2, backend
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = eo.sparse_decode_attention(q, k, v, seq_lens, summary, 1024, backend=backend)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, out), backend


def test_page_summary_update_on_gpu():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 2, 300, 64, generator=g).to("cuda", torch.bfloat16)
    summary = eo.PageSummary.build(k, torch.tensor([100, 5], device="cuda"), 16)
    summary.update(k, torch.tensor([101, 90], device="cuda"))
    fresh = eo.PageSummary.build(k, torch.tensor([101, 90], device="cuda"), 16)
    assert torch.equal(summary.kmin, fresh.kmin) and torch.equal(summary.kmax, fresh.kmax)
