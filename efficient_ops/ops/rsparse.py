"""``efficient_ops::rsparse_linear``: R-Sparse's rank-aware sparse linear (see :mod:`efficient_ops.formats.rsparse`).

    y = W (x * m) + U_r S_r V_r^T (x * (1 - m)) + bias,   m = |x| * col_norms > threshold, per row

Backends: ``reference`` (any device, any M), ``triton`` (CUDA; CPU under ``TRITON_INTERPRET=1``; any M,
16 rows per program), ``cuda`` (the compiled decode kernel, M <= 8). Both kernels run one fused launch
(after a memset of their float32 workspace): threshold x, stream only the weight rows of active
channels, and add the low-rank branch, all reduced in float32.
"""

from typing import Optional

import torch

from .. import backends
from ..reference import rsparse as reference
from ..formats.rsparse import DTYPES, RSparseWeights, active_mask, check_col_norms_values, validate_weights
from ._library import DTYPE_NAMES, KERNEL_DTYPES, check_bias, checking_values, impl, interpreter_unsupported, lib, stream

CUDA_MAX_M = 8

lib.define("rsparse_linear(Tensor x, Tensor weight_t, Tensor col_norms, float threshold, Tensor v, Tensor us_t, "
           "Tensor? bias, str? backend=None) -> Tensor")


def _check(x, weight_t, col_norms, threshold, v, us_t, bias, values=True):
    validate_weights(weight_t, col_norms, threshold, v, us_t)
    if values and checking_values(col_norms):
        check_col_norms_values(col_norms)
    if not isinstance(x, torch.Tensor) or x.dtype not in DTYPES:
        raise TypeError(f"x: expected a float16, bfloat16, float32 or float64 tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    k, n = weight_t.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x: last dimension must be in_features={k}, got shape {tuple(x.shape)}")
    if x.dtype != weight_t.dtype:
        raise TypeError(f"x: dtype {x.dtype} differs from the weights' dtype {weight_t.dtype}")
    if x.device != weight_t.device:
        raise ValueError(f"x: on {x.device}, but the weights are on {weight_t.device}")
    check_bias(bias, n, x)


def _unsupported(backend: str, m: int, x: torch.Tensor) -> Optional[str]:
    """Why ``backend`` cannot run this call (None if it can)."""
    if backend == "reference":
        return None
    if x.dtype not in KERNEL_DTYPES:
        return f"the {backend} backend of rsparse_linear needs float16/bfloat16 (got {x.dtype})"
    reason = interpreter_unsupported(backend, x)
    if reason:
        return reason
    if backend == "cuda" and m > CUDA_MAX_M:
        return (f"the cuda backend of rsparse_linear is the decode kernel for M <= {CUDA_MAX_M} rows (got M={m}); "
                "use backend='triton' for larger M")
    return None


def _run_cuda(x2, weight_t, col_norms, threshold, v, us_t, bias):
    ext = backends.extension()
    m, (k, n), r = x2.shape[0], weight_t.shape, v.shape[1]
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    workspace = torch.zeros(ext.rsparse_workspace_bytes(m, n, r), dtype=torch.uint8, device=x2.device)
    ext.rsparse_gemv(x_ptr=x2.data_ptr(), bias_ptr=0 if bias is None else bias.data_ptr(), out_ptr=out.data_ptr(),
                     M=m, K=k, N=n, R=r, x_row_stride=x2.stride(0), out_row_stride=out.stride(0),
                     weight_t_ptr=weight_t.data_ptr(), col_norms_ptr=col_norms.data_ptr(), threshold=threshold,
                     v_ptr=v.data_ptr() if r else 0, us_t_ptr=us_t.data_ptr() if r else 0,
                     workspace_ptr=workspace.data_ptr(), dtype=DTYPE_NAMES[x2.dtype],
                     stream=stream(x2))
    return out


def _run_triton(x2, weight_t, col_norms, threshold, v, us_t, bias):
    from ..triton_kernels import rsparse as kernels  # imported on first use: Triton is optional
    return kernels.rsparse_linear(x2, weight_t, col_norms, threshold, v, us_t, bias)


_RUNNERS = {"cuda": _run_cuda, "triton": _run_triton}


def _rsparse_linear(x, weight_t, col_norms, threshold, v, us_t, bias, backend=None):
    _check(x, weight_t, col_norms, threshold, v, us_t, bias)
    k, n = weight_t.shape
    m = x.numel() // k if k else 0
    name = backends.select("rsparse_linear", x.device, backend, lambda b: _unsupported(b, m, x))
    if name == "reference" or m == 0 or k == 0 or n == 0:
        return reference.rsparse_linear(x, weight_t, col_norms, threshold, v, us_t, bias)
    x2 = x.reshape(m, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    col_norms = col_norms.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    with backends.device_guard(x.device):
        out = _RUNNERS[name](x2, weight_t, col_norms, float(threshold), v, us_t, bias)
    return out.reshape(*x.shape[:-1], n)


impl("rsparse_linear", _rsparse_linear)


@torch.library.register_fake("efficient_ops::rsparse_linear")
def _rsparse_linear_fake(x, weight_t, col_norms, threshold, v, us_t, bias, backend=None):
    _check(x, weight_t, col_norms, threshold, v, us_t, bias, values=False)
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


# The mask is piecewise constant in x, so dy/dx_i is W[:, i] for an active channel and the rank-r
# approximation's column for the others.

def _backward(ctx, grad):
    x, weight_t, col_norms, v, us_t = ctx.saved_tensors
    grads = [None] * 8
    if ctx.needs_input_grad[0]:
        g = grad.float()
        m = active_mask(x, col_norms, ctx.threshold)
        grads[0] = torch.where(m, g @ weight_t.float().T, (g @ us_t.float().T) @ v.float().T).to(grad.dtype)
    if ctx.needs_input_grad[6]:
        grads[6] = grad.reshape(-1, grad.shape[-1]).sum(0)
    return tuple(grads)


def _setup_context(ctx, inputs, output):
    x, weight_t, col_norms, threshold, v, us_t, bias, backend = inputs
    ctx.save_for_backward(x, weight_t, col_norms, v, us_t)
    ctx.threshold = threshold


torch.library.register_autograd("efficient_ops::rsparse_linear", _backward, setup_context=_setup_context)


def rsparse_linear(x: torch.Tensor, rw: RSparseWeights, bias: Optional[torch.Tensor] = None,
                   backend: Optional[str] = None) -> torch.Tensor:
    """R-Sparse linear: ``W (x * m) + U_r S_r V_r^T (x * (1 - m)) + bias`` with float32 accumulation.

    Args:
        x: ``[..., in]`` float16 or bfloat16 (float32/float64 on the reference backend), in ``rw``'s dtype
            and on its device. Each row gets its own mask ``m = |x| * rw.col_norms > rw.threshold``.
        rw: weights from :func:`efficient_ops.formats.rsparse.calibrate`.
        bias: optional ``[out]`` in x's dtype.
        backend: "cuda" (M <= 8 rows), "triton" or "reference"; default ``$EFFICIENT_OPS_BACKEND``, else the
            best available for x's device and M. A backend that cannot run the call raises.

    Returns:
        ``[..., out]`` in x's dtype.
    """
    if not isinstance(rw, RSparseWeights):
        raise TypeError(f"rw: expected RSparseWeights, got {type(rw).__name__}")
    if not isinstance(rw.threshold, (int, float)):  # the schema's float would reject it without naming it
        raise TypeError(f"threshold: expected a float, got {type(rw.threshold).__name__}")
    return torch.ops.efficient_ops.rsparse_linear(x, rw.weight_t, rw.col_norms, rw.threshold, rw.v, rw.us_t, bias,
                                                  backend)
