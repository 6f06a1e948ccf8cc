"""Tempo's two kernels in plain PyTorch (the executable specification; see :mod:`efficient_ops.ops.tempo`).

- ``pack_segments``: keep the first ``counts[i]`` of each segment's ``K`` memory tokens (head truncation) and
  concatenate the segments in order; optionally each kept chunk is preceded by its segment's first
  ``stamp_lens[i]`` timestamp embeddings. A segment that keeps no token is dropped with its timestamp.
- ``segment_relevance``: ``sigmoid(h . (w_yes - w_no))``, the probability of "Yes" in a softmax over the
  Yes/No logits of the language-model head, computed in float32.
"""

from typing import Optional, Tuple

import torch


def segment_lengths(counts: torch.Tensor, stamp_lens: Optional[torch.Tensor]) -> torch.Tensor:
    """Rows each segment occupies in the packed output (int64): its kept tokens plus, when it keeps any, its
    timestamp tokens."""
    lens = counts.long()
    if stamp_lens is not None:
        lens = lens + torch.where(lens > 0, stamp_lens.long(), 0)
    return lens


def pack_segments(features: torch.Tensor, counts: torch.Tensor, stamps: Optional[torch.Tensor] = None,
                  stamp_lens: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``features [n, K, d]``, ``counts [n]`` (and ``stamps [n, L, d]``, ``stamp_lens [n]``) ->
    ``(packed [total, d], offsets int32 [n + 1])``; segment i fills rows ``offsets[i] .. offsets[i + 1]``."""
    n, _, d = features.shape
    lens = segment_lengths(counts, stamp_lens)
    offsets = torch.zeros(n + 1, dtype=torch.long, device=features.device)
    torch.cumsum(lens, 0, out=offsets[1:])
    total = int(offsets[-1])
    seg = torch.repeat_interleave(torch.arange(n, device=features.device), lens, output_size=total)
    row = torch.arange(total, device=features.device) - offsets[seg]  # row inside the segment's chunk
    packed = features.new_empty((total, d))
    if stamps is None:
        packed[:] = features[seg, row]
    else:
        sl = stamp_lens.long()[seg]
        is_stamp = row < sl
        packed[is_stamp] = stamps[seg[is_stamp], row[is_stamp]]
        packed[~is_stamp] = features[seg[~is_stamp], (row - sl)[~is_stamp]]
    return packed, offsets.to(torch.int32)


def segment_relevance(h: torch.Tensor, w_yes: torch.Tensor, w_no: torch.Tensor) -> torch.Tensor:
    """``h [n, d]``, ``w_yes``/``w_no [d]`` -> float32 ``[n]`` = ``sigmoid(h . (w_yes - w_no))``."""
    return torch.sigmoid(h.float() @ (w_yes.float() - w_no.float()))
