"""Quantizers and packed weight formats."""

from .lowbit import (FORMATS, SUPPORTED_BITS, TERNARY, MixedQuantizedWeight, QuantizedWeight, dequantize_packed,
                     dequantize_weight, get_format, pack_levels, padded_in_features, quantize_weight,
                     quantize_weight_mixed, select_salient_channels, unpack_levels, validate_packed)

__all__ = ["FORMATS", "SUPPORTED_BITS", "TERNARY", "MixedQuantizedWeight", "QuantizedWeight", "quantize_weight",
           "quantize_weight_mixed", "select_salient_channels", "dequantize_weight", "dequantize_packed",
           "get_format", "pack_levels", "unpack_levels", "padded_in_features", "validate_packed"]
