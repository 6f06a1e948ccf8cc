"""Op schemas, fake (meta) implementations and backend dispatch, one module per kernel family.

All ops live in the ``efficient_ops`` namespace of ``torch.ops``. They are defined with
``torch.library.Library`` and Python impls for the CPU and CUDA dispatch keys, which costs a
few microseconds less per call than ``torch.library.custom_op``: these ops run per token.
"""

import torch

lib = torch.library.Library("efficient_ops", "DEF")

from . import lowbit, rsparse  # noqa: E402  (each registers its ops on ``lib``)

__all__ = ["lib", "lowbit", "rsparse"]
