"""``torch.nn`` modules over the efficient_ops kernels, and helpers that swap them into models."""

from .checkpoint import load_quantized, register_hf_quantizer, save_quantized
from .lowbit import MixedQuantLinear, QuantLinear, quantize_model
from .rsparse import RSparseLinear, rsparsify_model

__all__ = ["MixedQuantLinear", "QuantLinear", "RSparseLinear", "quantize_model", "rsparsify_model",
           "save_quantized", "load_quantized", "register_hf_quantizer"]
