"""``efficient_ops::pack_segments`` and ``efficient_ops::segment_relevance``: Tempo's packing and relevance.

    pack_segments:      packed = cat_i [stamps[i, :stamp_lens[i]], features[i, :counts[i]]]  (segments keeping
                        no token dropped with their timestamp), offsets = cu_seqlens of the chunks
    segment_relevance:  s_i = sigmoid(h_i . (w_yes - w_no)) = softmax([h_i . w_yes, h_i . w_no])[0]

Backends: ``reference`` (any device, any float dtype) and ``triton`` (CUDA; CPU under ``TRITON_INTERPRET=1``;
float16, bfloat16, float32; any strides). There is no compiled CUDA kernel in this family: both ops are
memory-bound copies / GEMVs that the Triton kernels already stream at bandwidth. ``pack_segments`` reads
``counts`` on the host once to size its output (a synchronisation), then copies in one launch.
"""

from typing import Optional, Tuple

import torch

from .. import backends
from ..reference import tempo as reference
from ._library import checking_values, impl, lib

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT_DTYPES = (torch.int32, torch.int64)

lib.define("pack_segments(Tensor features, Tensor counts, Tensor? stamps=None, Tensor? stamp_lens=None, "
           "str? backend=None) -> (Tensor, Tensor)")
lib.define("segment_relevance(Tensor h, Tensor w_yes, Tensor w_no, str? backend=None) -> Tensor")


def _check_float(t, name: str, dims: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.dim() != dims:
        raise ValueError(f"{name}: expected {layout}, got shape {tuple(t.shape)}")


def _check_lengths(t, name: str, n: int, upper: int, upper_name: str, device, values: bool) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in INT_DTYPES:
        raise TypeError(f"{name}: expected an int32 or int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.shape != (n,):
        raise ValueError(f"{name}: expected shape [{n}] (one entry per segment), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, but features is on {device}")
    if values and checking_values(t) and n and ((t < 0) | (t > upper)).any():
        raise ValueError(f"{name}: every entry must be in [0, {upper_name} = {upper}], got {t.tolist()}")


def _check_pack(features, counts, stamps, stamp_lens, values: bool = True):
    """Shapes, dtypes, devices; with ``values`` (not in the fake impl: no data there) the lengths' ranges too."""
    _check_float(features, "features", 3, "[n_segments, K, d]")
    n, k, d = features.shape
    _check_lengths(counts, "counts", n, k, "K", features.device, values)
    if (stamps is None) != (stamp_lens is None):
        raise ValueError("stamps, stamp_lens: give both (timestamp embeddings and their lengths) or neither")
    if stamps is not None:
        _check_float(stamps, "stamps", 3, "[n_segments, L, d]")
        if stamps.shape[0] != n or stamps.shape[2] != d:
            raise ValueError(f"stamps: expected shape [{n}, L, {d}] (features is {list(features.shape)}), got "
                             f"{list(stamps.shape)}")
        if stamps.dtype != features.dtype:
            raise TypeError(f"stamps: dtype {stamps.dtype} differs from features dtype {features.dtype}")
        if stamps.device != features.device:
            raise ValueError(f"stamps: on {stamps.device}, but features is on {features.device}")
        _check_lengths(stamp_lens, "stamp_lens", n, stamps.shape[1], "L", features.device, values)


def _check_relevance(h, w_yes, w_no):
    _check_float(h, "h", 2, "[n_segments, d]")
    d = h.shape[1]
    for name, w in (("w_yes", w_yes), ("w_no", w_no)):
        _check_float(w, name, 1, f"[d] = [{d}]")
        if w.shape != (d,):
            raise ValueError(f"{name}: expected shape [{d}] (h's hidden size), got {tuple(w.shape)}")
        if w.dtype != h.dtype:
            raise TypeError(f"{name}: dtype {w.dtype} differs from h dtype {h.dtype}")
        if w.device != h.device:
            raise ValueError(f"{name}: on {w.device}, but h is on {h.device}")


def _unsupported(op: str, dtype: torch.dtype):
    def reason(backend: str) -> Optional[str]:
        if backend == "cuda":
            return f"{op} has no compiled CUDA kernel; backend='triton' runs it on CUDA tensors"
        if backend == "triton" and dtype not in TRITON_DTYPES:
            return f"the triton backend of {op} needs float16, bfloat16 or float32 (got {dtype})"
        return None
    return reason


def _pack_segments(features, counts, stamps=None, stamp_lens=None, backend=None):
    _check_pack(features, counts, stamps, stamp_lens)
    name = backends.select("pack_segments", features.device, backend, _unsupported("pack_segments", features.dtype))
    if name == "reference":
        return reference.pack_segments(features, counts, stamps, stamp_lens)
    from ..triton_kernels import tempo as kernels  # imported on first use: Triton is optional
    offsets = torch.zeros(features.shape[0] + 1, dtype=torch.int32, device=features.device)
    torch.cumsum(reference.segment_lengths(counts, stamp_lens), 0, out=offsets[1:])
    with backends.device_guard(features.device):
        packed = kernels.pack_segments(features, counts, stamps, stamp_lens, offsets, int(offsets[-1]))
    return packed, offsets


def _segment_relevance(h, w_yes, w_no, backend=None):
    _check_relevance(h, w_yes, w_no)
    name = backends.select("segment_relevance", h.device, backend, _unsupported("segment_relevance", h.dtype))
    if name == "reference":
        return reference.segment_relevance(h, w_yes, w_no)
    from ..triton_kernels import tempo as kernels
    with backends.device_guard(h.device):
        return kernels.segment_relevance(h, w_yes, w_no)


impl("pack_segments", _pack_segments)
impl("segment_relevance", _segment_relevance)


@torch.library.register_fake("efficient_ops::pack_segments")
def _pack_segments_fake(features, counts, stamps=None, stamp_lens=None, backend=None):
    _check_pack(features, counts, stamps, stamp_lens, values=False)
    total = torch.library.get_ctx().new_dynamic_size()  # sum of the segments' kept rows: data-dependent
    return (features.new_empty((total, features.shape[2])),
            counts.new_empty((features.shape[0] + 1,), dtype=torch.int32))


@torch.library.register_fake("efficient_ops::segment_relevance")
def _segment_relevance_fake(h, w_yes, w_no, backend=None):
    _check_relevance(h, w_yes, w_no)
    return h.new_empty((h.shape[0],), dtype=torch.float32)


def pack_segments(features: torch.Tensor, counts: torch.Tensor, stamps: Optional[torch.Tensor] = None,
                  stamp_lens: Optional[torch.Tensor] = None,
                  backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Head truncation + packing of per-segment memory tokens, in one launch.

    Args:
        features: ``[n, K, d]`` memory tokens of n segments (any strides, any float dtype on the reference
            backend; float16/bfloat16/float32 on triton).
        counts: int32/int64 ``[n]``, each in ``[0, K]``: segment i keeps its first ``counts[i]`` tokens.
        stamps: optional ``[n, L, d]`` timestamp embeddings in features' dtype; with ``stamp_lens`` (int
            ``[n]`` in ``[0, L]``) segment i's chunk is ``stamps[i, :stamp_lens[i]]`` then its kept tokens.
            A segment with ``counts[i] == 0`` is dropped together with its timestamp.
        backend: "triton" or "reference"; default ``$EFFICIENT_OPS_BACKEND``, else the best for the device.

    Returns:
        ``(packed [total, d], offsets int32 [n + 1])``: segment i fills ``packed[offsets[i]:offsets[i + 1]]``
        (``offsets`` is the ``cu_seqlens`` of the chunks, ``total = offsets[-1]``).
    """
    return torch.ops.efficient_ops.pack_segments(features, counts, stamps, stamp_lens, backend)


def segment_relevance(h: torch.Tensor, w_yes: torch.Tensor, w_no: torch.Tensor,
                      backend: Optional[str] = None) -> torch.Tensor:
    """Tempo's relevance score ``sigmoid(h . (w_yes - w_no))`` per row, fused GEMV + sigmoid in float32.

    Args:
        h: ``[n, d]`` hidden states at each segment's last prompt position (any strides).
        w_yes, w_no: ``[d]``, the LM head rows of the "Yes" and "No" tokens, in h's dtype.
        backend: "triton" or "reference".

    Returns:
        float32 ``[n]``: the probability of "Yes" in a softmax over the two logits.
    """
    return torch.ops.efficient_ops.segment_relevance(h, w_yes, w_no, backend)
