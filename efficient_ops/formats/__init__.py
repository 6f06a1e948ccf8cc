"""Domain types, one module per family, in plain PyTorch (they never call ``torch.ops``): the bottom layer.

- :mod:`.lowbit`: the packed low-bit weight formats, ``QuantizedWeight`` / ``MixedQuantizedWeight``, quantizers,
  packing and dequantization.
- :mod:`.rsparse`: ``RSparseWeights`` and their calibration.
- :mod:`.sparse_attention`: ``BlockSparseMask``, ``PageSummary`` and the sparsity-pattern builders.
- :mod:`.speculative`: draft-tree helpers (validation, masks, depths, positions, paths, children).

Every public name is re-exported from :mod:`efficient_ops`; the ops that consume these types are in
:mod:`efficient_ops.ops`.
"""
