"""Op schemas, fake (meta) implementations, autograd, argument checks, backend dispatch and the public
wrappers, one module per kernel family; shared plumbing in :mod:`efficient_ops.ops._library`."""

from . import lowbit, rsparse, sparse_attention, speculative  # noqa: F401  (each registers its ops)
from . import tempo  # noqa: F401

__all__ = ["lowbit", "rsparse", "sparse_attention", "speculative"]
