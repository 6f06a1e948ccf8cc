"""The ``efficient_ops`` quantization method for ``transformers``' ``from_pretrained`` (imported only by
:func:`efficient_ops.nn.register_hf_quantizer`, so that importing efficient_ops never imports transformers).

Before the weights load, the quantizer checks the checkpoint's tensors against ``quantization_config``
and swaps every listed ``nn.Linear`` for the empty efficient_ops module of its entry; transformers then
loads the packed tensors into those modules' buffers unchanged (the empty modules carry the saved dtypes).
"""

from torch import nn
from transformers.quantizers import (
    HfQuantizer,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import (
    FORMAT_VERSION,
    QUANT_METHOD,
    build_module,
    check_checkpoint_tensors,
    check_quantization_config,
)
from .convert import replace_module
from .rsparse import RSparseLinear


class _LoadedRSparseLinear(RSparseLinear):
    """An RSparseLinear whose state dict holds tensors only: transformers' loader handles no extra state (the
    scalars come from ``quantization_config``, and :func:`~efficient_ops.nn.save_quantized` writes them there)."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state


class EfficientOpsConfig(QuantizationConfigMixin):
    """``config.json``'s ``quantization_config`` of a checkpoint written by :func:`efficient_ops.nn.save_quantized`."""

    def __init__(self, layers=None, format_version=FORMAT_VERSION, modules_to_not_convert=(),
                 quant_method=QUANT_METHOD, **kwargs):
        self.quant_method = quant_method
        self.format_version = format_version
        self.layers = layers
        self.modules_to_not_convert = list(modules_to_not_convert)
        check_quantization_config(self.to_dict())

    def to_dict(self):
        return {"quant_method": self.quant_method, "format_version": self.format_version,
                "modules_to_not_convert": self.modules_to_not_convert, "layers": self.layers}


class EfficientOpsHfQuantizer(HfQuantizer):
    """Loads pre-converted efficient_ops checkpoints (it cannot convert a model while loading it)."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        qc = self.quantization_config.to_dict()
        for name in qc["layers"]:
            try:
                model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"quantization_config.layers: {name!r} is not a module of "
                                 f"{type(model).__name__}") from None
        if checkpoint_files:
            check_checkpoint_tensors(qc, [f for f in checkpoint_files if str(f).endswith(".safetensors")])
        for name, spec in qc["layers"].items():
            module = build_module(name, spec, device="meta")
            if isinstance(module, RSparseLinear):
                module.__class__ = _LoadedRSparseLinear
            replace_module(model, name, module)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def is_serializable(self):
        return False  # save with efficient_ops.nn.save_quantized

    @property
    def is_trainable(self):
        return False


def register() -> None:
    """Register the config and quantizer under ``quant_method "efficient_ops"`` (once)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(EfficientOpsConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(EfficientOpsHfQuantizer)
