"""``RSparseLinear``: an ``nn.Linear`` replacement running R-Sparse (``torch.ops.efficient_ops.rsparse_linear``),
and model conversion (:func:`rsparsify_model`)."""

from typing import Dict, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..formats.rsparse import RSparseWeights, calibrate, validate_weights
from .convert import copy_bias, observe_inputs, replace_module, target_linears

# Prefill crossover: calls with more rows than this run the dense weight through cuBLAS. The sparse path
# wins by skipping weight bytes, which pays while reading the weight dominates (decode, a few rows);
# the union of many rows' masks approaches the dense weight, and the CUDA kernel covers M <= 8.
DEFAULT_MAX_SPARSE_ROWS = 8


class RSparseLinear(nn.Module):
    """``y = W (x * m) + U_r S_r V_r^T (x * (1 - m)) + b`` (R-Sparse, see :mod:`efficient_ops.formats.rsparse`).

    Buffers ``weight_t`` ``[in, out]``, ``col_norms``, ``v`` ``[in, rank]``, ``us_t`` ``[rank, out]`` (so
    ``state_dict``, ``.to()`` and ``.cuda()`` work as usual); ``threshold``, ``alpha`` and ``sparsity`` are
    plain attributes saved in the state dict's extra state (no device sync per call); ``bias`` is a
    parameter as in ``nn.Linear``.

    Calls with more than ``max_sparse_rows`` rows (prefill) run the dense layer ``x @ weight_t + b``;
    set it to None to run every call sparse (e.g. to measure the quality of the sparse path on a full
    sequence). ``backend`` pins a backend for this layer.

    The constructor makes an empty layer (to load a ``state_dict`` into); use :meth:`from_linear`.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.threshold, self.alpha, self.sparsity = float("-inf"), 1.0, 0.0
        self.max_sparse_rows: Optional[int] = DEFAULT_MAX_SPARSE_ROWS
        self.backend: Optional[str] = None
        self.register_buffer("weight_t", torch.zeros(in_features, out_features, dtype=dtype, device=device))
        self.register_buffer("col_norms", torch.zeros(in_features, dtype=torch.float32, device=device))
        self.register_buffer("v", torch.zeros(in_features, rank, dtype=dtype, device=device))
        self.register_buffer("us_t", torch.zeros(rank, out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, x_calib: torch.Tensor, sparsity: float = 0.5,
                    alpha: Optional[float] = None, **calibrate_kwargs) -> "RSparseLinear":
        """Calibrate ``linear`` on its inputs ``x_calib`` (:func:`efficient_ops.formats.rsparse.calibrate`) into a new
        module."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected nn.Linear, got {type(linear).__name__}")
        rw = calibrate(linear, x_calib, sparsity=sparsity, alpha=alpha, **calibrate_kwargs)
        return cls.from_weights(rw, linear.bias)

    @classmethod
    def from_weights(cls, rw: RSparseWeights, bias: Optional[torch.Tensor] = None) -> "RSparseLinear":
        """Wrap existing :class:`RSparseWeights` (and optional bias) in a module."""
        rw.validate()
        module = cls(rw.in_features, rw.out_features, rw.rank, bias=bias is not None, dtype=rw.dtype, device="meta")
        module.weight_t, module.col_norms, module.v, module.us_t = rw.weight_t, rw.col_norms, rw.v, rw.us_t
        module.threshold, module.alpha, module.sparsity = rw.threshold, rw.alpha, rw.sparsity
        if bias is not None:
            copy_bias(module, bias.to(rw.dtype))
        return module

    @property
    def weights(self) -> RSparseWeights:
        """The layer's :class:`RSparseWeights` (sharing storage with the buffers)."""
        return RSparseWeights(self.weight_t, self.col_norms, self.v, self.us_t, self.threshold, self.sparsity,
                              self.alpha)

    @property
    def rank(self) -> int:
        return self.v.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        if self.max_sparse_rows is not None and rows > self.max_sparse_rows:
            y = torch.matmul(x, self.weight_t)
            return y + self.bias if self.bias is not None else y
        return torch.ops.efficient_ops.rsparse_linear(x, self.weight_t, self.col_norms, self.threshold, self.v,
                                                      self.us_t, self.bias, self.backend)

    def _apply(self, fn, recurse=True):
        # .half() / .to(dtype) cast every floating buffer; the mask is computed from float32 column norms
        # exactly as calibrated, so they stay float32 (moves between devices still apply).
        super()._apply(fn, recurse)
        self.col_norms = self.col_norms.float()
        return self

    def get_extra_state(self) -> dict:
        return {"threshold": self.threshold, "alpha": self.alpha, "sparsity": self.sparsity}

    def set_extra_state(self, state: dict) -> None:
        self.threshold, self.alpha, self.sparsity = state["threshold"], state["alpha"], state["sparsity"]
        validate_weights(self.weight_t, self.col_norms, self.threshold, self.v, self.us_t)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"sparsity={self.sparsity}, alpha={self.alpha}, rank={self.rank}")


def _collect_inputs(model: nn.Module, targets, calib_batches, max_rows: int, progress: bool) -> Dict[str, list]:
    """Up to ``max_rows`` input rows of every target linear over the calibration batches. Rows are kept as
    views of the activations, so layers fed the same tensor (q/k/v) share memory."""
    inputs = {name: [] for name, _ in targets}
    counts = dict.fromkeys(inputs, 0)

    def record(name, x):
        if counts[name] < max_rows:
            inputs[name].append(x[: max_rows - counts[name]])
            counts[name] += inputs[name][-1].shape[0]

    observe_inputs(model, targets, calib_batches, record, "collecting calibration inputs", progress)
    return inputs


def rsparsify_model(model: nn.Module, calib_batches: Iterable, sparsity: float = 0.5, alpha: Optional[float] = None,
                    skip: Iterable[str] = ("lm_head",), max_rows: int = 4096,
                    max_sparse_rows: Optional[int] = DEFAULT_MAX_SPARSE_ROWS, dtype: Optional[torch.dtype] = None,
                    progress: bool = True, **calibrate_kwargs) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` by an :class:`RSparseLinear` calibrated on its own inputs, in place.

    Args:
        model: any module, a Hugging Face causal LM included.
        calib_batches: model inputs (tensors, or dicts of keyword arguments); forward hooks record each
            layer's inputs (up to ``max_rows`` rows per layer).
        sparsity: target sparsity per layer, in [0, 1).
        alpha: share of the kept budget for sparse channels; None searches it per layer (see
            :func:`efficient_ops.formats.rsparse.calibrate`).
        skip: module names to leave dense ("lm_head" matches "lm_head" and "model.lm_head").
        max_sparse_rows: the prefill crossover of every new layer (see :class:`RSparseLinear`).
        dtype: dtype of the stored weights, which must be the dtype of the activations the layers see
            (default: each layer's weight dtype).
        progress: show tqdm progress bars.
        calibrate_kwargs: passed to :func:`efficient_ops.formats.rsparse.calibrate` (``alphas``, ``max_search_rows``).

    Returns:
        ``model`` itself.
    """
    targets = target_linears(model, skip)
    inputs = _collect_inputs(model, targets, calib_batches, max_rows, progress)
    for name, linear in tqdm(targets, desc=f"calibrating R-Sparse at sparsity {sparsity}", unit="layer",
                             disable=not progress):
        x = torch.cat(inputs.pop(name))
        module = RSparseLinear.from_linear(linear, x, sparsity=sparsity, alpha=alpha, dtype=dtype, **calibrate_kwargs)
        module.max_sparse_rows = max_sparse_rows
        replace_module(model, name, module)
    return model
