"""``torch.nn`` modules over the efficient_ops kernels, and helpers that swap them into models."""

from .lowbit import QuantLinear, quantize_model

__all__ = ["QuantLinear", "quantize_model"]
