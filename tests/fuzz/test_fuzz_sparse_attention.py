"""Fuzz: block-sparse prefill (masks, patterns, FlexAttention interop) and page-selecting sparse decode."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import efficient_ops as eo

from ._helpers import all_backends, assert_close, generator, randn, seeds

BLOCK = st.sampled_from([16, 32])
NAN = float("nan")


def sdpa(q, k, v, allowed):
    """Independent: SDPA (math backend) with an explicit element mask, GQA by repetition; keyless rows give 0."""
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    any_key = allowed.any(-1, keepdim=True)
    return torch.where(any_key, F.scaled_dot_product_attention(q.double(), k, v, attn_mask=allowed | ~any_key), 0.0)


def element_mask(blocks, bm, bn, q_len, kv_len, causal):
    rows, cols = torch.arange(q_len), torch.arange(kv_len)
    allowed = blocks[:, :, rows // bm][..., cols // bn]
    return allowed & (cols[None, :] <= rows[:, None] + kv_len - q_len) if causal else allowed


def _mask(blocks, bm, bn, q_len, kv_len, causal, tail, strided):
    mask = eo.BlockSparseMask.from_dense(blocks, bm, bn, q_len, kv_len, causal)
    idx, num = mask.kv_indices, mask.kv_num_blocks
    if tail is not None:  # what the unlisted entries hold must not matter
        listed = torch.arange(idx.shape[-1]) < num[..., None]
        idx = torch.where(listed, idx, torch.full_like(idx, tail))
    if strided:  # query-block dimension not unit-stride
        num = num.transpose(1, 2).contiguous().transpose(1, 2)
        idx = idx.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    return dataclasses.replace(mask, kv_num_blocks=num, kv_indices=idx)


@pytest.mark.parametrize("backend", all_backends())
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.sampled_from([1, 2]), q_len=st.integers(1, 70),
       extra=st.integers(0, 40), bm=BLOCK, bn=BLOCK, density=st.floats(0, 1), causal=st.booleans(),
       per_batch=st.booleans(), per_head=st.booleans(), tail=st.sampled_from([None, 0, -1, 7]),
       strided=st.booleans(), nan_outside=st.booleans(), seed=seeds)
def test_block_sparse_matches_sdpa(backend, b, hkv, group, q_len, extra, bm, bn, density, causal, per_batch,
                                   per_head, tail, strided, nan_outside, seed):
    dtype = torch.float32 if backend == "reference" else torch.float16
    kv_len, hq = q_len + extra, hkv * group
    g = generator(seed)
    q, k, v = randn((b, hq, q_len, 64), dtype, g), randn((b, hkv, kv_len, 64), dtype, g), randn((b, hkv, kv_len, 64),
                                                                                                   dtype, g)
    mq, nk = -(-q_len // bm), -(-kv_len // bn)
    blocks = torch.rand(b if per_batch else 1, hq if per_head else 1, mq, nk, generator=g) < density
    mask = _mask(blocks, bm, bn, q_len, kv_len, causal, tail, strided)
    allowed = element_mask(blocks, bm, bn, q_len, kv_len, causal)
    if nan_outside:  # keys no query row attends are ignored: NaN there must not leak
        unused = ~allowed.expand(b, hq, q_len, kv_len).reshape(b, hkv, group * q_len, kv_len).any(2)
        k, v = k.masked_fill(unused[..., None], NAN), v.masked_fill(unused[..., None], NAN)
    out, lse = eo.block_sparse_attention(q, k, v, mask, return_lse=True, backend=backend)
    ref = sdpa(q, k.nan_to_num(), v.nan_to_num(), allowed)
    assert_close(out, ref, dtype, what=backend)
    keyless = ~allowed.expand(b, hq, q_len, kv_len).any(-1)
    assert torch.equal(torch.isneginf(lse), keyless), "lse = -inf exactly on the rows without keys"


@given(q_len=st.integers(1, 64), extra=st.integers(0, 40), bm=BLOCK, density=st.floats(0.1, 1), causal=st.booleans(),
       seed=seeds)
def test_to_flex_matches_flex_attention(q_len, extra, bm, density, causal, seed):
    """to_flex gives FlexAttention the same mask; from_flex(to_flex(m)) attends the same elements."""
    from torch.nn.attention.flex_attention import flex_attention

    kv_len = q_len + extra
    g = generator(seed)
    q, k, v = randn((1, 2, q_len, 64), torch.float64, g), randn((1, 2, kv_len, 64), torch.float64, g), \
        randn((1, 2, kv_len, 64), torch.float64, g)
    blocks = torch.rand(1, 2, -(-q_len // bm), -(-kv_len // bm), generator=g) < density
    blocks[..., 0] = True
    mask = eo.BlockSparseMask.from_dense(blocks, bm, bm, q_len, kv_len, causal)
    ours = eo.block_sparse_attention(q, k, v, mask)
    allowed = element_mask(blocks, bm, bm, q_len, kv_len, causal)
    keyed = allowed.any(-1, keepdim=True)
    theirs = flex_attention(q, k, v, block_mask=mask.to_flex())
    assert_close(torch.where(keyed, ours, 0), torch.where(keyed, theirs, 0), torch.float64)
    back = eo.BlockSparseMask.from_flex(mask.to_flex())  # the same element mask (blocks it masks whole dropped)
    assert torch.equal(element_mask(back.to_dense(), bm, bm, q_len, kv_len, back.causal), allowed)


@given(q_len=st.integers(1, 100), extra=st.integers(0, 60), bm=BLOCK, bn=BLOCK, density=st.floats(0.01, 1),
       seed=seeds)
def test_topk_blocks_every_row_has_a_key(q_len, extra, bm, bn, density, seed):
    g = generator(seed)
    q, k = randn((1, 2, q_len, 64), torch.float32, g), randn((1, 1, q_len + extra, 64), torch.float32, g)
    mask = eo.topk_blocks(q, k, density, bm, bn)
    allowed = element_mask(mask.to_dense(), bm, bn, q_len, q_len + extra, True)
    assert allowed.any(-1).all(), "a causal query row attends no key"


@given(q_len=st.integers(1, 100), extra=st.integers(0, 60), sink=st.integers(0, 40), window=st.integers(1, 60),
       bm=BLOCK, bn=BLOCK)
def test_streaming_covers_its_definition(q_len, extra, sink, window, bm, bn):
    """Every key a row must see (a sink, or within the window back from it, causally) is in a selected block,
    and no selected block lies wholly in the row block's future."""
    kv_len = q_len + extra
    mask = eo.streaming(q_len, kv_len, sink, window, bm, bn)
    allowed = element_mask(mask.to_dense(), bm, bn, q_len, kv_len, True)[0, 0]
    rows, cols = torch.arange(q_len)[:, None] + extra, torch.arange(kv_len)[None, :]
    needed = ((cols < sink) | (rows - cols < window)) & (cols <= rows)
    assert (allowed | ~needed).all()


@pytest.mark.parametrize("builder", ["vertical_slash", "anchor", "centroid"])
@given(q_len=st.integers(1, 70), extra=st.integers(0, 40), bm=BLOCK, bn=BLOCK, seed=seeds)
def test_pattern_builders_give_valid_causal_masks(builder, q_len, extra, bm, bn, seed):
    g = generator(seed)
    kv_len = q_len + extra
    q, k = randn((1, 2, q_len, 64), torch.float32, g), randn((1, 1, kv_len, 64), torch.float32, g)
    if builder == "vertical_slash":
        mask = eo.vertical_slash(q, k, 3, 3, 16, bm, bn)
    elif builder == "anchor":
        mask = eo.anchor(q, k, 1.0, bm, bn)
    else:
        mask = eo.centroid_select(q, *eo.kmeans_keys(k, min(3, kv_len), generator=g), top_k=2, block_m=bm, block_n=bn)
    v = randn((1, 1, kv_len, 64), torch.float32, g)
    _, lse = eo.block_sparse_attention(q, k, v, mask, return_lse=True)
    assert torch.isfinite(lse).all(), "a causal query row attends no key"


# ---------------------------------------------------------------------------------------------------- decode

def _decode_case(b, hkv, group, s_max, page_size, seed):
    g = generator(seed)
    q = randn((b, hkv * group, 64), torch.float32, g)
    k, v = randn((b, hkv, s_max, 64), torch.float32, g), randn((b, hkv, s_max, 64), torch.float32, g)
    lens = torch.randint(0, s_max + 1, (b,), generator=g)
    return q, k, v, lens


def _listed(pages, s_max, page_size):
    pos = torch.arange(s_max)
    return ((pos[None, None, :, None] // page_size) == pages.long()[:, :, None, :]).any(-1)


@pytest.mark.parametrize("backend", all_backends())
@given(b=st.integers(1, 3), hkv=st.integers(1, 2), group=st.sampled_from([1, 4]), s_max=st.integers(1, 150),
       page_size=st.sampled_from([16, 64]), n_sel=st.integers(0, 6), nan_ignored=st.booleans(), seed=seeds)
def test_paged_decode_matches_sdpa(backend, b, hkv, group, s_max, page_size, n_sel, nan_ignored, seed):
    dtype = torch.float32 if backend == "reference" else torch.float16
    q, k, v, lens = _decode_case(b, hkv, group, s_max, page_size, seed)
    n_pages = -(-s_max // page_size)
    g = generator(seed + 1)
    scores = torch.rand(b, hkv, n_pages, generator=g)
    chosen = scores.topk(min(n_sel, n_pages), -1).indices.sort(-1).values
    pages = torch.cat([chosen, torch.full((b, hkv, max(0, n_sel - n_pages)), -1)], -1).int()
    allowed = _listed(pages, s_max, page_size) & (torch.arange(s_max) < lens[:, None, None])
    if nan_ignored:  # cache tails past seq_len and unlisted pages are ignored, uninitialised memory included
        k, v = k.masked_fill(~allowed[..., None], NAN), v.masked_fill(~allowed[..., None], NAN)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = eo.paged_sparse_decode(q, k, v, lens, pages, page_size, backend=backend)
    ref = sdpa(q[:, :, None], k.nan_to_num(), v.nan_to_num(), allowed.repeat_interleave(group, 1)[:, :, None])[:, :, 0]
    assert_close(out, ref, dtype, what=backend)


def _select_bruteforce(q, kmin, kmax, lens, page_size, budget):
    b, hq, _ = q.shape
    hkv, n_pages = kmin.shape[1], kmin.shape[2]
    g = hq // hkv
    n_sel = min(max(2, budget // page_size), n_pages)
    out = torch.full((b, hkv, n_sel), -1, dtype=torch.int32)
    for row in range(b):
        n_valid = -(-int(lens[row]) // page_size)
        for h in range(hkv):
            qg = q[row, h * g:(h + 1) * g].double()
            bound = torch.maximum(qg[:, None] * kmax[row, h].double(), qg[:, None] * kmin[row, h].double()).sum((0, 2))
            forced = sorted({0, n_valid - 1}) if n_valid else []
            rest = sorted((p for p in range(n_valid) if p not in forced), key=lambda p: (-float(bound[p]), p))
            kept = sorted(forced + rest[:max(0, n_sel - len(forced))])
            out[row, h, :len(kept)] = torch.tensor(kept, dtype=torch.int32)
    return out


@given(b=st.integers(1, 3), hkv=st.integers(1, 2), group=st.sampled_from([1, 2]), s_max=st.integers(1, 200),
       page_size=st.sampled_from([16, 64]), budget=st.integers(1, 200), seed=seeds)
def test_select_pages_matches_bruteforce(b, hkv, group, s_max, page_size, budget, seed):
    q, k, _, lens = _decode_case(b, hkv, group, s_max, page_size, seed)
    summary = eo.PageSummary.build(k, lens, page_size)
    got = eo.select_pages(q, summary, lens, budget)
    assert torch.equal(got, _select_bruteforce(q, summary.kmin, summary.kmax, lens, page_size, budget))


@given(b=st.integers(1, 3), s_max=st.integers(1, 150), page_size=st.sampled_from([16, 64]),
       steps=st.lists(st.integers(-40, 40), min_size=1, max_size=4), bounded=st.booleans(), seed=seeds)
def test_page_summary_update_equals_build(b, s_max, page_size, steps, bounded, seed):
    """After any sequence of appends and rollbacks, the updated summary equals one built from scratch."""
    g = generator(seed)
    k = randn((b, 2, s_max, 8), torch.float32, g)
    lens = torch.randint(0, s_max + 1, (b,), generator=g)
    summary = eo.PageSummary.build(k, lens, page_size)
    for step in steps:
        new = (lens + step).clamp(0, s_max)
        summary.update(k, new, max_new_tokens=max(abs(step), 1) if bounded else None)
        lens = new
    fresh = eo.PageSummary.build(k, lens, page_size)
    assert torch.equal(summary.kmin, fresh.kmin) and torch.equal(summary.kmax, fresh.kmax)
    assert torch.equal(summary.seq_lens, fresh.seq_lens)
