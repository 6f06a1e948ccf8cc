"""``QuantLinear`` and ``MixedQuantLinear``: ``nn.Linear`` replacements holding packed low-bit weights, and
model conversion (:func:`quantize_model`)."""

from typing import Iterable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..formats.lowbit import (MixedQuantizedWeight, QuantizedWeight, get_format, num_groups, padded_in_features,
                              quantize_weight, quantize_weight_mixed, select_salient_channels, validate_packed)
from .convert import copy_bias, observe_inputs, replace_module, target_linears


def _packed_buffers(module: nn.Module, suffix: str, out_features: int, in_features: int, bits, group_size: int,
                    scale_dtype: torch.dtype, device) -> None:
    words = get_format(bits).words(padded_in_features(in_features, bits))
    groups = num_groups(in_features, group_size, bits)
    module.register_buffer("qweight" + suffix, torch.zeros(out_features, words, dtype=torch.int32, device=device))
    module.register_buffer("scales" + suffix, torch.ones(out_features, groups, dtype=scale_dtype, device=device))
    module.register_buffer("zeros" + suffix, torch.zeros(out_features, groups, dtype=scale_dtype, device=device))


def _default_scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """As :func:`quantize_weight`: the weight's dtype (float32 for float64)."""
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


class QuantLinear(nn.Module):
    """``y = x @ dequant(W).T + b`` through ``torch.ops.efficient_ops.lowbit_gemm``.

    The packed weight lives in buffers ``qweight``, ``scales`` and ``zeros`` (so ``state_dict``,
    ``.to()`` and ``.cuda()`` work as usual); ``bias`` is a parameter as in ``nn.Linear``. Set
    ``backend`` to pin a backend for this layer (default: the library's choice).

    The constructor makes an empty layer (to load a ``state_dict`` into) for ``bits`` in 4, 3, 2,
    1.58 (ternary) or 1; ``dtype`` is the weight and bias dtype, ``scale_dtype`` that of scales and
    zeros. Use :meth:`from_linear` to quantize a layer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: float = 4,
                 group_size: int = 128, dtype: torch.dtype = torch.float16,
                 scale_dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = get_format(bits).bits, group_size
        self.weight_dtype = dtype  # what dequantize_weight(self.quantized_weight) returns
        self.grid: Optional[str] = None  # how the levels were picked, if known (dequantization ignores it)
        self.backend: Optional[str] = None
        _packed_buffers(self, "", out_features, in_features, bits, group_size,
                        scale_dtype or _default_scale_dtype(dtype), device)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        validate_packed(self.qweight, self.scales, self.zeros, bits, group_size, in_features, out_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: float = 4, group_size: int = 128, **quantize_kwargs) -> "QuantLinear":
        """Quantize ``linear``'s weight into a new module on the same device.

        ``quantize_kwargs``: ``grid``, ``symmetric``, ``clip_search``, ``scale_dtype`` as in
        :func:`efficient_ops.quantize_weight`.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected nn.Linear, got {type(linear).__name__}")
        module = cls.from_quantized(quantize_weight(linear.weight, bits=bits, group_size=group_size,
                                                    **quantize_kwargs), linear.bias)
        module.grid = quantize_kwargs.get("grid") or get_format(bits).default_grid
        return module

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> "QuantLinear":
        """Wrap an existing :class:`QuantizedWeight` (and optional bias) in a module."""
        qw.validate()
        module = cls(qw.in_features, qw.out_features, bias=bias is not None, bits=qw.bits, group_size=qw.group_size,
                     dtype=qw.dtype, scale_dtype=qw.scales.dtype, device="meta")
        module.qweight, module.scales, module.zeros = qw.qweight, qw.scales, qw.zeros  # buffers: share storage
        copy_bias(module, bias)
        return module

    @property
    def quantized_weight(self) -> QuantizedWeight:
        """The layer's weight as a :class:`QuantizedWeight` (sharing storage with the buffers)."""
        return QuantizedWeight(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                               (self.out_features, self.in_features), self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.efficient_ops.lowbit_gemm(x, self.qweight, self.scales, self.zeros, self.bias, self.bits,
                                                   self.group_size, self.in_features, self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}")


class MixedQuantLinear(nn.Module):
    """PTQ1.61-style mixed precision layer through ``torch.ops.efficient_ops.lowbit_gemm_mixed``: the salient
    input channels at ``salient_bits`` (buffers ``qweight_a``, ``scales_a``, ``zeros_a``), the rest at
    ``rest_bits`` (``*_b``), and the channel permutation ``perm`` (salient first), in one kernel launch.

    The constructor makes an empty layer for ``salient_features`` salient channels; use
    :meth:`from_linear` to quantize one.
    """

    def __init__(self, in_features: int, out_features: int, salient_features: int, bias: bool = True,
                 salient_bits: float = 4, rest_bits: float = 1, salient_group_size: int = -1,
                 rest_group_size: int = -1, dtype: torch.dtype = torch.float16,
                 scale_dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        if not 0 < salient_features < in_features:
            raise ValueError(f"salient_features: must be in 1..{in_features - 1}, got {salient_features}")
        self.in_features, self.out_features, self.salient_features = in_features, out_features, salient_features
        self.bits_a, self.group_size_a = get_format(salient_bits).bits, salient_group_size
        self.bits_b, self.group_size_b = get_format(rest_bits).bits, rest_group_size
        self.weight_dtype = dtype
        self.grid_a: Optional[str] = None  # how each part's levels were picked, if known
        self.grid_b: Optional[str] = None
        self.backend: Optional[str] = None
        scale_dtype = scale_dtype or _default_scale_dtype(dtype)
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device))
        _packed_buffers(self, "_a", out_features, salient_features, salient_bits, salient_group_size, scale_dtype,
                        device)
        _packed_buffers(self, "_b", out_features, in_features - salient_features, rest_bits, rest_group_size,
                        scale_dtype, device)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, salient_channels: Sequence[int], salient_bits: float = 4,
                    rest_bits: float = 1, **quantize_kwargs) -> "MixedQuantLinear":
        """Quantize ``linear`` with :func:`efficient_ops.quantize_weight_mixed` into a new module."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected nn.Linear, got {type(linear).__name__}")
        mqw = quantize_weight_mixed(linear.weight, salient_channels, salient_bits=salient_bits, rest_bits=rest_bits,
                                    **quantize_kwargs)
        module = cls.from_quantized(mqw, linear.bias)
        module.grid_a = get_format(salient_bits).default_grid
        module.grid_b = quantize_kwargs.get("grid") or get_format(rest_bits).default_grid
        return module

    @classmethod
    def from_quantized(cls, mqw: MixedQuantizedWeight, bias: Optional[torch.Tensor] = None) -> "MixedQuantLinear":
        """Wrap an existing :class:`MixedQuantizedWeight` (and optional bias) in a module."""
        mqw.validate()
        a, b = mqw.salient, mqw.rest
        module = cls(mqw.in_features, mqw.out_features, a.in_features, bias=bias is not None, salient_bits=a.bits,
                     rest_bits=b.bits, salient_group_size=a.group_size, rest_group_size=b.group_size,
                     dtype=mqw.dtype, scale_dtype=a.scales.dtype, device="meta")
        module.perm = mqw.perm
        module.qweight_a, module.scales_a, module.zeros_a = a.qweight, a.scales, a.zeros
        module.qweight_b, module.scales_b, module.zeros_b = b.qweight, b.scales, b.zeros
        copy_bias(module, bias)
        return module

    @property
    def quantized_weight(self) -> MixedQuantizedWeight:
        """The layer's weight as a :class:`MixedQuantizedWeight` (sharing storage with the buffers)."""
        n, k, s = self.out_features, self.in_features, self.salient_features
        a = QuantizedWeight(self.qweight_a, self.scales_a, self.zeros_a, self.bits_a, self.group_size_a, (n, s),
                            self.weight_dtype)
        b = QuantizedWeight(self.qweight_b, self.scales_b, self.zeros_b, self.bits_b, self.group_size_b, (n, k - s),
                            self.weight_dtype)
        return MixedQuantizedWeight(self.perm, a, b, (n, k), self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.efficient_ops.lowbit_gemm_mixed(
            x, self.perm, self.qweight_a, self.scales_a, self.zeros_a, self.qweight_b, self.scales_b, self.zeros_b,
            self.bias, self.bits_a, self.group_size_a, self.bits_b, self.group_size_b, self.salient_features,
            self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"salient={self.salient_features} x {self.bits_a} bits, rest={self.bits_b} bits")


def _input_magnitudes(model: nn.Module, targets, calib_batches, progress: bool):
    """Mean |x| per input channel of every target linear over the calibration batches."""
    sums = {name: 0.0 for name, _ in targets}
    counts = dict.fromkeys(sums, 0)

    def record(name, x):
        sums[name] = sums[name] + x.float().abs().sum(0)
        counts[name] += x.shape[0]

    observe_inputs(model, targets, calib_batches, record, "calibrating", progress)
    return {name: sums[name] / counts[name] for name in sums}


def quantize_model(model: nn.Module, bits: float = 4, group_size: int = 128, skip: Iterable[str] = ("lm_head",),
                   grid: Optional[str] = None, symmetric: bool = False, clip_search: Optional[bool] = None,
                   scale_dtype: Optional[torch.dtype] = None, salient_fraction: Optional[float] = None,
                   calib_batches: Optional[Iterable] = None, salient_bits: float = 4, salient_group_size: int = -1,
                   progress: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` by a quantized module, in place.

    Args:
        model: any module, a Hugging Face causal LM included.
        bits, group_size, grid, symmetric, clip_search, scale_dtype: as in
            :func:`efficient_ops.quantize_weight` (bits 4, 3, 2, 1.58 for ternary, or 1).
        skip: module names to leave dense; an entry matches a module whose dotted name contains it as a
            whole component sequence ("lm_head" matches "lm_head" and "model.lm_head").
        salient_fraction: PTQ1.61 mixed precision: this share of each layer's input channels (those with
            the largest mean |x| over ``calib_batches``) at ``salient_bits`` / ``salient_group_size``, the
            rest at ``bits`` / ``group_size`` (binary rests are mean-centred), as :class:`MixedQuantLinear`.
        calib_batches: model inputs (tensors, or dicts of keyword arguments) for ``salient_fraction``.
        progress: show tqdm progress bars.

    Returns:
        ``model`` itself.
    """
    targets = target_linears(model, skip)
    kwargs = dict(grid=grid, clip_search=clip_search, scale_dtype=scale_dtype)
    if symmetric:
        kwargs["symmetric"] = True
    if salient_fraction is not None:
        if calib_batches is None:
            raise ValueError("calib_batches: required with salient_fraction (salient channels come from activations)")
        magnitudes = _input_magnitudes(model, targets, calib_batches, progress)
    label = f"{bits} bits" if salient_fraction is None else f"{salient_bits}/{bits} bits mixed"
    for name, linear in tqdm(targets, desc=f"quantizing to {label}", unit="layer", disable=not progress):
        if salient_fraction is None:
            module = QuantLinear.from_linear(linear, bits=bits, group_size=group_size, **kwargs)
        else:
            # one row of mean magnitudes selects exactly what the full activations would
            salient = select_salient_channels(magnitudes[name][None], salient_fraction)
            module = MixedQuantLinear.from_linear(linear, salient, salient_bits=salient_bits, rest_bits=bits,
                                                  salient_group_size=salient_group_size, rest_group_size=group_size,
                                                  **kwargs)
        replace_module(model, name, module)
    return model
