"""R-Sparse weights (``rsparse`` family): rank-aware activation sparsity for a linear layer, and its calibration.

A linear layer ``y = W x`` (``W`` is ``[out, in]``) becomes

    y = W (x * m) + U_r S_r V_r^T (x * (1 - m)),     m_i = 1[ |x_i| * c_i > t ]

with ``W = U S V^T`` its SVD, ``c_i = ||W[:, i]||_2`` the column norms, ``t`` a per-layer threshold and
``r`` a per-layer rank. Input channels above the threshold read their weight column; the others are
not dropped but go through the rank-``r`` branch. Each row of a batch has its own mask.

:func:`calibrate` picks ``t`` and ``r`` from calibration inputs and a target sparsity ``s``: a fraction
``alpha`` of the kept budget ``(1 - s)`` goes to sparse channels (about ``in * (1 - s) * alpha`` of them
pass ``t`` on average) and the rest to the rank, ``r = (1 - alpha)(1 - s) * in * out / (in + out)``,
so both branches together read about ``(1 - s)`` of the dense weight's bytes.

The mask is computed in float32 exactly as ``abs(float32(x)) * col_norms > float32(t)`` by every
backend (the threshold is stored already rounded to float32), so all backends pick the same channels.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple, Union

import torch
from torch import nn

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))
MAX_SEARCH_ROWS = 4096  # rows of the calibration inputs the alpha search evaluates


@dataclasses.dataclass
class RSparseWeights:
    """One layer's R-Sparse weights, in the layout the kernels read.

    Attributes:
        weight_t: ``[in, out]`` contiguous, ``W`` transposed: input channel ``i``'s column of ``W`` is
            row ``i``, so a kernel streams exactly the rows of the active channels.
        col_norms: float32 ``[in]``, ``c_i = ||W[:, i]||_2``.
        v: ``[in, r]`` contiguous, ``V_r`` (row ``i`` belongs to input channel ``i``).
        us_t: ``[r, out]`` contiguous, ``(U_r S_r)^T`` (row ``j`` is singular vector ``j`` times ``S_j``).
        threshold: ``t`` (a float32 value; ``-inf`` keeps every channel, ``inf`` none).
        sparsity: the target sparsity ``s`` it was calibrated for.
        alpha: the share of the kept budget given to sparse channels.
        alpha_errors: ``[(alpha, relative output error on the calibration inputs), ...]`` when alpha
            was searched, else empty.
    """

    weight_t: torch.Tensor
    col_norms: torch.Tensor
    v: torch.Tensor
    us_t: torch.Tensor
    threshold: float
    sparsity: float = 0.0
    alpha: float = 1.0
    alpha_errors: List[Tuple[float, float]] = dataclasses.field(default_factory=list)

    @property
    def in_features(self) -> int:
        return self.weight_t.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight_t.shape[1]

    @property
    def rank(self) -> int:
        return self.v.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_t.dtype

    @property
    def device(self) -> torch.device:
        return self.weight_t.device

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "RSparseWeights":
        """A copy on ``device`` with the weight and factors in ``dtype`` (col_norms stay float32)."""
        return dataclasses.replace(
            self, weight_t=self.weight_t.to(device, dtype), v=self.v.to(device, dtype),
            us_t=self.us_t.to(device, dtype), col_norms=self.col_norms.to(device),
            alpha_errors=list(self.alpha_errors))

    def nbytes(self, active_fraction: float = 1.0) -> int:
        """Bytes a call reads from the weights when ``active_fraction`` of the channels pass the threshold."""
        row = self.weight_t.element_size()
        return int(round(self.in_features * active_fraction)) * self.out_features * row + \
            (self.v.numel() + self.us_t.numel()) * row + self.col_norms.numel() * 4

    def validate(self) -> None:
        """Raise ValueError/TypeError if the tensors do not fit together."""
        validate_weights(self.weight_t, self.col_norms, self.threshold, self.v, self.us_t)
        check_col_norms_values(self.col_norms)


def validate_weights(weight_t, col_norms, threshold, v, us_t) -> None:
    """Check the R-Sparse tensors against each other, naming the argument at fault."""
    for name, t in (("weight_t", weight_t), ("col_norms", col_norms), ("v", v), ("us_t", us_t)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.dim() != (1 if name == "col_norms" else 2):
            raise ValueError(f"{name}: expected {1 if name == 'col_norms' else 2} dimensions, got shape {tuple(t.shape)}")
        if t.device != weight_t.device:
            raise ValueError(f"{name}: on {t.device}, but weight_t is on {weight_t.device}")
        if name != "col_norms" and not t.is_contiguous():
            raise ValueError(f"{name}: must be contiguous (the kernels stream its rows)")
    if weight_t.dtype not in DTYPES:
        raise TypeError(f"weight_t: expected one of {DTYPES}, got {weight_t.dtype}")
    k, n = weight_t.shape
    if col_norms.dtype != torch.float32:
        raise TypeError(f"col_norms: expected float32, got {col_norms.dtype}")
    if col_norms.shape != (k,):
        raise ValueError(f"col_norms: expected shape [{k}] (in_features), got {tuple(col_norms.shape)}")
    for name, t in (("v", v), ("us_t", us_t)):
        if t.dtype != weight_t.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from weight_t dtype {weight_t.dtype}")
    if v.shape[0] != k:
        raise ValueError(f"v: expected {k} rows (in_features), got shape {tuple(v.shape)}")
    if us_t.shape != (v.shape[1], n):
        raise ValueError(f"us_t: expected shape [{v.shape[1]}, {n}] (rank, out_features), got {tuple(us_t.shape)}")
    if not isinstance(threshold, (float, int)) or threshold != threshold:
        raise ValueError(f"threshold: expected a float (not NaN), got {threshold!r}")


def check_col_norms_values(col_norms: torch.Tensor) -> None:
    """Column norms are finite and non-negative (a NaN or negative norm flips the channel mask). It synchronises,
    so the op skips it inside CUDA-graph capture."""
    if col_norms.numel() and not bool(((col_norms >= 0) & torch.isfinite(col_norms)).all()):
        raise ValueError("col_norms: must be finite and non-negative (they are column 2-norms of W)")


def budget(in_features: int, out_features: int, sparsity: float, alpha: float) -> Tuple[int, int]:
    """(sparse channels kept on average, rank) for a layer at ``sparsity`` with ``alpha`` (see the module doc)."""
    keep = 1.0 - sparsity
    channels = min(in_features, max(0, round(in_features * keep * alpha)))
    rank = round((1.0 - alpha) * keep * in_features * out_features / (in_features + out_features))
    return channels, min(max(rank, 0), min(in_features, out_features))


def threshold_for(scores: torch.Tensor, channels: int, in_features: int) -> float:
    """The float32 threshold that keeps ``channels`` of ``in_features`` channels on average.

    ``scores`` holds ``|x| * c`` for every calibration row and channel. Returns ``-inf`` to keep every
    channel and ``inf`` to keep none.
    """
    if channels >= in_features:
        return float("-inf")
    if channels <= 0:
        return float("inf")
    flat = scores.reshape(-1).float()
    at_or_below = flat.numel() - round(flat.numel() * channels / in_features)  # scores not kept
    if at_or_below <= 0:
        return float("-inf")
    return float(torch.kthvalue(flat.cpu(), at_or_below).values)


def active_mask(x: torch.Tensor, col_norms: torch.Tensor, threshold: float) -> torch.Tensor:
    """The active-channel mask ``|x| * col_norms > threshold``, computed exactly as every backend does (float32
    product and compare)."""
    return x.float().abs() * col_norms.float() > torch.tensor(threshold, dtype=torch.float32)


def _apply(x, w, u_s, v_r, col_norms, threshold):
    """The R-Sparse output of float32/float64 ``x`` [rows, in] with dense factors (for calibration)."""
    m = active_mask(x, col_norms, threshold).to(x.dtype)
    return (x * m) @ w.T + ((x * (1 - m)) @ v_r) @ u_s.T


@torch.no_grad()
def calibrate(linear: Union[nn.Linear, torch.Tensor], x_calib: torch.Tensor, sparsity: float = 0.5,
              alpha: Optional[float] = None, alphas=DEFAULT_ALPHAS, dtype: Optional[torch.dtype] = None,
              max_search_rows: int = MAX_SEARCH_ROWS) -> RSparseWeights:
    """Calibrate one layer for R-Sparse.

    Args:
        linear: an ``nn.Linear`` (or its weight ``[out, in]``); the bias is not part of the result.
        x_calib: ``[..., in]`` inputs of the layer on calibration data (any float dtype).
        sparsity: target ``s`` in [0, 1): the share of weight bytes not read per row on average.
        alpha: the share of the kept budget for sparse channels, in [0, 1]. None searches ``alphas`` for the
            least relative output error ``||y - y_hat|| / ||y||`` on (up to ``max_search_rows`` rows of)
            ``x_calib`` and records every error in ``alpha_errors``. Sparsity 0 uses alpha 1 (dense).
        dtype: dtype of the stored weights (default: the weight's dtype).

    Returns:
        :class:`RSparseWeights` on the weight's device.
    """
    weight = linear.weight if isinstance(linear, nn.Linear) else linear
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"linear: expected an nn.Linear or a 2-D weight tensor, got {type(linear).__name__}")
    out_features, in_features = weight.shape
    if not weight.is_floating_point() or not torch.isfinite(weight).all():
        raise ValueError("linear: the weight must be floating point, without NaN or infinity")
    if not isinstance(x_calib, torch.Tensor) or not x_calib.is_floating_point():
        raise TypeError("x_calib: expected a floating-point tensor")
    if x_calib.dim() < 1 or x_calib.shape[-1] != in_features or x_calib.numel() == 0:
        raise ValueError(f"x_calib: expected a non-empty [..., {in_features}] tensor, got shape {tuple(x_calib.shape)}")
    if not torch.isfinite(x_calib).all():  # one NaN makes every alpha's error NaN, and min() then picks alpha 0
        raise ValueError("x_calib: contains NaN or infinity")
    alphas = tuple(alphas)
    if alpha is None and (not alphas or not all(0.0 <= a <= 1.0 for a in alphas)):
        raise ValueError(f"alphas: expected a non-empty sequence of values in [0, 1], got {alphas}")
    if not isinstance(max_search_rows, int) or max_search_rows < 1:
        raise ValueError(f"max_search_rows: expected a positive integer, got {max_search_rows!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity: must be in [0, 1), got {sparsity}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: must be in [0, 1] or None, got {alpha}")
    dtype = dtype or weight.dtype
    if dtype not in DTYPES:
        raise TypeError(f"dtype: expected one of {DTYPES}, got {dtype}")

    compute = torch.float64 if dtype == torch.float64 else torch.float32
    w = weight.detach().to(compute)
    x = x_calib.detach().reshape(-1, in_features).to(w.device, compute)
    col_norms = w.float().norm(dim=0)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    scores = x.float().abs() * col_norms

    def factors(a):
        channels, rank = budget(in_features, out_features, sparsity, a)
        return threshold_for(scores, channels, in_features), u[:, :rank] * s[:rank], vh[:rank].T

    errors = []
    if sparsity == 0.0:
        alpha = 1.0
    elif alpha is None:
        rows = x[torch.linspace(0, x.shape[0] - 1, min(x.shape[0], max_search_rows)).round().long()]
        y = rows @ w.T
        for a in alphas:
            t, u_s, v_r = factors(a)
            err = float((_apply(rows, w, u_s, v_r, col_norms, t) - y).norm() / y.norm().clamp_min(1e-30))
            errors.append((float(a), err))
        alpha = min(errors, key=lambda e: (e[1], -e[0]))[0]  # ties: the larger alpha
    t, u_s, v_r = factors(alpha)
    return RSparseWeights(weight_t=w.T.to(dtype).contiguous(), col_norms=col_norms.float().contiguous(),
                          v=v_r.to(dtype).contiguous(), us_t=u_s.T.to(dtype).contiguous(), threshold=t,
                          sparsity=float(sparsity), alpha=float(alpha), alpha_errors=errors)
