"""Tempo's kernels (see :mod:`efficient_ops.ops.tempo` for the semantics).

``_pack_segments``: grid (segment, row tile). Each program copies up to ``BLOCK_T`` rows of one segment's
packed chunk: its timestamp rows from ``stamps`` then its first ``counts[i]`` memory tokens from
``features`` (any strides), to ``packed[offsets[i] + row]``; rows past the chunk are masked off, so the
launch covers every segment's longest possible chunk (``L + K`` rows) without reading past an input.
One launch replaces the per-segment slice + ``torch.cat`` chain.

``_segment_relevance``: grid (row tile). ``BLOCK_N`` rows of ``h`` against ``w_yes - w_no``, reduced over
d in float32 in ``BLOCK_D`` chunks, then the sigmoid: the Yes/No GEMV of the LM head fused with the
two-logit softmax, reading ``h`` once.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _pack_segments(feat_ptr, counts_ptr, stamps_ptr, stamp_lens_ptr, offsets_ptr, out_ptr,
                   sfn, sfk, sfd, ssn, ssl, ssd, out_stride, D,
                   HAS_STAMPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    seg = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    count = tl.load(counts_ptr + seg).to(tl.int32)
    if HAS_STAMPS:
        sl = tl.where(count > 0, tl.load(stamp_lens_ptr + seg).to(tl.int32), 0)
    else:
        sl = 0
    start = tl.load(offsets_ptr + seg).to(tl.int64)
    in_chunk = rows < sl + count
    is_stamp = rows < sl
    is_feat = in_chunk & (rows >= sl)
    feat_rows = tl.where(is_feat, rows - sl, 0)
    seg64 = seg.to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        x = tl.load(feat_ptr + seg64 * sfn + feat_rows[:, None].to(tl.int64) * sfk + cols[None, :] * sfd,
                    mask=is_feat[:, None] & col_ok[None, :], other=0.0)
        if HAS_STAMPS:
            srows = tl.where(is_stamp, rows, 0)
            s = tl.load(stamps_ptr + seg64 * ssn + srows[:, None].to(tl.int64) * ssl + cols[None, :] * ssd,
                        mask=is_stamp[:, None] & col_ok[None, :], other=0.0)
            x = tl.where(is_stamp[:, None], s, x)
        tl.store(out_ptr + (start + rows[:, None].to(tl.int64)) * out_stride + cols[None, :], x,
                 mask=in_chunk[:, None] & col_ok[None, :])


@triton.jit
def _segment_relevance(h_ptr, wy_ptr, wn_ptr, out_ptr, n, D, shn, shd, swy, swn,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    acc = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        w = (tl.load(wy_ptr + cols * swy, mask=col_ok, other=0.0).to(tl.float32)
             - tl.load(wn_ptr + cols * swn, mask=col_ok, other=0.0).to(tl.float32))
        h = tl.load(h_ptr + rows[:, None].to(tl.int64) * shn + cols[None, :] * shd,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(h * w[None, :], axis=1)
    tl.store(out_ptr + rows, tl.sigmoid(acc), mask=row_ok)


def pack_segments(features, counts, stamps, stamp_lens, offsets, total):
    """Launch ``_pack_segments``; ``offsets`` (int32 ``[n + 1]``) and ``total`` come from the op layer."""
    n, k, d = features.shape
    out = torch.empty((total, d), dtype=features.dtype, device=features.device)
    max_len = k + (stamps.shape[1] if stamps is not None else 0)
    if n == 0 or total == 0 or d == 0:
        return out
    block_t = min(64, triton.next_power_of_2(max_len))
    block_d = min(256, triton.next_power_of_2(d))
    s = stamps if stamps is not None else features  # never read without stamps
    _pack_segments[(n, triton.cdiv(max_len, block_t))](
        features, counts, s, stamp_lens if stamp_lens is not None else counts, offsets, out,
        *features.stride(), *s.stride(), out.stride(0), d,
        HAS_STAMPS=stamps is not None, BLOCK_T=block_t, BLOCK_D=block_d)
    return out


def segment_relevance(h, w_yes, w_no):
    """Launch ``_segment_relevance``: float32 ``[n]``."""
    n, d = h.shape
    out = torch.empty(n, dtype=torch.float32, device=h.device)
    if n == 0:
        return out
    block_n = 16
    block_d = min(512, triton.next_power_of_2(max(d, 16)))
    _segment_relevance[(triton.cdiv(n, block_n),)](h, w_yes, w_no, out, n, d, *h.stride(), w_yes.stride(0),
                                                    w_no.stride(0), BLOCK_N=block_n, BLOCK_D=block_d)
    return out
