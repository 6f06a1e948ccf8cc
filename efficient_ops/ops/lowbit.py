"""``efficient_ops::lowbit_gemm``: ``y = x @ dequant(Wq).T (+ bias)`` on packed low-bit weights.

Backends: ``reference`` (any device), ``triton`` (CUDA; CPU under ``TRITON_INTERPRET=1``;
every M), ``cuda`` (the compiled decode GEMV: M <= 16 rows, float16/bfloat16 x and scales).
"""

from typing import Optional

import torch

from .. import backends
from ..quant.lowbit import QuantizedWeight, _dequantize, effective_group_size, padded_in_features, validate_packed
from ..reference import lowbit as reference
from . import lib

CUDA_MAX_M = 16
CUDA_MAX_K = 2 ** 20  # the GEMV's K_pad limit (chunk -> group index by a 32-bit multiply)
X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}

lib.define("lowbit_gemm(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, int bits, "
           "int group_size, int in_features, str? backend=None) -> Tensor")


def _check(x, qweight, scales, zeros, bias, bits, group_size, in_features):
    if x.dtype not in X_DTYPES:
        raise TypeError(f"x: expected float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x: last dimension must be in_features={in_features}, got shape {tuple(x.shape)}")
    validate_packed(qweight, scales, zeros, bits, group_size, in_features)
    if qweight.device != x.device:
        raise ValueError(f"qweight: on {qweight.device}, but x is on {x.device}")
    if bias is not None:
        if bias.shape != (qweight.shape[0],):
            raise ValueError(f"bias: expected shape [{qweight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias: dtype {bias.dtype} differs from x dtype {x.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias: on {bias.device}, but x is on {x.device}")


def _unsupported(backend: str, m: int, x: torch.Tensor, scales: torch.Tensor, in_features: int) -> Optional[str]:
    if backend != "cuda":
        return None
    if m > CUDA_MAX_M:
        return (f"the cuda backend of lowbit_gemm is the decode GEMV for M <= {CUDA_MAX_M} rows "
                f"(got M={m}); use backend='triton' for larger M")
    if in_features > CUDA_MAX_K:
        return f"the cuda backend supports in_features <= {CUDA_MAX_K} (got {in_features})"
    if x.dtype not in _DTYPE_NAMES or scales.dtype not in _DTYPE_NAMES:
        return f"the cuda backend needs float16/bfloat16 x and scales (got {x.dtype} and {scales.dtype})"
    return None


def _run_cuda(x2, qweight, scales, zeros, bias, group, in_features):
    m, n = x2.shape[0], qweight.shape[0]
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    backends.extension().lowbit_gemv_w4(
        x2.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
        0 if bias is None else bias.data_ptr(), out.data_ptr(), m, n, in_features,
        padded_in_features(in_features), group, x2.stride(0), out.stride(0),
        _DTYPE_NAMES[x2.dtype], _DTYPE_NAMES[scales.dtype], torch.cuda.current_stream(x2.device).cuda_stream)
    return out


def _run_triton(x2, qweight, scales, zeros, bias, group, in_features):
    from ..triton_kernels import lowbit as kernels  # imported on first use: Triton is optional
    return kernels.lowbit_gemm(x2, qweight, scales, zeros, bias, group, in_features)


_RUNNERS = {"cuda": _run_cuda, "triton": _run_triton}


def _lowbit_gemm(x, qweight, scales, zeros, bias, bits, group_size, in_features, backend=None):
    _check(x, qweight, scales, zeros, bias, bits, group_size, in_features)
    m = x.numel() // in_features
    name = backends.select("lowbit_gemm", x.device, backend, lambda b: _unsupported(b, m, x, scales, in_features))
    if name == "reference" or m == 0:
        return reference.lowbit_gemm(x, qweight, scales, zeros, bias, bits, group_size, in_features)
    x2 = x.reshape(m, in_features)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    with backends.device_guard(x.device):
        out = _RUNNERS[name](x2, qweight, scales, zeros, bias,
                             effective_group_size(group_size, in_features), in_features)
    return out.reshape(*x.shape[:-1], qweight.shape[0])


lib.impl("lowbit_gemm", _lowbit_gemm, "CPU")
lib.impl("lowbit_gemm", _lowbit_gemm, "CUDA")


@torch.library.register_fake("efficient_ops::lowbit_gemm")
def _lowbit_gemm_fake(x, qweight, scales, zeros, bias, bits, group_size, in_features, backend=None):
    _check(x, qweight, scales, zeros, bias, bits, group_size, in_features)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _backward(ctx, grad):
    # Inference is the target; the gradient w.r.t. x and bias lets quantized layers sit inside
    # models that are fine-tuned around them (the packed weight itself is frozen).
    qweight, scales, zeros = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = _dequantize(qweight, scales, zeros, ctx.group_size, ctx.in_features)
        grad_x = (grad.float() @ w).to(grad.dtype)
    if ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, None, grad_bias, None, None, None, None


def _setup_context(ctx, inputs, output):
    x, qweight, scales, zeros, bias, bits, group_size, in_features, backend = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.group_size, ctx.in_features = group_size, in_features


torch.library.register_autograd("efficient_ops::lowbit_gemm", _backward, setup_context=_setup_context)


def lowbit_linear(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                  backend: Optional[str] = None) -> torch.Tensor:
    """``x @ dequantize_weight(qw).T + bias`` with float32 accumulation.

    Args:
        x: ``[..., K]`` float16 or bfloat16 (float32 on the triton and reference backends).
        qw: the packed weight from :func:`efficient_ops.quant.quantize_weight`, on x's device.
        bias: optional ``[N]`` in x's dtype.
        backend: "cuda", "triton" or "reference"; default ``$EFFICIENT_OPS_BACKEND``, else the best
            available for x's device. A backend that cannot run the call raises, never falls back.

    Returns:
        ``[..., N]`` in x's dtype.
    """
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw: expected a QuantizedWeight, got {type(qw).__name__}")
    return torch.ops.efficient_ops.lowbit_gemm(x, qw.qweight, qw.scales, qw.zeros, bias, qw.bits,
                                               qw.group_size, qw.in_features, backend)
