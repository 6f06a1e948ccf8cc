"""Reference R-Sparse linear: the formula of :mod:`efficient_ops.formats.rsparse`, row by row, in float32 (float64
for float64 inputs), rounded once to ``x.dtype``."""

from typing import Optional

import torch

from ..formats.rsparse import active_mask


def rsparse_linear(x: torch.Tensor, weight_t: torch.Tensor, col_norms: torch.Tensor, threshold: float,
                   v: torch.Tensor, us_t: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``W (x * m) + U_r S_r V_r^T (x * (1 - m)) + bias`` with ``m = |x| * col_norms > threshold`` per row.
    Inputs are validated by the op before it dispatches here."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(compute)
    m = active_mask(x, col_norms, threshold)
    sparse = torch.where(m, xc, 0.0) @ weight_t.to(compute)
    low_rank = (torch.where(m, 0.0, xc) @ v.to(compute)) @ us_t.to(compute)
    y = sparse + low_rank
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)
