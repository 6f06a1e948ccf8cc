"""efficient_ops: Triton and CUDA kernels for efficient LLM inference, as ``torch.ops.efficient_ops.*``.

Importing the package registers the ops; it never touches a GPU and works without the compiled
extension or Triton (see ``efficient-ops info`` for what is available here). Every public op wrapper
and domain type is importable from here; modules and model conversion are in :mod:`efficient_ops.nn`.
"""

__version__ = "0.1.0"

# importing ops registers torch.ops.efficient_ops.*
from . import backends, formats, nn, ops  # noqa: F401
from .formats.lowbit import (FORMATS, MixedQuantizedWeight, QuantizedWeight, dequantize_packed, dequantize_weight,
                             pack_levels, quantize_weight, quantize_weight_mixed, select_salient_channels,
                             unpack_levels)
from .formats.rsparse import RSparseWeights, calibrate
from .formats.sparse_attention import (BlockSparseMask, PageSummary, anchor, centroid_select, kmeans_keys, streaming,
                                       topk_blocks, vertical_slash)
from .formats.speculative import tree_depths, tree_mask, tree_paths, tree_positions, validate_parents
from .ops.lowbit import lowbit_linear
from .ops.rsparse import rsparse_linear
from .ops.sparse_attention import block_sparse_attention, paged_sparse_decode, select_pages, sparse_decode_attention
from .ops.speculative import (compact_kv, merge_attention_states, tree_attention, verify_greedy, verify_sampling,
                              verify_typical)

__all__ = [
    # low-bit GEMM
    "lowbit_linear", "FORMATS", "QuantizedWeight", "MixedQuantizedWeight", "quantize_weight",
    "quantize_weight_mixed", "select_salient_channels", "dequantize_weight", "dequantize_packed", "pack_levels",
    "unpack_levels",
    # R-Sparse
    "rsparse_linear", "RSparseWeights", "calibrate",
    # sparse attention
    "block_sparse_attention", "BlockSparseMask", "streaming", "vertical_slash", "anchor", "kmeans_keys",
    "centroid_select", "topk_blocks", "PageSummary", "select_pages", "paged_sparse_decode", "sparse_decode_attention",
    # speculative
    "tree_attention", "merge_attention_states", "verify_greedy", "verify_sampling", "verify_typical", "compact_kv",
    "validate_parents", "tree_depths", "tree_mask", "tree_positions", "tree_paths",
    "backends", "formats", "nn", "ops", "__version__",
]
