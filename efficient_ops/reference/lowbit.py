"""Reference low-bit GEMM: dequantize to float32 (the format's own definition,
:func:`efficient_ops.formats.lowbit.dequantize_packed`), multiply, round once."""

from typing import Optional

import torch

from ..formats.lowbit import dequantize_mixed, dequantize_packed


def _linear(x, w, bias):
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def lowbit_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                bias: Optional[torch.Tensor], bits: float, group_size: int, in_features: int) -> torch.Tensor:
    """``x @ dequant(W).T + bias`` computed in float32 and returned in ``x.dtype``; x is ``[..., K]``."""
    return _linear(x, dequantize_packed(qweight, scales, zeros, bits, group_size, in_features), bias)


def lowbit_gemm_mixed(x, perm, qweight_a, scales_a, zeros_a, qweight_b, scales_b, zeros_b, bias, bits_a,
                      group_size_a, bits_b, group_size_b, salient_features) -> torch.Tensor:
    """The mixed-precision layout (two packed parts over permuted input channels) as one dense weight."""
    w = dequantize_mixed(perm, qweight_a, scales_a, zeros_a, bits_a, group_size_a, qweight_b, scales_b, zeros_b,
                         bits_b, group_size_b, salient_features)
    return _linear(x, w, bias)
