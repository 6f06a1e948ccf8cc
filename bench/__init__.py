"""Microbenchmarks, one module per family; installed as ``efficient_ops.bench`` and run by ``efficient-ops bench``."""
