"""The packed low-bit weight formats (``lowbit`` family): layouts, quantizers, packing and dequantization.

Every format dequantizes the same way, so one kernel family serves them all:

    w[n, k] = (q[n, k] - zeros[n, k // group]) * scales[n, k // group]

with an unsigned integer level ``q`` per weight. What differs is the number of levels and how
levels are packed. Packed weights (``qweight``) are int32 ``[N, words]``, row-major and contiguous;
one output channel's weights are contiguous (what a decode GEMV streams), and ``K`` is padded to
``K_pad`` (a multiple of ``k_align``) so that every row is a whole number of 16-byte vectors.
Bit ``b`` of a word is ``(word >> b) & 1``; bytes of a word are little-endian.

=======  ======  =======  =======  ===================================================================
bits     levels  k_align  words    layout of row ``n``
=======  ======  =======  =======  ===================================================================
4        16      128      K_pad/8  word ``w``: column ``k = 8w + j`` in bits ``[4j, 4j + 4)``
3        8       128      3K_pad/  per 128-column block ``b`` (12 words at ``12b``): words ``12b + w``
                          32       (w < 8) hold the low 2 bits of ``k = 128b + 16w + j`` in bits
                                   ``[2j, 2j + 2)``; words ``12b + 8 + v`` (v < 4) hold bit 2 of
                                   ``k = 128b + 32v + j`` in bit ``j`` (a 2-bit plane plus a 1-bit plane)
2        4       128      K_pad/16 word ``w``: ``k = 16w + j`` in bits ``[2j, 2j + 2)``
1.58     3       160      K_pad/20 ternary, 1.6 bits per weight: per 160-column block ``u`` (32 bytes
                                   at byte ``32u``), byte ``i`` (0..31) is ``sum_j t_j * 3**j``
                                   (0..242) where ``t_j`` is the level of ``k = 160u + 32j + i``,
                                   j = 0..4 (five trits per byte, 3**5 = 243 <= 256)
1        2       128      K_pad/32 word ``w``: ``k = 32w + j`` in bit ``j``
=======  ======  =======  =======  ===================================================================

Every layout keeps each aligned run of 32 columns (``k // 32``) inside one 16-byte vector (the
3-bit and ternary blocks: inside one 48- or 32-byte block), and group sizes are multiples of 32,
so a kernel decodes 32 columns at a time with one scale and zero.

- ``scales``, ``zeros``: ``[N, ceil(K_pad / group)]`` contiguous, float16, bfloat16 or float32,
  ``group = group_size``, or ``K_pad`` for one scale per output channel (``group_size = -1``).
  Zeros are floats: the symmetric grids below have half-integer zero points.
- Columns ``K..K_pad`` are padding: finite levels that no kernel multiplies with anything but zero.

Grids (how :func:`quantize_weight` picks levels, scales and zeros; ``L`` = levels):

- ``"int"``: integer levels. Asymmetric min-max (``zero = round(-min / scale)``), or symmetric
  LSQ-style ``clamp(round(w / a), -L // 2, L - 1 - L // 2)`` with ``zero = L // 2``.
- ``"seq"``: ParetoQ's stretched elastic quantization, levels ``a * (2i + 1 - L) / L``: 2-bit
  ``a * {±1/4, ±3/4}`` (no zero level), ternary ``a * {-2/3, 0, 2/3}``; ``scale = 2a / L``,
  ``zero = (L - 1) / 2``.
- ``"binary"`` (bits = 1): ``a * sign(w)`` with ``a = mean|w|``: ``scale = 2a``, ``zero = 1/2``.
  With ``center=True`` (PTQ1.61's non-salient channels) ``mu + a * sign(w - mu)`` with the mean
  ``mu``: ``zero = 1/2 - mu / (2a)``.

``a`` is per group (per output row for ``group_size = -1``). The optional clipping search tries a
small grid of clip ratios ``a = r * max|w|`` (``r * (min, max)`` for asymmetric int) and keeps, per
group, the one with the least squared error.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple, Union

import torch

SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GRIDS = ("int", "seq", "binary")
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(14))  # 1.0 .. 0.35


@dataclasses.dataclass(frozen=True)
class Format:
    """How one bit width is stored (see the module docstring)."""

    name: str   # what the kernels call it
    bits: float
    levels: int
    k_align: int  # K_pad is a multiple of this
    words_per_align: int  # int32 words per k_align columns
    default_grid: str

    def words(self, k_pad: int) -> int:
        """int32 words per packed row of ``k_pad`` columns."""
        return k_pad // self.k_align * self.words_per_align


FORMATS = {
    4: Format("w4", 4, 16, 128, 16, "int"),
    3: Format("w3", 3, 8, 128, 12, "int"),
    2: Format("w2", 2, 4, 128, 8, "seq"),
    1.58: Format("ternary", 1.58, 3, 160, 8, "seq"),
    1: Format("w1", 1, 2, 128, 4, "binary"),
}
SUPPORTED_BITS = tuple(FORMATS)
TERNARY = 1.58


def get_format(bits: Union[int, float], name: str = "bits") -> Format:
    """The :class:`Format` of ``bits`` (4, 3, 2, 1.58 for ternary, or 1); ValueError otherwise."""
    fmt = FORMATS.get(bits) if isinstance(bits, (int, float)) and not isinstance(bits, bool) else None
    if fmt is None:
        raise ValueError(f"{name}: unsupported value {bits!r}; supported: {SUPPORTED_BITS} (1.58 = ternary)")
    return fmt


def padded_in_features(in_features: int, bits: Union[int, float] = 4) -> int:
    """``K_pad``: K rounded up to the format's ``k_align`` (128; 160 for ternary)."""
    align = get_format(bits).k_align
    return -(-in_features // align) * align


def effective_group_size(group_size: int, in_features: int, bits: Union[int, float] = 4) -> int:
    """Columns per scale: ``group_size``, or ``K_pad`` for per-channel (-1)."""
    return padded_in_features(in_features, bits) if group_size == -1 else group_size


def num_groups(in_features: int, group_size: int, bits: Union[int, float] = 4) -> int:
    """Scale columns: ``ceil(K_pad / group)``."""
    k_pad = padded_in_features(in_features, bits)
    return -(-k_pad // effective_group_size(group_size, in_features, bits))


@dataclasses.dataclass
class QuantizedWeight:
    """A weight matrix ``[N, K]`` quantized to ``bits`` with one scale and zero per group.

    Attributes:
        qweight: packed levels, int32 ``[N, words]`` (see the module docstring).
        scales: ``[N, ceil(K_pad / group)]`` float16/bfloat16/float32.
        zeros: like ``scales``; ``w = (q - zero) * scale``.
        bits: 4, 3, 2, 1.58 (ternary) or 1.
        group_size: input channels per scale (32, 64, 128) or -1 for one per output channel.
        shape: the original ``(N, K)``.
        dtype: the original weight dtype (what :func:`dequantize_weight` returns).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: float
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

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "QuantizedWeight":
        """A copy on ``device``; a ``dtype`` (also accepted in first place, as ``Tensor.to``) becomes the dtype
        of the scales, zeros and dequantized weight. The packed int32 words are never cast."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if dtype is not None and dtype not in SCALE_DTYPES:
            raise TypeError(f"dtype: expected one of {SCALE_DTYPES}, got {dtype}")
        return dataclasses.replace(self, qweight=self.qweight.to(device), scales=self.scales.to(device, dtype),
                                   zeros=self.zeros.to(device, dtype), dtype=dtype or self.dtype)

    def nbytes(self) -> int:
        """Bytes of the packed weight, scales and zeros together."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def validate(self) -> None:
        """Raise ValueError/TypeError if the tensors do not match the metadata."""
        validate_packed(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                        self.in_features, self.out_features)


@dataclasses.dataclass
class MixedQuantizedWeight:
    """PTQ1.61-style mixed precision: salient input channels at ``salient.bits``, the rest at ``rest.bits``.

    Attributes:
        perm: int32 ``[K]``: the salient input channels (ascending), then the others (ascending).
            Column ``j`` of ``salient`` is input channel ``perm[j]``; column ``j`` of ``rest`` is
            ``perm[salient.in_features + j]``.
        salient: the weight's salient columns ``w[:, perm[:S]]``.
        rest: the other columns ``w[:, perm[S:]]``.
        shape, dtype: of the original weight.
    """

    perm: torch.Tensor
    salient: QuantizedWeight
    rest: QuantizedWeight
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
        return self.perm.device

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "MixedQuantizedWeight":
        """A copy on ``device`` (and ``dtype`` for both parts' scales, as :meth:`QuantizedWeight.to`)."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        return dataclasses.replace(self, perm=self.perm.to(device), salient=self.salient.to(device, dtype),
                                   rest=self.rest.to(device, dtype), dtype=dtype or self.dtype)

    def nbytes(self) -> int:
        """Bytes of both packed parts and the channel permutation."""
        return self.salient.nbytes() + self.rest.nbytes() + self.perm.numel() * self.perm.element_size()

    def validate(self) -> None:
        """Raise ValueError/TypeError if the parts do not fit together."""
        self.salient.validate()
        self.rest.validate()
        validate_perm(self.perm, self.salient.in_features, self.in_features, self.salient.device)
        check_perm_values(self.perm)
        if self.salient.out_features != self.out_features or self.rest.out_features != self.out_features:
            raise ValueError(f"salient/rest: expected {self.out_features} rows, got "
                             f"{self.salient.out_features} and {self.rest.out_features}")
        if self.salient.in_features + self.rest.in_features != self.in_features:
            raise ValueError(f"rest: {self.rest.in_features} columns + {self.salient.in_features} salient "
                             f"!= in_features {self.in_features}")
        if self.salient.scales.dtype != self.rest.scales.dtype:
            raise TypeError("rest: scales dtype differs from the salient part's")


def check_perm_values(perm: torch.Tensor) -> None:
    """``perm`` must hold every input channel exactly once (a duplicate or -1 would read a column twice or
    leave one unread). It synchronises, so the ops skip it inside CUDA-graph capture, where the kernels clamp."""
    if perm.numel() and not torch.equal(perm.sort().values, torch.arange(perm.numel(), device=perm.device,
                                                                          dtype=perm.dtype)):
        raise ValueError(f"perm: must be a permutation of 0..{perm.numel() - 1} (each input channel once)")


def validate_perm(perm: torch.Tensor, salient_features: int, in_features: int, device=None) -> None:
    """Check the shape, dtype and device of a mixed weight's channel permutation (:func:`check_perm_values`
    checks that it is one)."""
    if not isinstance(perm, torch.Tensor) or perm.dtype != torch.int32:
        raise TypeError(f"perm: expected an int32 tensor, got {getattr(perm, 'dtype', type(perm))}")
    if perm.shape != (in_features,) or not perm.is_contiguous():
        raise ValueError(f"perm: expected a contiguous [{in_features}] tensor, got {tuple(perm.shape)}")
    if not 0 < salient_features < in_features:
        raise ValueError(f"salient_features: must be in 1..{in_features - 1}, got {salient_features}")
    if device is not None and perm.device != device:
        raise ValueError(f"perm: on {perm.device}, but the packed weights are on {device}")


def validate_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: float,
                    group_size: int, in_features: int, out_features: Optional[int] = None) -> None:
    """Check a packed weight against its metadata; raise ValueError/TypeError naming the argument."""
    fmt = get_format(bits)
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size: unsupported value {group_size}; supported: {SUPPORTED_GROUP_SIZES}")
    if in_features < 1:
        raise ValueError(f"in_features: must be positive, got {in_features}")
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32:
        raise TypeError(f"qweight: expected an int32 tensor, got {getattr(qweight, 'dtype', type(qweight))}")
    k_pad = padded_in_features(in_features, bits)
    n = qweight.shape[0] if qweight.dim() == 2 else -1
    if out_features is not None and n != out_features:
        raise ValueError(f"qweight: expected {out_features} rows (out_features), got shape {tuple(qweight.shape)}")
    if qweight.dim() != 2 or qweight.shape[1] != fmt.words(k_pad):
        raise ValueError(f"qweight: expected shape [N, {fmt.words(k_pad)}] for bits={bits}, in_features="
                         f"{in_features} (K padded to {k_pad}), got {tuple(qweight.shape)}")
    groups = num_groups(in_features, group_size, bits)
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


# ---- packing ---------------------------------------------------------------------------------


def _pack_fields(q: torch.Tensor, width: int) -> torch.Tensor:
    """Pack ``32 // width``-bit fields along the last dim into int32 words, field j at bits [j*width, ...)."""
    per_word = 32 // width
    q = q.to(torch.int64).reshape(*q.shape[:-1], -1, per_word)
    words = (q << torch.arange(0, 32, width, device=q.device)).sum(-1)  # disjoint bits: sum == or
    return (words - ((words >> 31) << 32)).to(torch.int32)  # reinterpret as signed int32


def _unpack_fields(words: torch.Tensor, width: int) -> torch.Tensor:
    shifts = torch.arange(0, 32, width, device=words.device, dtype=torch.int32)
    return ((words.unsqueeze(-1) >> shifts) & ((1 << width) - 1)).reshape(*words.shape[:-1], -1)


def pack_levels(q: torch.Tensor, bits: Union[int, float]) -> torch.Tensor:
    """Pack levels ``q`` (integers in ``0..levels-1``, shape ``[N, K]``, any K) into the int32 words of the
    module docstring; K is padded to the format's ``k_align`` with level 0."""
    fmt = get_format(bits)
    if q.dim() != 2 or q.is_floating_point() and not torch.equal(q, q.round()):
        raise ValueError(f"q: expected a 2-D tensor of integer levels, got shape {tuple(q.shape)}")
    if q.numel() and (q.min() < 0 or q.max() >= fmt.levels):
        raise ValueError(f"q: levels must be in 0..{fmt.levels - 1} for bits={bits}")
    pad = padded_in_features(max(q.shape[1], 1), bits) - q.shape[1]
    q = torch.nn.functional.pad(q.to(torch.int64), (0, pad))
    n, k = q.shape
    if fmt.name in ("w4", "w2", "w1"):
        return _pack_fields(q, int(fmt.bits))
    if fmt.name == "w3":
        blocks = q.reshape(n, k // 128, 128)
        low = _pack_fields(blocks & 3, 2)    # [N, B, 8]
        high = _pack_fields(blocks >> 2, 1)  # [N, B, 4]
        return torch.cat([low, high], dim=-1).reshape(n, -1)
    # ternary: [N, U, 5, 32] trits -> [N, U, 32] bytes, four bytes per little-endian word
    trits = q.reshape(n, k // 160, 5, 32)
    powers = torch.tensor([1, 3, 9, 27, 81], device=q.device).view(1, 1, 5, 1)
    return _pack_fields((trits * powers).sum(2).reshape(n, -1), 8)


def unpack_levels(qweight: torch.Tensor, bits: Union[int, float], in_features: Optional[int] = None) -> torch.Tensor:
    """Inverse of :func:`pack_levels`: int32 words ``[N, W]`` -> int32 levels ``[N, K_pad]`` (or the first
    ``in_features`` columns)."""
    fmt = get_format(bits)
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32 or qweight.dim() != 2 \
            or qweight.shape[1] % fmt.words_per_align:
        raise ValueError(f"qweight: expected int32 words [N, a multiple of {fmt.words_per_align}] for bits={bits}, got "
                         f"{getattr(qweight, 'dtype', type(qweight).__name__)} {list(getattr(qweight, 'shape', []))}")
    n = qweight.shape[0]
    if fmt.name in ("w4", "w2", "w1"):
        q = _unpack_fields(qweight, int(fmt.bits))
    elif fmt.name == "w3":
        blocks = qweight.reshape(n, -1, 12)
        q = (_unpack_fields(blocks[..., :8], 2) | (_unpack_fields(blocks[..., 8:], 1) << 2)).reshape(n, -1)
    else:
        byte = _unpack_fields(qweight, 8).reshape(n, -1, 1, 32)
        powers = torch.tensor([1, 3, 9, 27, 81], device=qweight.device, dtype=torch.int32).view(1, 1, 5, 1)
        q = ((byte // powers) % 3).reshape(n, -1)
    return q if in_features is None else q[:, :in_features]


# ---- quantization ----------------------------------------------------------------------------


def _check_weight(w: torch.Tensor, name: str = "w") -> None:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {getattr(w, 'dtype', type(w))}")
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty 2-D tensor [out_features, in_features], got {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name}: contains NaN or infinity")


def _resolve_grid(fmt: Format, grid: Optional[str]) -> str:
    grid = grid or fmt.default_grid
    if grid not in GRIDS:
        raise ValueError(f"grid: unsupported value {grid!r}; supported: {GRIDS}")
    if (grid == "binary") != (fmt.levels == 2):
        allowed = "'binary'" if fmt.levels == 2 else "'int' or 'seq'"
        raise ValueError(f"grid: {grid!r} does not apply to bits={fmt.bits}; use {allowed}")
    return grid


def _grid_levels(wg: torch.Tensor, valid: torch.Tensor, levels: int, grid: str, symmetric: bool, center: bool,
                 ratio: float, scale_dtype: torch.dtype):
    """Levels, scale and zero for grouped weights ``wg`` [N, G, group] at one clip ratio (float32 out).
    ``valid`` [1, G, group] marks real columns: means exclude the padding (extrema may include it)."""
    if grid == "binary":
        count = valid.sum(-1, keepdim=True).clamp_min(1)
        mu = (wg * valid).sum(-1, keepdim=True) / count if center else torch.zeros_like(wg[..., :1])
        scale = 2 * ((wg - mu).abs() * valid).sum(-1, keepdim=True) / count
    elif grid == "seq":
        scale = 2 * ratio * wg.abs().amax(-1, keepdim=True) / levels
    elif symmetric:
        scale = ratio * wg.abs().amax(-1, keepdim=True) / (levels - 1 - levels // 2)
    else:
        lo = ratio * wg.amin(-1, keepdim=True).clamp(max=0)  # the range contains 0: 0 stays representable
        hi = ratio * wg.amax(-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / (levels - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: any scale works
    stored = scale.to(scale_dtype).float()  # levels are chosen against the scale as stored
    # Overflow to inf, or underflow to 0 or to a subnormal that keeps under 2 bits, in a group with real columns
    # (a group of padding only does not matter): refuse rather than store a weight that is not the one given.
    lost = ~torch.isfinite(stored) | ((stored - scale).abs() > 0.25 * scale)
    if (lost & valid.any(-1, keepdim=True)).any():
        raise ValueError(f"scale_dtype: {scale_dtype} cannot hold this weight's scales (from {float(scale.min()):.3g} "
                         f"to {float(scale.max()):.3g}); use scale_dtype=torch.float32")
    scale = stored
    if grid == "binary":
        zero = (0.5 - mu / scale).to(scale_dtype).float()
        q = (wg >= mu).float()
    else:
        if grid == "seq":
            zero = torch.full_like(scale, (levels - 1) / 2)
        elif symmetric:
            zero = torch.full_like(scale, float(levels // 2))
        else:
            zero = (-lo / scale).round().clamp(0, levels - 1)
        q = (wg / scale + zero).round().clamp(0, levels - 1)
    # An all-zero group gets scale 0: grids without a zero level (seq 2-bit, binary) stay exact there.
    scale = torch.where(wg.abs().amax(-1, keepdim=True) > 0, scale, torch.zeros_like(scale))
    return q, scale, zero


def quantize_weight(w: torch.Tensor, bits: Union[int, float] = 4, group_size: int = 128,
                    grid: Optional[str] = None, symmetric: bool = False, clip_search: Optional[bool] = None,
                    center: bool = False, scale_dtype: Optional[torch.dtype] = None) -> QuantizedWeight:
    """Quantize a weight ``w`` [N, K] (out_features, in_features) to a packed format.

    Args:
        w: floating-point weight, any device.
        bits: 4, 3, 2, 1.58 (ternary, stored at 1.6 bits) or 1 (binary).
        group_size: input channels sharing one scale and zero: 32, 64, 128, or -1 for one per output row.
            K need not be a multiple of it.
        grid: "int" (default for 4 and 3 bits), "seq" (ParetoQ; default for 2 bits and ternary) or
            "binary" (the only grid for 1 bit). See the module docstring.
        symmetric: for ``grid="int"``: symmetric LSQ-style levels instead of min-max.
        clip_search: search the clip ratio per group (least squared error); default on for "seq"
            (whose range would otherwise be set by the largest weight alone), off otherwise.
        center: binary only: ``mu + a * sign(w - mu)`` with the group mean ``mu``.
        scale_dtype: dtype of scales and zeros; default ``w.dtype`` (float32 for float64 weights). A dtype that
            cannot hold the scales (float16 for |w| ~ 1e6 or 1e-8) raises ValueError rather than storing inf or 0.

    Returns:
        A :class:`QuantizedWeight` on ``w``'s device.
    """
    _check_weight(w)
    fmt = get_format(bits)
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size: unsupported value {group_size}; supported: {SUPPORTED_GROUP_SIZES}")
    grid = _resolve_grid(fmt, grid)
    if symmetric and grid != "int":
        raise ValueError(f"symmetric: applies to grid='int' only (grid={grid!r} is symmetric or fixed already)")
    if center and grid != "binary":
        raise ValueError("center: applies to the binary grid only")
    if scale_dtype is None:
        scale_dtype = w.dtype if w.dtype in SCALE_DTYPES else torch.float32
    if scale_dtype not in SCALE_DTYPES:
        raise TypeError(f"scale_dtype: expected one of {SCALE_DTYPES}, got {scale_dtype}")
    if clip_search is None:
        clip_search = grid == "seq"

    n, k = w.shape
    k_pad = padded_in_features(k, bits)
    group = effective_group_size(group_size, k, bits)
    groups = -(-k_pad // group)
    wf = w.detach().float()
    # Pad by repeating the last column (to whole groups), so padding never changes a group's range.
    wf = torch.cat([wf, wf[:, -1:].expand(n, groups * group - k)], dim=1).reshape(n, groups, group)
    valid = (torch.arange(groups * group, device=wf.device) < k).reshape(1, groups, group)
    ratios = CLIP_RATIOS if clip_search and grid != "binary" else (1.0,)
    best = None
    for ratio in ratios:
        q, scale, zero = _grid_levels(wf, valid, fmt.levels, grid, symmetric, center, ratio, scale_dtype)
        if len(ratios) == 1:
            best = (q, scale, zero)
            break
        err = (((q - zero) * scale - wf).pow(2) * valid).sum(-1, keepdim=True)
        if best is None:
            best, best_err = (q, scale, zero), err
        else:
            better = err < best_err
            best = tuple(torch.where(better, new, old) for new, old in zip((q, scale, zero), best))
            best_err = torch.minimum(err, best_err)
    q, scale, zero = best
    q = q.reshape(n, groups * group)[:, :k_pad]
    return QuantizedWeight(qweight=pack_levels(q, bits).contiguous(),
                           scales=scale.squeeze(-1).to(scale_dtype).contiguous(),
                           zeros=zero.squeeze(-1).to(scale_dtype).contiguous(), bits=fmt.bits,
                           group_size=group_size, shape=(n, k), dtype=w.dtype)


def select_salient_channels(x_calib: torch.Tensor, fraction: float = 0.2) -> torch.Tensor:
    """The input channels with the largest mean activation magnitude, as PTQ1.61 picks its salient channels.

    Args:
        x_calib: calibration activations ``[..., K]`` (the inputs of the layer to quantize).
        fraction: share of the K channels to return, in (0, 1); at least 1 and at most K - 1 channels.

    Returns:
        int64 ``[S]`` channel indices, ascending.
    """
    if not isinstance(x_calib, torch.Tensor) or not x_calib.is_floating_point() or x_calib.dim() < 1:
        raise TypeError("x_calib: expected a floating-point tensor [..., K]")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction: must be in (0, 1), got {fraction}")
    k = x_calib.shape[-1]
    if k < 2:
        raise ValueError(f"x_calib: needs at least 2 channels, got {k}")
    magnitude = x_calib.detach().reshape(-1, k).float().abs().mean(0)
    if not torch.isfinite(magnitude).all():
        raise ValueError("x_calib: contains NaN or infinity")
    count = min(max(1, round(fraction * k)), k - 1)
    return magnitude.topk(count).indices.sort().values


def quantize_weight_mixed(w: torch.Tensor, salient_channels: Sequence[int], salient_bits: Union[int, float] = 4,
                          rest_bits: Union[int, float] = 1, salient_group_size: int = -1,
                          rest_group_size: int = -1, scale_dtype: Optional[torch.dtype] = None,
                          **rest_kwargs) -> MixedQuantizedWeight:
    """PTQ1.61-style mixed precision: salient input channels at ``salient_bits``, the others at ``rest_bits``.

    With the defaults the salient columns get 4-bit min-max levels with one scale per output row, and
    the others binary ``mu + a * sign(w - mu)`` with a per-row scale ``a`` and mean ``mu``.

    Args:
        w: floating-point weight [N, K].
        salient_channels: 1-D input-channel indices (e.g. from :func:`select_salient_channels`),
            1 to K - 1 distinct values.
        salient_bits, rest_bits: bit widths of the two parts (any of :data:`SUPPORTED_BITS`).
        salient_group_size, rest_group_size: group sizes of the two parts (-1: per output row).
        scale_dtype: as in :func:`quantize_weight` (both parts share it).
        rest_kwargs: further :func:`quantize_weight` arguments for the rest (e.g. ``grid``); a binary
            rest is mean-centred unless ``center=False`` is given.

    Returns:
        A :class:`MixedQuantizedWeight`; ``lowbit_linear`` runs it in one kernel launch.
    """
    _check_weight(w)
    n, k = w.shape
    idx = torch.as_tensor(salient_channels, device=w.device)
    if idx.dim() != 1 or idx.is_floating_point() or idx.numel() == 0:
        raise ValueError("salient_channels: expected a non-empty 1-D integer index set")
    if idx.min() < 0 or idx.max() >= k:
        raise ValueError(f"salient_channels: indices must be in [0, {k}), got range "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    idx = idx.to(torch.int64).sort().values
    if (idx[1:] == idx[:-1]).any():
        raise ValueError("salient_channels: contains duplicates")
    if idx.numel() >= k:
        raise ValueError(f"salient_channels: must leave at least one channel for the rest (K = {k})")
    is_salient = torch.zeros(k, dtype=torch.bool, device=w.device)
    is_salient[idx] = True
    perm = torch.cat([idx, (~is_salient).nonzero().squeeze(1)])
    if get_format(rest_bits).levels == 2:
        rest_kwargs.setdefault("center", True)
    salient = quantize_weight(w[:, idx], bits=salient_bits, group_size=salient_group_size, scale_dtype=scale_dtype)
    rest = quantize_weight(w[:, perm[idx.numel():]], bits=rest_bits, group_size=rest_group_size,
                           scale_dtype=salient.scales.dtype, **rest_kwargs)
    return MixedQuantizedWeight(perm=perm.to(torch.int32), salient=salient, rest=rest, shape=(n, k), dtype=w.dtype)


# ---- dequantization --------------------------------------------------------------------------


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: float,
                      group_size: int, in_features: int) -> torch.Tensor:
    """``(q - zero) * scale`` in float32, shape ``[N, in_features]`` (padding dropped): what the packed
    weight means (the module docstring), and the formula every low-bit kernel is tested against."""
    validate_packed(qweight, scales, zeros, bits, group_size, in_features)
    group = effective_group_size(group_size, in_features, bits)
    q = unpack_levels(qweight, bits).float()
    k_pad = q.shape[1]
    s = scales.float().repeat_interleave(group, dim=1)[:, :k_pad]
    z = zeros.float().repeat_interleave(group, dim=1)[:, :k_pad]
    return ((q - z) * s)[:, :in_features]


def dequantize_mixed(perm: torch.Tensor, qweight_a: torch.Tensor, scales_a: torch.Tensor, zeros_a: torch.Tensor,
                     bits_a: float, group_size_a: int, qweight_b: torch.Tensor, scales_b: torch.Tensor,
                     zeros_b: torch.Tensor, bits_b: float, group_size_b: int, salient_features: int) -> torch.Tensor:
    """The dense float32 ``[N, K]`` weight of a mixed layout: part A (the salient columns ``perm[:S]``) and
    part B (the columns ``perm[S:]``), each dequantized by :func:`dequantize_packed`."""
    k = perm.numel() if isinstance(perm, torch.Tensor) else -1
    validate_perm(perm, salient_features, k)
    wa = dequantize_packed(qweight_a, scales_a, zeros_a, bits_a, group_size_a, salient_features)
    wb = dequantize_packed(qweight_b, scales_b, zeros_b, bits_b, group_size_b, k - salient_features)
    if wb.shape[0] != wa.shape[0]:
        raise ValueError(f"qweight_b: {wb.shape[0]} rows, but qweight_a has {wa.shape[0]}")
    w = torch.empty(wa.shape[0], k, dtype=torch.float32, device=wa.device)
    w[:, perm.long()] = torch.cat([wa, wb], dim=1)
    return w


def dequantize_weight(qw: Union[QuantizedWeight, MixedQuantizedWeight], dtype: Optional[torch.dtype] = None):
    """The dense weight ``[N, K]`` that ``qw`` represents, in ``dtype`` (default: the original dtype)."""
    if isinstance(qw, MixedQuantizedWeight):
        qw.validate()
        a, b = qw.salient, qw.rest
        w = dequantize_mixed(qw.perm, a.qweight, a.scales, a.zeros, a.bits, a.group_size, b.qweight, b.scales,
                             b.zeros, b.bits, b.group_size, a.in_features)
    else:
        w = dequantize_packed(qw.qweight, qw.scales, qw.zeros, qw.bits, qw.group_size, qw.in_features)
    return w.to(dtype or qw.dtype)
