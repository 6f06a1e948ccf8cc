"""The ``efficient_ops`` quantization method for vLLM: checkpoints written by
:func:`efficient_ops.nn.save_quantized` served with ``vllm serve DIR --quantization efficient_ops``.

Every linear layer named in ``quantization_config.layers`` gets :class:`EfficientOpsLinearMethod`; the others
(``modules_to_not_convert``, e.g. ``lm_head``) get vLLM's own unquantized method. vLLM fuses layers
(``q_proj, k_proj, v_proj`` into ``qkv_proj``, ``gate_proj, up_proj`` into ``gate_up_proj``): the method keeps
one part per checkpoint layer ("sub-layer") and runs them as one call where the format allows.

Tensor parallelism, per tensor:

==========================  ======================================  =====================================
tensor                      column-parallel (qkv, gate_up)          row-parallel (o_proj, down_proj)
==========================  ======================================  =====================================
qweight, scales, zeros      the rank's output rows                  the rank's K columns: whole words and
                                                                    whole groups (per-row scales: all)
perm, *_a, *_b (mixed)      perm whole, packed parts by rows        rejected for tp > 1 (salient channels
                                                                    are scattered over all of K)
weight_t, us_t (R-Sparse)   the rank's output columns               weight_t: the rank's K rows; us_t whole
col_norms, v (R-Sparse)     whole                                   the rank's K rows
==========================  ======================================  =====================================

so every rank computes exactly its slice of each sub-layer (row-parallel partial sums are all-reduced by
vLLM). A row-parallel low-bit layer whose per-rank K is not a whole number of packing blocks (128 columns,
160 ternary) and groups is rejected when the model is built, naming the layer.

``apply`` calls the package's public wrappers :func:`efficient_ops.lowbit_linear` and
:func:`efficient_ops.rsparse_linear`; an R-Sparse layer runs dense when a call has more rows (tokens in the
batch) than its saved ``max_sparse_rows``, exactly like :class:`efficient_ops.nn.RSparseLinear`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.utils import set_weight_attrs

import efficient_ops
from efficient_ops import MixedQuantizedWeight, QuantizedWeight, RSparseWeights
from efficient_ops.nn.checkpoint import (
    QUANT_METHOD,
    build_module,
    check_quantization_config,
)

# vLLM's fused layers and the checkpoint layers they hold, where the model does not say
DEFAULT_PACKED_MODULES = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
QKV_SHARD_IDS = {"q": 0, "k": 1, "v": 2}
# The tensor dim each format splits across ranks: (column-parallel, row-parallel); None = whole on every rank
_SPLIT_DIMS = {
    "lowbit": {"qweight": (0, 1), "scales": (0, 1), "zeros": (0, 1)},
    "lowbit_mixed": {"perm": (None, None), "qweight_a": (0, None), "scales_a": (0, None), "zeros_a": (0, None),
                     "qweight_b": (0, None), "scales_b": (0, None), "zeros_b": (0, None)},
    "rsparse": {"weight_t": (1, 0), "col_norms": (None, 0), "v": (None, 0), "us_t": (1, None)},
}
# what may differ between the sub-layers of one fused layer
_PER_SUBLAYER_KEYS = {"out_features", "rank", "threshold", "alpha", "sparsity", "grid", "salient_grid", "rest_grid"}


class EfficientOpsConfig(QuantizationConfig):
    """``quantization_config`` of an efficient_ops checkpoint (see :mod:`efficient_ops.nn.checkpoint`)."""

    def __init__(self, config: Dict[str, Any]):
        super().__init__()
        check_quantization_config(config)
        self.layers: Dict[str, Dict] = config["layers"]
        self.modules_to_not_convert: List[str] = list(config.get("modules_to_not_convert", ()))

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> List[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # the Triton kernels; the CUDA extension's arch list is set at build time

    @staticmethod
    def get_config_filenames() -> List[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "EfficientOpsConfig":
        return cls(config)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None  # embeddings and lm_head: vLLM's unquantized methods
        parent, _, leaf = prefix.rpartition(".")
        packed = self.packed_modules_mapping or DEFAULT_PACKED_MODULES
        names = [f"{parent}.{sub}" if parent else sub for sub in packed[leaf]] if leaf in packed else [prefix]
        specs = [self.layers.get(name) for name in names]
        if all(spec is None for spec in specs):
            return UnquantizedLinearMethod()
        if any(spec is None for spec in specs):
            missing = [n for n, s in zip(names, specs) if s is None]
            raise ValueError(f"{prefix}: vLLM fuses {names}, but the checkpoint converted only some of them "
                             f"({missing} are dense); convert all or none")
        return EfficientOpsLinearMethod(prefix, names, specs)


class EfficientOpsLinearMethod(LinearMethodBase):
    """Packed efficient_ops weights in one vLLM linear layer (one or several fused checkpoint layers)."""

    def __init__(self, prefix: str, names: List[str], specs: List[Dict]):
        self.prefix, self.names, self.specs = prefix, names, specs
        self.format = specs[0]["format"]
        for name, spec in zip(names[1:], specs[1:]):
            differ = sorted(k for k in set(spec) | set(specs[0]) if k not in _PER_SUBLAYER_KEYS
                            and spec.get(k) != specs[0].get(k))
            if differ:
                raise ValueError(f"{prefix}: vLLM fuses {names}, whose formats differ in {differ} "
                                 f"({names[0]} vs {name}); fused layers need one format")

    # ---- shapes and sharding -------------------------------------------------------------------

    @staticmethod
    def _shard(layer, index: int):
        """(rank, ranks) over which column-parallel sub-layer ``index``'s output rows are split (QKV: K and V
        heads are replicated on ``num_kv_head_replicas`` ranks when there are fewer KV heads than ranks)."""
        if isinstance(layer, ReplicatedLinear):
            return 0, 1
        replicas = layer.num_kv_head_replicas if index > 0 and hasattr(layer, "num_kv_head_replicas") else 1
        return layer.tp_rank // replicas, layer.tp_size // replicas

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: List[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        row_parallel = isinstance(layer, RowParallelLinear) and layer.tp_size > 1
        if len(output_partition_sizes) != len(self.specs):
            raise ValueError(f"{self.prefix}: vLLM splits it into {len(output_partition_sizes)} outputs, the checkpoint "
                             f"describes {len(self.specs)} layers {self.names}")
        self.row_parallel, self.params_dtype = row_parallel, params_dtype
        self.local_specs, self.segments = [], {}
        for i, (name, spec, n_local) in enumerate(zip(self.names, self.specs, output_partition_sizes)):
            rank, ranks = (0, 1) if row_parallel else self._shard(layer, i)
            if spec["in_features"] != input_size or spec["out_features"] != n_local * ranks:
                raise ValueError(f"{name}: the checkpoint has a [{spec['out_features']}, {spec['in_features']}] "
                                 f"layer; vLLM's model expects [{n_local * ranks}, {input_size}]")
            if spec["format"] == "rsparse" and spec["dtype"] != str(params_dtype).removeprefix("torch."):
                raise ValueError(f"{name}: R-Sparse weights were saved in {spec['dtype']}, the model runs in "
                                 f"{params_dtype}; serve with --dtype {spec['dtype']}")
            if row_parallel:
                self._check_row_split(name, spec, input_size_per_partition, layer.tp_size)
            local = dict(spec, out_features=n_local, in_features=input_size_per_partition)
            self.local_specs.append(local)
            module = build_module(name, local, device="meta")
            for key, t in module.state_dict().items():
                if key in _SPLIT_DIMS[self.format]:
                    self.segments.setdefault(key, []).append((rank, tuple(t.shape), t.dtype))
        self.loaded = set()
        for key, parts in self.segments.items():
            numel = sum(torch.Size(shape).numel() for _, shape, _ in parts)
            param = torch.nn.Parameter(torch.empty(numel, dtype=parts[0][2]), requires_grad=False)
            set_weight_attrs(param, {"weight_loader": self._loader(layer, key)})
            layer.register_parameter(key, param)

    def _check_row_split(self, name: str, spec: Dict, k_local: int, tp_size: int) -> None:
        if self.format == "lowbit_mixed":
            raise ValueError(f"{name}: a mixed-precision layer cannot be split over {tp_size} ranks along K (its "
                             f"salient channels are scattered over all of K); skip it or use tensor parallel size 1")
        if self.format == "lowbit":
            align = efficient_ops.FORMATS[spec["bits"]].k_align
            group = spec["group_size"]
            if k_local % align or (group != -1 and k_local % group):
                raise ValueError(f"{name}: in_features {spec['in_features']} over {tp_size} ranks gives {k_local} "
                                 f"columns per rank, not a whole number of {align}-column packing blocks and "
                                 f"{group}-column groups for bits={spec['bits']} (a group would straddle ranks); "
                                 f"use another tensor parallel size or group size")

    def _loader(self, layer, key: str):
        split = _SPLIT_DIMS[self.format][key]
        per_row_scales = self.format == "lowbit" and self.specs[0]["group_size"] == -1 and key != "qweight"

        def load(param: torch.nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
            if len(self.specs) == 1:
                index = 0
            elif shard_id is None:
                raise ValueError(f"{self.prefix}.{key}: the checkpoint holds it fused; efficient_ops checkpoints "
                                 f"store {self.names} separately")
            else:
                index = QKV_SHARD_IDS[shard_id] if isinstance(shard_id, str) else int(shard_id)
            name = f"{self.names[index]}.{key}"
            rank, shape, dtype = self.segments[key][index]
            dim = split[1] if self.row_parallel else split[0]
            if dim is not None and not (per_row_scales and self.row_parallel):
                rank = layer.tp_rank if self.row_parallel else rank
                if loaded.shape[dim] < (rank + 1) * shape[dim]:
                    raise ValueError(f"{name}: shape {list(loaded.shape)} in the checkpoint is too small for rank "
                                     f"{rank}'s {list(shape)}")
                loaded = loaded.narrow(dim, rank * shape[dim], shape[dim])
            if tuple(loaded.shape) != shape or loaded.dtype != dtype:
                raise ValueError(f"{name}: the checkpoint holds {loaded.dtype} {list(loaded.shape)}, this rank needs "
                                 f"{dtype} {list(shape)}")
            start = sum(torch.Size(s).numel() for _, s, _ in self.segments[key][:index])
            param.data[start:start + loaded.numel()].view(shape).copy_(loaded)
            self.loaded.add((index, key))

        return load

    # ---- after loading: the package's weight objects, as views of the parameters ---------------

    def _views(self, layer, index: int) -> Dict[str, torch.Tensor]:
        out = {}
        for key, parts in self.segments.items():
            start = sum(torch.Size(s).numel() for _, s, _ in parts[:index])
            shape = parts[index][1]
            out[key] = getattr(layer, key).data[start:start + torch.Size(shape).numel()].view(shape)
        return out

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        missing = [f"{self.names[i]}.{key}" for i in range(len(self.specs)) for key in self.segments
                   if (i, key) not in self.loaded]
        if missing:
            raise ValueError(f"checkpoint: tensors {missing} are missing")
        dtype = getattr(torch, self.specs[0]["dtype"])
        sizes = [s["out_features"] for s in self.local_specs]
        k = self.local_specs[0]["in_features"]
        if self.format == "lowbit":
            # the sub-layers' rows are stored back to back: the fused layer is one packed weight
            full = {key: getattr(layer, key).data.view(sum(sizes), -1) for key in self.segments}
            spec = self.local_specs[0]
            self.parts = [QuantizedWeight(full["qweight"], full["scales"], full["zeros"], spec["bits"],
                                          spec["group_size"], (sum(sizes), k), dtype)]
            self.split_sizes = [sum(sizes)]
            return
        self.parts, self.split_sizes = [], sizes
        for i, spec in enumerate(self.local_specs):
            t = self._views(layer, i)
            if self.format == "lowbit_mixed":
                s = spec["salient_features"]
                a = QuantizedWeight(t["qweight_a"], t["scales_a"], t["zeros_a"], spec["salient_bits"],
                                    spec["salient_group_size"], (sizes[i], s), dtype)
                b = QuantizedWeight(t["qweight_b"], t["scales_b"], t["zeros_b"], spec["rest_bits"],
                                    spec["rest_group_size"], (sizes[i], k - s), dtype)
                part = MixedQuantizedWeight(t["perm"], a, b, (sizes[i], k), dtype)
            else:
                part = RSparseWeights(t["weight_t"], t["col_norms"], t["v"], t["us_t"], float(spec["threshold"]),
                                      float(spec["sparsity"]), float(spec["alpha"]))
            part.validate()
            self.parts.append(part)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        biases = [None] * len(self.parts) if bias is None else list(bias.split(self.split_sizes))
        outs = [self._apply_part(part, spec, x, b) for part, spec, b in zip(self.parts, self.local_specs, biases)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    @staticmethod
    def _apply_part(part, spec: Dict, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if isinstance(part, RSparseWeights):
            rows = x.numel() // part.in_features
            if spec["max_sparse_rows"] is not None and rows > spec["max_sparse_rows"]:
                y = torch.matmul(x, part.weight_t)  # the prefill crossover of RSparseLinear
                return y + bias if bias is not None else y
            return efficient_ops.rsparse_linear(x, part, bias)
        return efficient_ops.lowbit_linear(x, part, bias)


def register() -> None:
    """Register :class:`EfficientOpsConfig` under ``--quantization efficient_ops`` (once per process)."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    if QUANT_METHOD not in QUANTIZATION_METHODS:
        register_quantization_config(QUANT_METHOD)(EfficientOpsConfig)
