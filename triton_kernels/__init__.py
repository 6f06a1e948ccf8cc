"""Triton kernels, one module per family; installed as ``efficient_ops.triton_kernels``.

Modules import Triton at their own import, so importing this package stays cheap.
"""
