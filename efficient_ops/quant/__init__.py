"""Quantizers and packed weight formats."""

from .lowbit import (QuantizedWeight, dequantize_packed, dequantize_weight, pack_int4, padded_in_features,
                     quantize_weight, unpack_int4, validate_packed)

__all__ = ["QuantizedWeight", "quantize_weight", "dequantize_weight", "dequantize_packed", "pack_int4",
           "unpack_int4", "padded_in_features", "validate_packed"]
