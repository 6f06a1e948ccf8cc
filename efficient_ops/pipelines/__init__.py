"""Pipelines that compose the op families into a product: speculative decoding and Tempo.

The top layer of the package: a pipeline imports only from :mod:`efficient_ops` (the public ops and
types), :mod:`efficient_ops.nn` and its own subpackage, never from ``ops``, ``reference`` or a kernel.
"""
