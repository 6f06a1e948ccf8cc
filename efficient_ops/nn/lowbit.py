"""``QuantLinear``: an ``nn.Linear`` replacement holding packed low-bit weights, and model conversion."""

from typing import Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..quant.lowbit import (QuantizedWeight, effective_group_size, padded_in_features, quantize_weight,
                            validate_packed)


class QuantLinear(nn.Module):
    """``y = x @ dequant(W).T + b`` through ``torch.ops.efficient_ops.lowbit_gemm``.

    The packed weight lives in buffers ``qweight``, ``scales`` and ``zeros`` (so ``state_dict``,
    ``.to()`` and ``.cuda()`` work as usual); ``bias`` is a parameter as in ``nn.Linear``. Set
    ``backend`` to pin a backend for this layer (default: the library's choice).

    The constructor makes an empty layer (to load a ``state_dict`` into); ``dtype`` is the weight and
    bias dtype, ``scale_dtype`` that of scales and zeros. Use :meth:`from_linear` to quantize a layer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 group_size: int = 128, dtype: torch.dtype = torch.float16,
                 scale_dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.weight_dtype = dtype  # what dequantize_weight(self.quantized_weight) returns
        self.backend: Optional[str] = None
        k_pad = padded_in_features(in_features)
        groups = k_pad // effective_group_size(group_size, in_features)
        scale_dtype = scale_dtype or (dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16)
        self.register_buffer("qweight", torch.zeros(out_features, k_pad // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=scale_dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=scale_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        validate_packed(self.qweight, self.scales, self.zeros, bits, group_size, in_features, out_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, symmetric: bool = False,
                    scale_dtype: Optional[torch.dtype] = None) -> "QuantLinear":
        """Quantize ``linear``'s weight (round to nearest) into a new module on the same device."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected nn.Linear, got {type(linear).__name__}")
        qw = quantize_weight(linear.weight, bits=bits, group_size=group_size, symmetric=symmetric,
                             scale_dtype=scale_dtype)
        return cls.from_quantized(qw, linear.bias)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> "QuantLinear":
        """Wrap an existing :class:`QuantizedWeight` (and optional bias) in a module."""
        qw.validate()
        module = cls(qw.in_features, qw.out_features, bias=bias is not None, bits=qw.bits, group_size=qw.group_size,
                     dtype=qw.dtype, scale_dtype=qw.scales.dtype, device="meta")
        module.qweight, module.scales, module.zeros = qw.qweight, qw.scales, qw.zeros  # buffers: share storage
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
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


def _skipped(name: str, skip: Iterable[str]) -> bool:
    # "lm_head" matches "lm_head" and "model.lm_head"; "layers.0" matches everything under it.
    dotted = f".{name}."
    return any(f".{s}." in dotted for s in skip)


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 128, skip: Iterable[str] = ("lm_head",),
                   symmetric: bool = False, scale_dtype: Optional[torch.dtype] = None,
                   progress: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` by a :class:`QuantLinear`, in place.

    Args:
        model: any module, a Hugging Face causal LM included.
        bits, group_size, symmetric, scale_dtype: as in :func:`efficient_ops.quant.quantize_weight`.
        skip: module names to leave dense; an entry matches a module whose dotted name contains it as a
            whole component sequence ("lm_head" matches "lm_head" and "model.lm_head").
        progress: show a tqdm progress bar.

    Returns:
        ``model`` itself.
    """
    skip = tuple(skip)
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not _skipped(name, skip)]
    for name, linear in tqdm(targets, desc=f"quantizing to {bits} bits", unit="layer", disable=not progress):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(linear, bits=bits, group_size=group_size,
                                                       symmetric=symmetric, scale_dtype=scale_dtype))
    return model
