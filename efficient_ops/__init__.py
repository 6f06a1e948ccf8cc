"""efficient_ops: Triton and CUDA kernels for efficient LLM inference, as ``torch.ops.efficient_ops.*``.

Importing the package registers the ops; it never touches a GPU and works without the compiled
extension or Triton (see ``efficient-ops info`` for what is available here).
"""

__version__ = "0.1.0"

# importing ops registers torch.ops.efficient_ops.*
from . import backends, nn, ops, quant, rsparse, sparse_attention, speculative  # noqa: F401
from .ops.lowbit import lowbit_linear
from .ops.rsparse import rsparse_linear
from .sparse_attention import block_sparse_attention, paged_sparse_decode, sparse_decode_attention
from .speculative import (compact_kv, merge_attention_states, tree_attention, verify_greedy, verify_sampling,
                          verify_typical)

__all__ = ["lowbit_linear", "rsparse_linear", "tree_attention", "merge_attention_states", "verify_greedy",
           "verify_sampling", "verify_typical", "compact_kv", "block_sparse_attention", "sparse_decode_attention",
           "paged_sparse_decode", "backends", "nn", "ops", "quant", "rsparse",
           "sparse_attention", "speculative", "__version__"]
