"""Op schemas, fake (meta) implementations and backend dispatch, one module per kernel family.

All ops live in the ``efficient_ops`` namespace of ``torch.ops``. They are defined with
``torch.library.Library`` and Python impls for the CPU and CUDA dispatch keys, which costs a
few microseconds less per call than ``torch.library.custom_op``: these ops run per token.
"""

import torch

lib = torch.library.Library("efficient_ops", "DEF")


def check_bias(bias, n: int, x: torch.Tensor) -> None:
    """An optional ``bias`` must be ``[n]``, in x's dtype, on x's device."""
    if bias is None:
        return
    if bias.shape != (n,):
        raise ValueError(f"bias: expected shape [{n}], got {tuple(bias.shape)}")
    if bias.dtype != x.dtype:
        raise TypeError(f"bias: dtype {bias.dtype} differs from x dtype {x.dtype}")
    if bias.device != x.device:
        raise ValueError(f"bias: on {bias.device}, but x is on {x.device}")

from . import lowbit, rsparse, sparse_attention, speculative  # noqa: E402  (each registers its ops on ``lib``)

__all__ = ["lib", "lowbit", "rsparse", "sparse_attention", "speculative"]
