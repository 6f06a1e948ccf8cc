"""Block-sparse attention, the sparsity patterns and page-selecting sparse decode (formats.sparse_attention,
ops.sparse_attention).

Every mask is checked three ways: the reference (dense attention with the mask expanded per element),
FlexAttention with the equivalent mask (eager, on CPU: an independent implementation), and the Triton
kernel under the interpreter. The patterns are checked against brute-force loops over blocks.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import efficient_ops as eo
from efficient_ops.backends import BackendUnavailableError
from efficient_ops.reference import sparse_attention as reference

from conftest import rel_err

pytest.importorskip("triton")
flex = pytest.importorskip("torch.nn.attention.flex_attention")


def flex_attention(q, k, v, mask):
    """FlexAttention (eager: it materialises the scores with mask_mod applied per element) in float64."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        return flex.flex_attention(q.double(), k.double(), v.double(), block_mask=mask.to_flex(), return_lse=True,
                                   enable_gqa=q.shape[1] != k.shape[1])


def qkv(b, hq, hkv, sq, skv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, sq, d, generator=g).to(dtype), torch.randn(b, hkv, skv, d, generator=g).to(dtype),
            torch.randn(b, hkv, skv, d, generator=g).to(dtype))


def random_mask(shape, block_m, block_n, sq, skv, causal, density, seed):
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(*shape, -(-sq // block_m), -(-skv // block_n), generator=g) < density
    dense.view(-1, dense.shape[-1])[0] = False  # an empty query block
    return eo.BlockSparseMask.from_dense(dense, block_m, block_n, sq, skv, causal)


def check_outputs(out, lse, want, want_lse, tol):
    assert rel_err(out, want) < tol
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))  # empty rows: lse = -inf, output 0
    finite = torch.isfinite(want_lse)
    assert torch.allclose(lse[finite].double(), want_lse[finite].double(), atol=1e-3)
    assert torch.all(out[~finite] == 0)


# ---------------------------------------------------------------------------------------------------- the mask

def test_mask_dense_round_trip_and_layout():
    dense = torch.rand(2, 3, 5, 7) < 0.4
    m = eo.BlockSparseMask.from_dense(dense, 32, 16)
    assert torch.equal(m.to_dense(), dense)
    assert m.kv_num_blocks.dtype == m.kv_indices.dtype == torch.int32
    assert (m.q_len, m.kv_len) == (160, 112)
    for idx in torch.nonzero(torch.ones(2, 3, 5)).tolist():
        n = int(m.kv_num_blocks[tuple(idx)])
        assert m.kv_indices[tuple(idx)][:n].tolist() == torch.nonzero(dense[tuple(idx)])[:, 0].tolist()


def test_mask_from_flex():
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    block_mask = flex.create_block_mask(causal, 1, 1, 200, 200, device="cpu", BLOCK_SIZE=(64, 32))
    m = eo.BlockSparseMask.from_flex(block_mask, causal=True)
    assert torch.equal(m.to_dense(), block_mask.to_dense().bool())  # partial and full blocks together
    assert (m.block_m, m.block_n, m.q_len, m.kv_len, m.causal) == (64, 32, 200, 200, True)


def test_mask_validation():
    with pytest.raises(ValueError, match="block_m"):
        eo.BlockSparseMask.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool), 48, 16)
    with pytest.raises(ValueError, match="kv_num_blocks"):
        eo.BlockSparseMask(torch.zeros(1, 1, 3, dtype=torch.int32), torch.zeros(1, 1, 3, 2, dtype=torch.int32),
                           16, 16, 20, 20)
    with pytest.raises(ValueError, match="kv_indices"):
        eo.BlockSparseMask(torch.zeros(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 2, dtype=torch.int64),
                           16, 16, 20, 20)


# ---------------------------------------------------------------------------------------------------- prefill

@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_flex_attention(causal):
    q, k, v = qkv(2, 4, 2, 45, 70, 16, torch.float64, seed=1)
    m = random_mask((2, 4), 16, 32, 45, 70, causal, 0.5, seed=2)
    out, lse = eo.block_sparse_attention(q, k, v, m, return_lse=True, backend="reference")
    want, want_lse = flex_attention(q, k, v, m)
    check_outputs(out, lse, want, want_lse, 1e-12)


CASES = [  # b, hq, hkv, sq, skv, d, block_m, block_n, mask dims, causal
    (1, 1, 1, 1, 1, 64, 16, 16, (1, 1), False),
    (2, 4, 2, 70, 100, 64, 16, 32, (2, 4), True),
    (1, 4, 1, 33, 200, 128, 32, 16, (1, 1), True),
    (2, 2, 2, 130, 130, 64, 64, 64, (1, 2), False),
    (1, 2, 2, 200, 150, 64, 128, 16, (1, 1), True),  # Sq > Skv: early rows see nothing
    (1, 1, 1, 100, 300, 64, 16, 128, (1, 1), False),
    (1, 2, 1, 50, 70, 256, 32, 32, (1, 2), True),  # head_dim 256: Triton only
]


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference_and_flex(case, poison_outputs):
    b, hq, hkv, sq, skv, d, bm, bn, dims, causal = case
    q, k, v = qkv(b, hq, hkv, sq, skv, d, torch.float16, seed=sq + skv)
    m = random_mask(dims, bm, bn, sq, skv, causal, 0.4, seed=d + bm)
    out, lse = eo.block_sparse_attention(q, k, v, m, return_lse=True, backend="triton")
    ref, ref_lse = eo.block_sparse_attention(q, k, v, m, return_lse=True, backend="reference")
    want, want_lse = flex_attention(q, k, v, m)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    check_outputs(out, lse, ref, ref_lse, 2e-3)
    check_outputs(out, lse, want, want_lse, 2e-3)


def test_full_density_equals_sdpa():
    q, k, v = qkv(1, 2, 2, 50, 90, 64, torch.float16, seed=3)
    m = eo.BlockSparseMask.from_dense(torch.ones(1, 1, 4, 3, dtype=torch.bool), 16, 32, 50, 90, causal=True)
    out = eo.block_sparse_attention(q, k, v, m, backend="triton")
    mask = torch.arange(90)[None, :] <= torch.arange(50)[:, None] + 40
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    assert rel_err(out, want) < 2e-3


def test_strided_inputs():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 40, 2, 64, generator=g).half().transpose(1, 2)  # [B, S, H, D] layouts, as models keep them
    k = torch.randn(1, 60, 2, 64, generator=g).half().transpose(1, 2)
    v = torch.randn(1, 60, 2, 64, generator=g).half().transpose(1, 2)
    m = random_mask((1, 2), 16, 16, 40, 60, True, 0.6, seed=5)
    out = eo.block_sparse_attention(q, k, v, m, backend="triton")
    assert rel_err(out, eo.block_sparse_attention(q, k, v, m, backend="reference")) < 2e-3


def test_block_sparse_bad_inputs():
    q, k, v = qkv(1, 2, 1, 40, 40, 64, torch.float16, seed=0)
    m = random_mask((1, 1), 16, 16, 40, 40, False, 0.5, seed=0)
    op = torch.ops.efficient_ops.block_sparse_attention
    with pytest.raises(ValueError, match="mask"):
        eo.block_sparse_attention(q[:, :, :30], k, v, m)
    with pytest.raises(ValueError, match="kv_indices"):
        bad = m.kv_indices.clone()
        bad[0, 0, 1, : int(m.kv_num_blocks[0, 0, 1])] = 7
        op(q, k, v, m.kv_num_blocks, bad, 16, 16, False)
    with pytest.raises(ValueError, match="twice"):
        num = torch.full_like(m.kv_num_blocks, 2)
        op(q, k, v, num, torch.zeros_like(m.kv_indices), 16, 16, False)
    with pytest.raises(ValueError, match="kv_num_blocks"):
        op(q, k, v, m.kv_num_blocks + 5, m.kv_indices, 16, 16, False)
    with pytest.raises(ValueError, match="kv_num_blocks"):
        op(q, k, v, m.kv_num_blocks.expand(1, 3, -1), m.kv_indices.expand(1, 3, -1, -1), 16, 16, False)
    with pytest.raises(ValueError, match="query heads"):
        eo.block_sparse_attention(q[:, :1], k.expand(1, 2, -1, -1), v.expand(1, 2, -1, -1), m)
    with pytest.raises(TypeError, match="v"):
        eo.block_sparse_attention(q, k, v.float(), m)
    with pytest.raises(TypeError, match="mask"):
        eo.block_sparse_attention(q, k, v, m.to_dense())
    with pytest.raises(BackendUnavailableError, match="cuda"):
        eo.block_sparse_attention(q, k, v, m, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="head_dim"):
        eo.block_sparse_attention(q[..., :32], k[..., :32], v[..., :32], m, backend="triton")


def test_block_sparse_opcheck():
    q, k, v = qkv(1, 2, 1, 40, 40, 16, torch.float32, seed=0)
    m = random_mask((1, 2), 16, 16, 40, 40, True, 0.5, seed=0)
    torch.library.opcheck(torch.ops.efficient_ops.block_sparse_attention,
                          (q, k, v, m.kv_num_blocks, m.kv_indices, 16, 16, True), {"backend": "reference"})


# ---------------------------------------------------------------------------------------------------- patterns

def blocks_from_keys(keep, block_m, block_n):
    """Bool [..., Mq, Nk] from a per-element [..., Sq, Skv] keep map (any element kept keeps the block)."""
    sq, skv = keep.shape[-2:]
    mq, nk = -(-sq // block_m), -(-skv // block_n)
    padded = torch.zeros(*keep.shape[:-2], mq * block_m, nk * block_n, dtype=torch.bool)
    padded[..., :sq, :skv] = keep
    return padded.view(*keep.shape[:-2], mq, block_m, nk, block_n).any(-1).any(-2)


def causal_keys(sq, skv):
    return torch.arange(skv)[None, :] <= torch.arange(sq)[:, None] + (skv - sq)


def kernels_honour(q, k, v, mask):
    """The Triton kernel and the reference agree with FlexAttention on this mask."""
    out, lse = eo.block_sparse_attention(q, k, v, mask, return_lse=True, backend="triton")
    want, want_lse = flex_attention(q, k, v, mask)
    check_outputs(out, lse, want, want_lse, 2e-3)
    ref, ref_lse = eo.block_sparse_attention(q, k, v, mask, return_lse=True, backend="reference")
    check_outputs(ref, ref_lse, want, want_lse, 2e-3)


def test_streaming():
    sq, skv, sink, window = 90, 130, 5, 20
    m = eo.streaming(sq, skv, sink=sink, window=window, block_m=16, block_n=16, n_heads=3, dense_heads=[1])
    i = torch.arange(sq)[:, None] + (skv - sq)
    j = torch.arange(skv)[None, :]
    keys = (j < sink) | ((j > i - window) & (j <= i))
    want = blocks_from_keys(keys, 16, 16)
    dense = m.to_dense()
    assert torch.equal(dense[0, 0], want) and torch.equal(dense[0, 2], want)
    assert torch.equal(dense[0, 1], blocks_from_keys(causal_keys(sq, skv), 16, 16))
    assert m.causal and dense.shape == (1, 3, 6, 9)
    q, k, v = qkv(1, 3, 1, sq, skv, 64, torch.float16, seed=6)
    kernels_honour(q, k, v, m)


def brute_vertical_slash(q, k, n_vertical, n_slash, last_q, bm, bn):
    b, h, sq, d = q.shape
    skv = k.shape[2]
    g = h // k.shape[1]
    want = torch.zeros(b, h, -(-sq // bm), -(-skv // bn), dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            pos = torch.arange(sq - last_q, sq) + skv - sq
            s = (q[bi, hi, -last_q:].float() @ k[bi, hi // g].float().T) / math.sqrt(d)
            a = torch.softmax(s.masked_fill(torch.arange(skv)[None, :] > pos[:, None], float("-inf")), -1)
            vertical = a.sum(0)
            slash = torch.zeros(skv)
            for r in range(last_q):
                for j in range(int(pos[r]) + 1):
                    slash[int(pos[r]) - j] += a[r, j]
            vertical[0] = slash[0] = float("inf")
            cols = set(vertical.topk(n_vertical).indices.tolist())
            diags = set(slash.topk(n_slash).indices.tolist())
            for i in range(sq):
                for j in range(int(i + skv - sq) + 1):
                    if j in cols or (i + skv - sq - j) in diags:
                        want[bi, hi, i // bm, j // bn] = True
    return want


def test_vertical_slash():
    q, k, v = qkv(1, 2, 1, 70, 100, 64, torch.float16, seed=7)
    m = eo.vertical_slash(q, k, n_vertical=6, n_slash=4, last_q=16, block_m=16, block_n=16)
    want = brute_vertical_slash(q, k, 6, 4, 16, 16, 16)
    assert torch.equal(m.to_dense(), want)
    assert 0.1 < m.density() < 0.9
    kernels_honour(q, k, v, m)


def test_anchor():
    q, k, v = qkv(2, 2, 1, 64, 96, 64, torch.float16, seed=8)
    theta = 0.3
    m = eo.anchor(q, k, theta=theta, block_m=16, block_n=16, init_blocks=1, local_blocks=2)
    want = torch.zeros(2, 2, 4, 6, dtype=torch.bool)
    for b in range(2):
        for h in range(2):
            for mb in range(4):
                rows = q[b, h, mb * 16 : (mb + 1) * 16].float()
                last = min(mb * 16 + 15, 63) + 32
                s = (rows.mean(0) @ k[b, 0].float().T) / 8
                diag = last // 16
                always = {0, diag, diag - 1}
                block_max = {n: float(s[n * 16 : min((n + 1) * 16, last + 1)].max()) for n in range(diag + 1)}
                top = max(block_max[n] for n in always if 0 <= n <= diag)
                for n in range(diag + 1):
                    want[b, h, mb, n] = n in always or block_max[n] >= top - theta
    assert torch.equal(m.to_dense(), want)
    kernels_honour(q, k, v, m)


def test_kmeans_and_centroid_select():
    q, k, v = qkv(1, 2, 1, 32, 160, 64, torch.float16, seed=9)
    centroids, assign = eo.kmeans_keys(k, n_clusters=8, generator=torch.Generator().manual_seed(0))
    assert centroids.shape == (1, 1, 8, 64) and assign.shape == (1, 1, 160)
    assert torch.equal(assign[0, 0], torch.cdist(k[0, 0].float(), centroids[0, 0]).argmin(-1))  # nearest centroid
    for c in range(8):  # each centroid is the mean of its keys
        members = k[0, 0][assign[0, 0] == c].float()
        if len(members):
            assert torch.allclose(centroids[0, 0, c], members.mean(0), atol=1e-4)
    everything = eo.centroid_select(q, centroids, assign, top_k=8, block_m=16, block_n=32)
    assert torch.equal(everything.to_dense()[0, 0], blocks_from_keys(causal_keys(32, 160), 16, 32))
    m = eo.centroid_select(q, centroids, assign, top_k=2, block_m=16, block_n=32, causal=False)
    pooled = q.float().view(1, 2, 2, 16, 64).mean(3)
    for h in range(2):
        for mb in range(2):
            chosen = set((pooled[0, h, mb] @ centroids[0, 0].T).topk(2).indices.tolist())
            keys = torch.tensor([int(a) in chosen for a in assign[0, 0]])
            assert torch.equal(m.to_dense()[0, h, mb], blocks_from_keys(keys[None], 1, 32)[0])
    mt = eo.centroid_select(q, centroids, assign, threshold=0.2, block_m=16, block_n=32)
    assert 0 < mt.density() <= 1
    kernels_honour(q, k, v, m)
    kernels_honour(q, k, v, mt)
    with pytest.raises(ValueError, match="exactly one"):
        eo.centroid_select(q, centroids, assign)


@pytest.mark.parametrize("causal", [True, False])
def test_topk_blocks(causal):
    q, k, v = qkv(1, 4, 2, 100, 140, 64, torch.float16, seed=10)
    m = eo.topk_blocks(q, k, density=0.3, block_m=32, block_n=16, causal=causal)
    dense = m.to_dense()
    reachable = blocks_from_keys(causal_keys(100, 140), 32, 16) if causal else torch.ones(4, 9, dtype=torch.bool)
    assert not (dense & ~reachable).any()
    assert torch.equal(dense.sum(-1), torch.ceil(0.3 * reachable.sum(-1).float()).int().expand(1, 4, -1))
    if causal:
        last = torch.tensor([31, 63, 95, 99]) + 40
        assert dense[0, :, torch.arange(4), last // 16].all()
    assert torch.equal(eo.topk_blocks(q, k, 1.0, 32, 16, causal).to_dense()[0, 0], reachable)
    kernels_honour(q, k, v, m)


# ---------------------------------------------------------------------------------------------------- decode

def brute_summary(k_cache, seq_lens, page):
    b, h, s, d = k_cache.shape
    n = -(-s // page)
    kmin, kmax = torch.zeros(b, h, n, d, dtype=k_cache.dtype), torch.zeros(b, h, n, d, dtype=k_cache.dtype)
    for bi in range(b):
        for p in range(n):
            tokens = k_cache[bi, :, p * page : min((p + 1) * page, int(seq_lens[bi]))]
            if tokens.shape[1]:
                kmin[bi, :, p], kmax[bi, :, p] = tokens.amin(1), tokens.amax(1)
    return kmin, kmax


@pytest.mark.parametrize("page", [16, 64])
def test_page_summary_build_and_update(page):
    g = torch.Generator().manual_seed(11)
    k_cache = torch.randn(3, 2, 300, 8, generator=g).half()
    seq_lens = torch.tensor([0, 17, 250])
    summary = eo.PageSummary.build(k_cache, seq_lens, page)
    for got, want in zip((summary.kmin, summary.kmax), brute_summary(k_cache, seq_lens, page)):
        assert torch.equal(got, want)
    for new in (torch.tensor([1, 18, 251]), torch.tensor([40, 18, 300])):  # one token; then many, across pages
        summary.update(k_cache, new)
        for got, want in zip((summary.kmin, summary.kmax), brute_summary(k_cache, new, page)):
            assert torch.equal(got, want)
    # with a bound on the new tokens (no host synchronisation, for CUDA graphs)
    summary = eo.PageSummary.build(k_cache, seq_lens, page)
    for step in range(1, 4):
        new = (seq_lens + 17 * step).clamp_max(300)  # lengths past the cache are rejected
        summary.update(k_cache, new, max_new_tokens=17)
        for got, want in zip((summary.kmin, summary.kmax), brute_summary(k_cache, new, page)):
            assert torch.equal(got, want)


def decode_inputs(b, hq, hkv, s_max, d, seq, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, d, generator=g).to(dtype), torch.randn(b, hkv, s_max, d, generator=g).to(dtype),
            torch.randn(b, hkv, s_max, d, generator=g).to(dtype), torch.tensor(seq))


@pytest.mark.parametrize("page, budget", [(16, 64), (16, 1000), (64, 128), (16, 1)])
def test_select_pages_matches_reference(page, budget):
    q, k, _, seq_lens = decode_inputs(3, 8, 2, 500, 64, [500, 33, 0], torch.float16, seed=page + budget)
    summary = eo.PageSummary.build(k, seq_lens, page)
    pages = eo.select_pages(q, summary, seq_lens, budget)
    want = reference.select_pages(q, summary.kmin, summary.kmax, seq_lens, page, budget)
    assert torch.equal(pages, want)
    n_valid = (seq_lens + page - 1) // page
    for b in range(3):
        for h in range(2):
            kept = [p for p in pages[b, h].tolist() if p >= 0]
            assert len(kept) == min(pages.shape[2], int(n_valid[b]))
            if n_valid[b]:
                assert 0 in kept and int(n_valid[b]) - 1 in kept


@pytest.mark.parametrize("g_heads, page, d", [(1, 16, 64), (4, 64, 128), (8, 16, 64)])
def test_paged_decode_triton_reference_and_sdpa(g_heads, page, d, poison_outputs):
    q, k, v, seq_lens = decode_inputs(3, 2 * g_heads, 2, 400, d, [400, 70, 0], torch.float16, seed=d + page)
    summary = eo.PageSummary.build(k, seq_lens, page)
    pages = eo.select_pages(q, summary, seq_lens, 130)
    pages[0, 1, -1] = -1  # an unused slot
    out = eo.paged_sparse_decode(q, k, v, seq_lens, pages, page, backend="triton")
    ref = eo.paged_sparse_decode(q, k, v, seq_lens, pages, page, backend="reference")
    assert rel_err(out, ref) < 2e-3
    assert torch.all(out[2] == 0)  # an empty row
    for b in range(2):  # independent: SDPA over the gathered positions of each KV head
        for h in range(2):
            listed = [p for p in pages[b, h].tolist() if p >= 0]
            pos = torch.cat([torch.arange(p * page, min((p + 1) * page, int(seq_lens[b]))) for p in listed])
            heads = slice(h * g_heads, (h + 1) * g_heads)
            want = F.scaled_dot_product_attention(q[b, heads, None].float(), k[b, h, pos].float()[None],
                                                  v[b, h, pos].float()[None])[:, 0]
            assert rel_err(out[b, heads], want) < 2e-3


def test_sparse_decode_with_a_full_budget_is_dense_decode():
    q, k, v, seq_lens = decode_inputs(2, 4, 2, 256, 64, [256, 100], torch.float16, seed=12)
    summary = eo.PageSummary.build(k, seq_lens, 16)
    out = eo.sparse_decode_attention(q, k, v, seq_lens, summary, token_budget=256, backend="triton")
    for b in range(2):
        n = int(seq_lens[b])
        want = F.scaled_dot_product_attention(q[b, :, None].float(), k[b, :, :n].float().repeat_interleave(2, 0),
                                              v[b, :, :n].float().repeat_interleave(2, 0))[:, 0]
        assert rel_err(out[b], want) < 2e-3


def test_decode_bad_inputs():
    q, k, v, seq_lens = decode_inputs(2, 4, 2, 64, 64, [64, 10], torch.float16, seed=0)
    pages = torch.tensor([[[0, 1], [0, 2]], [[0, -1], [0, -1]]], dtype=torch.int32)
    with pytest.raises(ValueError, match="twice"):
        eo.paged_sparse_decode(q, k, v, seq_lens, torch.zeros_like(pages), 16)
    with pytest.raises(ValueError, match="page_indices"):
        eo.paged_sparse_decode(q, k, v, seq_lens, pages + 4, 16)
    with pytest.raises(ValueError, match="page_indices"):
        eo.paged_sparse_decode(q, k, v, seq_lens, pages.long(), 16)
    with pytest.raises(ValueError, match="seq_lens"):
        eo.paged_sparse_decode(q, k, v, torch.tensor([65, 1]), pages, 16)
    with pytest.raises(ValueError, match="page_size"):
        eo.paged_sparse_decode(q, k, v, seq_lens, pages, 32)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        eo.paged_sparse_decode(q, k, v, seq_lens, pages, 16, backend="cuda")
    with pytest.raises(ValueError, match="page_size"):
        eo.PageSummary.build(k, seq_lens, 32)


def test_decode_opcheck():
    q, k, v, seq_lens = decode_inputs(2, 4, 2, 64, 16, [64, 10], torch.float32, seed=0)
    summary = eo.PageSummary.build(k, seq_lens, 16)
    torch.library.opcheck(torch.ops.efficient_ops.select_pages, (q, summary.kmin, summary.kmax, seq_lens, 16, 32))
    pages = eo.select_pages(q, summary, seq_lens, 32)
    torch.library.opcheck(torch.ops.efficient_ops.paged_sparse_decode, (q, k, v, seq_lens, pages, 16),
                          {"backend": "reference"})


@pytest.mark.skipif(eo.backends.extension() is None or torch.cuda.is_available(),
                    reason="needs efficient_ops._C and no GPU (the launch must fail)")
def test_cuda_runners_pass_the_extension_checks(fake_cuda_launch):
    """The ops' cuda runners on CPU tensors: the real bindings accept their keyword arguments and every size,
    stride and pointer check, and only the kernel launch fails (no GPU)."""
    from efficient_ops.ops import sparse_attention as ops

    q, k, v = qkv(2, 4, 2, 70, 100, 64, torch.bfloat16, seed=0)
    m = random_mask((1, 4), 16, 32, 70, 100, True, 0.5, seed=0)
    with pytest.raises(RuntimeError, match="block_sparse_attention: CUDA launch failed"):
        ops._run_block_sparse_cuda(q, k, v, m.kv_num_blocks, m.kv_indices, 16, 32, True, 0.125)
    qd, kc, vc, seq_lens = decode_inputs(2, 8, 2, 300, 128, [300, 20], torch.float16, seed=0)
    pages = eo.select_pages(qd, eo.PageSummary.build(kc, seq_lens, 16), seq_lens, 64)
    with pytest.raises(RuntimeError, match="paged_sparse_decode: CUDA launch failed"):
        ops._run_decode_cuda(qd, kc, vc, seq_lens, pages, 16, 0.1)


def test_block_sparse_and_decode_under_torch_compile():
    q, k, v = qkv(1, 2, 1, 40, 40, 16, torch.float32, seed=0)
    m = random_mask((1, 2), 16, 16, 40, 40, True, 0.5, seed=0)
    qd, kc, vc, seq_lens = decode_inputs(2, 4, 2, 64, 16, [64, 10], torch.float32, seed=0)
    summary = eo.PageSummary.build(kc, seq_lens, 16)

    def step(q, k, v, qd):
        o, lse = eo.block_sparse_attention(q, k, v, m, return_lse=True, backend="reference")
        return o, lse, eo.sparse_decode_attention(qd, kc, vc, seq_lens, summary, 32, backend="reference")

    want = step(q, k, v, qd)
    got = torch.compile(step, fullgraph=True)(q, k, v, qd)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-6)  # equal -inf lse entries count as close
