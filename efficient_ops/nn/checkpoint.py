"""Saving converted models as Hugging Face checkpoints, and loading them back.

:func:`save_quantized` writes a folder that ``transformers`` and vLLM read:

- ``model.safetensors``: every tensor of the model's state dict (tensors that share storage, such as tied
  embeddings, once), the packed weights in the layout the kernels read (``qweight`` / ``scales`` /
  ``zeros`` of a :class:`~efficient_ops.nn.QuantLinear`, ``perm`` and the ``*_a`` / ``*_b`` parts of a
  :class:`~efficient_ops.nn.MixedQuantLinear`, ``weight_t`` / ``col_norms`` / ``v`` / ``us_t`` of an
  :class:`~efficient_ops.nn.RSparseLinear`);
- ``config.json``: the model's config plus a ``quantization_config``::

      {"quant_method": "efficient_ops", "format_version": 1,
       "modules_to_not_convert": ["lm_head"],
       "layers": {"model.layers.0.self_attn.q_proj": {"format": "lowbit", "bits": 4, "group_size": 128,
                  "grid": "int", "in_features": 576, "out_features": 576, "bias": false,
                  "dtype": "float32", "scale_dtype": "float16"}, ...}}

  with one entry per converted layer (formats ``lowbit``, ``lowbit_mixed``, ``rsparse``; see
  :func:`layer_spec`) and the ``nn.Linear`` layers left dense in ``modules_to_not_convert``;
- ``generation_config.json`` and the tokenizer's files, when given.

:func:`load_quantized` rebuilds the same modules and loads the tensors unchanged, so the reloaded model
computes bit for bit what the converted one did. It goes through ``transformers``' own loading
(``AutoModelForCausalLM.from_pretrained``) with a quantizer registered under ``quant_method
"efficient_ops"`` (:func:`register_hf_quantizer`; after that call, a plain ``from_pretrained`` of the folder
works too). Checkpoints of another ``format_version``, a layer of an unknown format, and a missing or
mis-shaped tensor raise ``ValueError`` naming the thing at fault.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Iterable, Union

import torch
from torch import nn

from .lowbit import MixedQuantLinear, QuantLinear
from .rsparse import RSparseLinear

QUANT_METHOD = "efficient_ops"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
FORMATS = ("lowbit", "lowbit_mixed", "rsparse")
_COMMON_KEYS = ("in_features", "out_features", "bias", "dtype")
_KEYS = {
    "lowbit": _COMMON_KEYS + ("bits", "group_size", "scale_dtype"),
    "lowbit_mixed": _COMMON_KEYS + ("salient_features", "salient_bits", "salient_group_size", "rest_bits",
                                    "rest_group_size", "scale_dtype"),
    "rsparse": _COMMON_KEYS + ("rank", "threshold", "alpha", "sparsity", "max_sparse_rows"),
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{where}: unknown dtype {name!r}")
    return dtype


def _float(x: float) -> Union[float, str]:
    # JSON has no infinities; a float32 threshold is exact as a Python float otherwise
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def layer_spec(module: nn.Module) -> Dict:
    """The ``quantization_config.layers`` entry of one converted module (everything needed to rebuild it empty).

    ``grid`` (``salient_grid`` / ``rest_grid``) records how the levels were picked, where known; the
    dequantization ``(q - zero) * scale`` does not depend on it.
    """
    common = {"in_features": module.in_features, "out_features": module.out_features,
              "bias": module.bias is not None}
    if isinstance(module, QuantLinear):
        return {"format": "lowbit", "bits": module.bits, "group_size": module.group_size, "grid": module.grid,
                **common, "dtype": _dtype_name(module.weight_dtype), "scale_dtype": _dtype_name(module.scales.dtype)}
    if isinstance(module, MixedQuantLinear):
        return {"format": "lowbit_mixed", "salient_features": module.salient_features,
                "salient_bits": module.bits_a, "salient_group_size": module.group_size_a, "salient_grid": module.grid_a,
                "rest_bits": module.bits_b, "rest_group_size": module.group_size_b, "rest_grid": module.grid_b,
                **common, "dtype": _dtype_name(module.weight_dtype), "scale_dtype": _dtype_name(module.scales_a.dtype)}
    if isinstance(module, RSparseLinear):
        return {"format": "rsparse", "rank": module.rank, "threshold": _float(module.threshold),
                "alpha": module.alpha, "sparsity": module.sparsity, "max_sparse_rows": module.max_sparse_rows,
                **common, "dtype": _dtype_name(module.weight_t.dtype)}
    raise TypeError(f"module: not a converted efficient_ops layer: {type(module).__name__}")


def check_layer_spec(name: str, spec) -> None:
    """Raise ValueError naming the layer and key if ``spec`` is not a layer entry this version reads."""
    where = f"quantization_config.layers[{name!r}]"
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected an object, got {type(spec).__name__}")
    fmt = spec.get("format")
    if fmt not in FORMATS:
        raise ValueError(f"{where}.format: unknown format {fmt!r}; this efficient_ops reads {list(FORMATS)}")
    missing = [k for k in _KEYS[fmt] if k not in spec]
    if missing:
        raise ValueError(f"{where}: missing {missing} for format {fmt!r}")


def build_module(name: str, spec: Dict, device=None) -> nn.Module:
    """An empty module (to load tensors into) for the layer entry ``spec`` of layer ``name``."""
    check_layer_spec(name, spec)
    where = f"quantization_config.layers[{name!r}]"
    dtype = _parse_dtype(spec["dtype"], f"{where}.dtype")
    n, k, bias = spec["out_features"], spec["in_features"], spec["bias"]
    try:
        if spec["format"] == "lowbit":
            module = QuantLinear(k, n, bias=bias, bits=spec["bits"], group_size=spec["group_size"], dtype=dtype,
                                 scale_dtype=_parse_dtype(spec["scale_dtype"], f"{where}.scale_dtype"), device=device)
            module.grid = spec.get("grid")
        elif spec["format"] == "lowbit_mixed":
            module = MixedQuantLinear(k, n, spec["salient_features"], bias=bias, salient_bits=spec["salient_bits"],
                                      rest_bits=spec["rest_bits"], salient_group_size=spec["salient_group_size"],
                                      rest_group_size=spec["rest_group_size"], dtype=dtype,
                                      scale_dtype=_parse_dtype(spec["scale_dtype"], f"{where}.scale_dtype"),
                                      device=device)
            module.grid_a, module.grid_b = spec.get("salient_grid"), spec.get("rest_grid")
        else:
            module = RSparseLinear(k, n, spec["rank"], bias=bias, dtype=dtype, device=device)
            module.threshold = float(spec["threshold"])
            module.alpha, module.sparsity = float(spec["alpha"]), float(spec["sparsity"])
            module.max_sparse_rows = spec["max_sparse_rows"]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e
    return module


def expected_tensors(name: str, spec: Dict) -> Dict[str, tuple]:
    """``{tensor name: (shape, dtype)}`` that the checkpoint must hold for layer ``name``."""
    module = build_module(name, spec, device="meta")
    return {f"{name}.{key}": (tuple(t.shape), t.dtype) for key, t in module.state_dict().items()
            if not key.endswith("_extra_state")}


def check_quantization_config(qc) -> None:
    """Raise ValueError if ``qc`` (a ``quantization_config`` dict) is not one this version reads."""
    if not isinstance(qc, dict):
        raise ValueError(f"quantization_config: expected an object, got {type(qc).__name__}")
    if qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"quantization_config.quant_method: expected {QUANT_METHOD!r}, got {qc.get('quant_method')!r}")
    if qc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"quantization_config.format_version: the checkpoint has {qc.get('format_version')!r}; "
                         f"this efficient_ops reads version {FORMAT_VERSION} (re-convert the model, or install the "
                         f"efficient_ops release that wrote it)")
    layers = qc.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError("quantization_config.layers: expected a non-empty object of layer entries")
    for name, spec in layers.items():
        check_layer_spec(name, spec)


def check_checkpoint_tensors(qc: Dict, files: Iterable[Union[str, Path]]) -> None:
    """Raise ValueError naming the first converted-layer tensor that ``files`` (safetensors) lack or hold
    with another shape or dtype than ``qc`` implies."""
    from safetensors import safe_open

    found = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                sl = f.get_slice(key)
                found[key] = (tuple(sl.get_shape()), sl.get_dtype())
    for name, spec in qc["layers"].items():
        for key, (shape, dtype) in expected_tensors(name, spec).items():
            if key not in found:
                raise ValueError(f"checkpoint: tensor {key!r} of layer {name!r} ({spec['format']}) is missing")
            got_shape, got_dtype = found[key]
            want_dtype = _SAFETENSORS_DTYPES.get(dtype)
            if got_shape != shape or got_dtype != want_dtype:
                raise ValueError(f"checkpoint: tensor {key!r} is {got_dtype} {list(got_shape)}; layer {name!r} "
                                 f"({spec['format']}) needs {want_dtype} {list(shape)}")


_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                       torch.int32: "I32"}


def quantization_config(model: nn.Module) -> Dict:
    """The ``quantization_config`` dict describing every converted layer of ``model``."""
    layers = {name: layer_spec(m) for name, m in model.named_modules()
              if isinstance(m, (QuantLinear, MixedQuantLinear, RSparseLinear))}
    if not layers:
        raise ValueError("model: has no converted layers (run quantize_model or rsparsify_model first)")
    dense = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "modules_to_not_convert": dense,
            "layers": layers}


def _unique_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict without extra state, each storage once (tied weights: the first name; transformers
    re-ties the others from the config on load)."""
    tensors, seen = {}, set()
    for key, t in model.state_dict().items():
        if key.endswith("_extra_state"):
            continue  # R-Sparse scalars live in config.json
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:  # empty tensors (rank-0 R-Sparse factors) share no storage
            continue
        seen.add(ident)
        tensors[key] = t.detach().to("cpu").contiguous()
    return tensors


def save_quantized(model: nn.Module, save_directory: Union[str, Path], tokenizer=None) -> Path:
    """Write a converted Hugging Face model (and optionally its tokenizer) as a checkpoint folder.

    Args:
        model: a ``transformers`` ``PreTrainedModel`` converted by :func:`quantize_model` or
            :func:`rsparsify_model` (it needs ``.config`` to be rebuilt on load).
        save_directory: the folder (created if missing); ``vllm serve`` and :func:`load_quantized` take it.
        tokenizer: saved into the same folder when given (vLLM needs one there).

    Returns:
        The folder's path.
    """
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError("model: save_quantized needs a transformers PreTrainedModel (it has no .config)")
    qc = quantization_config(model)
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_unique_state_dict(model), str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    config_dict = config.to_dict()
    config_dict["quantization_config"] = qc  # replaces a GGUF source's, which no longer applies
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def register_hf_quantizer() -> None:
    """Register the ``efficient_ops`` quantization method with ``transformers`` (idempotent), so that
    ``AutoModelForCausalLM.from_pretrained`` rebuilds the converted layers of a saved folder. Without it,
    ``transformers`` warns and loads plain ``nn.Linear`` layers without their weights."""
    from . import hf_quantizer

    hf_quantizer.register()


def load_quantized(directory: Union[str, Path], device=None, **from_pretrained_kwargs) -> nn.Module:
    """Load a folder written by :func:`save_quantized` into the same model, in eval mode.

    Args:
        directory: the checkpoint folder.
        device: where to put the model (default: CPU).
        from_pretrained_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (the dtype defaults to
            the saved one: converted layers always keep their saved dtypes).

    Raises:
        ValueError: another format version, an unknown layer format, a missing or mis-shaped tensor.
    """
    from transformers import AutoModelForCausalLM

    path = Path(directory)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"directory: {str(path)!r} has no config.json")
    qc = json.loads(config_file.read_text()).get("quantization_config")
    if qc is None:
        raise ValueError(f"directory: {str(path)!r} has no quantization_config in config.json "
                         f"(not written by save_quantized)")
    check_quantization_config(qc)
    register_hf_quantizer()
    from_pretrained_kwargs.setdefault("dtype", "auto")
    model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval()

