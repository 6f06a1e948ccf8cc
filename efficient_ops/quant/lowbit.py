"""Weight quantization and the packed low-bit format.

Packed format (``bits = 4``), produced by :func:`quantize_weight` and read by every
``lowbit_gemm`` backend:

- ``qweight``: int32 ``[N, K_pad // 8]``, row-major and contiguous. ``K_pad`` is
  ``K`` rounded up to a multiple of 128, so every row is a whole number of
  16-byte vectors and every kernel K-tile (32, 64 or 128 wide) lies inside the
  row. Word ``w`` of row ``n`` holds input channel ``k = 8 * w + j`` in bits
  ``[4j, 4j + 4)`` (``j = 0`` is the least significant nibble) as an unsigned
  level ``q`` in 0..15. One output channel's weights are contiguous, which is
  what a decode GEMV streams; one 16-byte load carries 32 consecutive channels,
  always inside one quantization group.
- ``scales``, ``zeros``: ``[N, K_pad // group]`` contiguous, float16, bfloat16 or
  float32 (``scale_dtype``), with ``group = group_size`` or ``K_pad`` for
  per-output-channel quantization (``group_size = -1``). ``zeros`` are floats, so
  a non-integer zero point (used by the sub-4-bit grids) needs no new format.
- Dequantization: ``w[n, k] = (q[n, k] - zeros[n, k // group]) * scales[n, k // group]``.
- Columns ``K..K_pad`` are padding: they hold finite values and no kernel
  multiplies them with anything but zero, since x has only K channels.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

SUPPORTED_BITS = (4,)
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
K_ALIGN = 128  # K is padded to this; every group size divides it
PACK = 8  # 4-bit values per int32 word


def padded_in_features(in_features: int) -> int:
    """``K_pad``: K rounded up to a multiple of 128."""
    return -(-in_features // K_ALIGN) * K_ALIGN


def effective_group_size(group_size: int, in_features: int) -> int:
    """Columns per scale: ``group_size``, or ``K_pad`` for per-channel (-1)."""
    return padded_in_features(in_features) if group_size == -1 else group_size


@dataclasses.dataclass
class QuantizedWeight:
    """A weight matrix ``[N, K]`` quantized to ``bits`` with one scale and zero per group.

    Attributes:
        qweight: packed levels, int32 ``[N, K_pad // 8]`` (see the module docstring).
        scales: ``[N, K_pad // group]`` float16/bfloat16/float32.
        zeros: like ``scales``; ``w = (q - zero) * scale``.
        bits: bits per weight (4).
        group_size: input channels per scale (32, 64, 128) or -1 for one per output channel.
        shape: the original ``(N, K)``.
        dtype: the original weight dtype (what :func:`dequantize_weight` returns).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    shape: Tuple[int, int]
    dtype: torch.dtype

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def to(self, device) -> "QuantizedWeight":
        """A copy with every tensor on ``device``."""
        return dataclasses.replace(self, qweight=self.qweight.to(device),
                                   scales=self.scales.to(device), zeros=self.zeros.to(device))

    def nbytes(self) -> int:
        """Bytes of the packed weight, scales and zeros together."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def validate(self) -> None:
        """Raise ValueError/TypeError if the tensors do not match the metadata."""
        validate_packed(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                        self.in_features, self.out_features)


def validate_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                    group_size: int, in_features: int, out_features: Optional[int] = None) -> None:
    """Check a packed weight against its metadata; raise ValueError/TypeError naming the argument."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits: unsupported value {bits}; supported: {SUPPORTED_BITS}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size: unsupported value {group_size}; supported: {SUPPORTED_GROUP_SIZES}")
    if in_features < 1:
        raise ValueError(f"in_features: must be positive, got {in_features}")
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32:
        raise TypeError(f"qweight: expected an int32 tensor, got {getattr(qweight, 'dtype', type(qweight))}")
    k_pad = padded_in_features(in_features)
    n = qweight.shape[0] if qweight.dim() == 2 else -1
    if out_features is not None and n != out_features:
        raise ValueError(f"qweight: expected {out_features} rows (out_features), got shape {tuple(qweight.shape)}")
    if qweight.dim() != 2 or qweight.shape[1] != k_pad // PACK:
        raise ValueError(f"qweight: expected shape [N, {k_pad // PACK}] for in_features={in_features} "
                         f"(K padded to {k_pad}, 8 values per int32), got {tuple(qweight.shape)}")
    groups = k_pad // effective_group_size(group_size, in_features)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if not isinstance(t, torch.Tensor) or t.dtype not in SCALE_DTYPES:
            raise TypeError(f"{name}: expected a float16/bfloat16/float32 tensor, got {getattr(t, 'dtype', type(t))}")
        if tuple(t.shape) != (n, groups):
            raise ValueError(f"{name}: expected shape [{n}, {groups}] for group_size={group_size}, "
                             f"in_features={in_features}; got {tuple(t.shape)}")
        if t.device != qweight.device:
            raise ValueError(f"{name}: on {t.device}, but qweight is on {qweight.device}")
    if zeros.dtype != scales.dtype:
        raise TypeError(f"zeros: dtype {zeros.dtype} differs from scales dtype {scales.dtype}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if not t.is_contiguous():
            raise ValueError(f"{name}: must be contiguous (the kernels assume row-major packing)")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack levels ``q`` (integers 0..15, shape ``[N, K]`` with K a multiple of 8) into int32 ``[N, K // 8]``."""
    if q.shape[-1] % PACK:
        raise ValueError(f"q: last dimension {q.shape[-1]} is not a multiple of {PACK}")
    q = q.to(torch.int64).reshape(*q.shape[:-1], -1, PACK)
    shifts = torch.arange(0, 4 * PACK, 4, device=q.device)
    words = (q << shifts).sum(-1)  # disjoint bits: the sum is a bitwise or
    return (words - ((words >> 31) << 32)).to(torch.int32)  # reinterpret as signed int32


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 ``[N, W]`` -> int32 levels ``[N, 8 * W]``."""
    shifts = torch.arange(0, 4 * PACK, 4, device=qweight.device, dtype=torch.int32)
    return ((qweight.unsqueeze(-1) >> shifts) & 0xF).reshape(*qweight.shape[:-1], -1)


def quantize_weight(w: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False,
                    scale_dtype: Optional[torch.dtype] = None) -> QuantizedWeight:
    """Round-to-nearest quantization of a weight ``w`` [N, K] (out_features, in_features).

    Args:
        w: floating-point weight, any device.
        bits: 4.
        group_size: input channels sharing one scale and zero: 32, 64, 128, or -1 for one per output row.
            K need not be a multiple of it: the packed format pads K to a multiple of 128.
        symmetric: False for min-max (asymmetric) levels ``q = round(w / s) + z`` in 0..15;
            True for ``q = clamp(round(w / s), -8, 7) + 8`` with ``s = max|w| / 7`` (zero fixed at 8).
        scale_dtype: dtype of scales and zeros; default ``w.dtype`` for float16/bfloat16, else float16.

    Returns:
        A :class:`QuantizedWeight` on ``w``'s device.
    """
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"w: expected a floating-point tensor, got {getattr(w, 'dtype', type(w))}")
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"w: expected a non-empty 2-D tensor [out_features, in_features], got {tuple(w.shape)}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits: unsupported value {bits}; supported: {SUPPORTED_BITS}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size: unsupported value {group_size}; supported: {SUPPORTED_GROUP_SIZES}")
    if not torch.isfinite(w).all():
        raise ValueError("w: contains NaN or infinity")
    if scale_dtype is None:
        scale_dtype = w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float16
    if scale_dtype not in SCALE_DTYPES:
        raise TypeError(f"scale_dtype: expected one of {SCALE_DTYPES}, got {scale_dtype}")

    n, k = w.shape
    k_pad = padded_in_features(k)
    group = effective_group_size(group_size, k)
    wf = w.detach().float()
    # Pad by repeating the last column, so padding never changes a group's range.
    wf = torch.cat([wf, wf[:, -1:].expand(n, k_pad - k)], dim=1).reshape(n, k_pad // group, group)
    qmax = 2 ** bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        scale = wf.abs().amax(-1) / (half - 1)
        zero = torch.full_like(scale, float(half))
    else:
        lo = wf.amin(-1).clamp(max=0)  # the range always contains 0, so 0 stays representable
        hi = wf.amax(-1).clamp(min=0)
        scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: any scale works
    scale = scale.to(scale_dtype).float()  # levels are chosen against the scale as stored
    if not symmetric:
        zero = (-lo / scale).round().clamp(0, qmax)
    q = (wf / scale.unsqueeze(-1)).round() + zero.unsqueeze(-1)
    q = q.clamp(0, qmax).reshape(n, k_pad)
    return QuantizedWeight(qweight=pack_int4(q).contiguous(), scales=scale.to(scale_dtype).contiguous(),
                           zeros=zero.to(scale_dtype).contiguous(), bits=bits, group_size=group_size,
                           shape=(n, k), dtype=w.dtype)


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                      group_size: int, in_features: int) -> torch.Tensor:
    """``(q - zero) * scale`` in float32, shape ``[N, in_features]`` (padding dropped)."""
    validate_packed(qweight, scales, zeros, bits, group_size, in_features)
    return _dequantize(qweight, scales, zeros, group_size, in_features)


def _dequantize(qweight, scales, zeros, group_size, in_features):
    """:func:`dequantize_packed` without the checks, for callers that have validated already."""
    group = effective_group_size(group_size, in_features)
    q = unpack_int4(qweight).float()
    s = scales.float().repeat_interleave(group, dim=1)
    z = zeros.float().repeat_interleave(group, dim=1)
    return ((q - z) * s)[:, :in_features]


def dequantize_weight(qw: QuantizedWeight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense weight ``[N, K]`` that ``qw`` represents, in ``dtype`` (default: the original dtype)."""
    w = dequantize_packed(qw.qweight, qw.scales, qw.zeros, qw.bits, qw.group_size, qw.in_features)
    return w.to(dtype or qw.dtype)
