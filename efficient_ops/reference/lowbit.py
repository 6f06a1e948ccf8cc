"""Reference low-bit GEMM: dequantize to float32, multiply, round once."""

from typing import Optional

import torch

from ..quant.lowbit import _dequantize


def lowbit_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                bias: Optional[torch.Tensor], bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """``x @ dequant(W).T + bias`` computed in float32 and returned in ``x.dtype``; x is ``[..., K]``.
    Inputs are validated by the op before it dispatches here."""
    w = _dequantize(qweight, scales, zeros, group_size, in_features)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
