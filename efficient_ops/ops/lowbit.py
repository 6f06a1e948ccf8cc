"""``efficient_ops::lowbit_gemm`` and ``lowbit_gemm_mixed``: ``y = x @ dequant(W).T (+ bias)`` on packed
low-bit weights (every format of :mod:`efficient_ops.formats.lowbit`; the mixed op is PTQ1.61's layout).
Reference: :mod:`efficient_ops.reference.lowbit`; kernels: ``triton_kernels/lowbit.py``, ``csrc/lowbit/``.

Backends: ``reference`` (any device), ``triton`` (CUDA; CPU under ``TRITON_INTERPRET=1``; every M),
``cuda`` (the compiled decode GEMV: M <= 16 rows, float16/bfloat16 x and scales). The mixed op runs
both packed parts in one launch on either kernel backend.
"""

from typing import Optional, Union

import torch

from .. import backends
from ..formats.lowbit import (MixedQuantizedWeight, QuantizedWeight, dequantize_mixed, dequantize_packed,
                              check_perm_values, effective_group_size, get_format, padded_in_features, validate_packed,
                              validate_perm)
from ..reference import lowbit as reference
from ._library import DTYPE_NAMES, check_bias, checking_values, impl, interpreter_unsupported, lib, stream

CUDA_MAX_M = 16
CUDA_MAX_K = 2 ** 20  # the GEMV's K_pad limit (chunk -> group index by a 32-bit multiply)
X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

lib.define("lowbit_gemm(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, float bits, "
           "int group_size, int in_features, str? backend=None) -> Tensor")
lib.define("lowbit_gemm_mixed(Tensor x, Tensor perm, Tensor qweight_a, Tensor scales_a, Tensor zeros_a, "
           "Tensor qweight_b, Tensor scales_b, Tensor zeros_b, Tensor? bias, float bits_a, int group_size_a, "
           "float bits_b, int group_size_b, int salient_features, str? backend=None) -> Tensor")


def _check_x_bias(x, bias, n, in_features):
    if not isinstance(x, torch.Tensor) or x.dtype not in X_DTYPES:
        raise TypeError(f"x: expected a float16, bfloat16 or float32 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x: last dimension must be in_features={in_features}, got shape {tuple(x.shape)}")
    check_bias(bias, n, x)


def _check(x, qweight, scales, zeros, bias, bits, group_size, in_features):
    _check_x_bias(x, None, 0, in_features)
    validate_packed(qweight, scales, zeros, bits, group_size, in_features)
    if qweight.device != x.device:
        raise ValueError(f"qweight: on {qweight.device}, but x is on {x.device}")
    _check_x_bias(x, bias, qweight.shape[0], in_features)


def _check_mixed(x, perm, qa, sa, za, qb, sb, zb, bias, bits_a, group_a, bits_b, group_b, salient_features,
                 values=True):
    in_features = perm.shape[0] if isinstance(perm, torch.Tensor) and perm.dim() == 1 else -1
    _check_x_bias(x, None, 0, in_features)
    validate_perm(perm, salient_features, in_features, x.device)
    if values and checking_values(perm):  # inside graph capture the kernels clamp perm[j] instead
        check_perm_values(perm)
    for suffix, (qw, s, z, bits, group, k) in (("_a", (qa, sa, za, bits_a, group_a, salient_features)),
                                               ("_b", (qb, sb, zb, bits_b, group_b, in_features - salient_features))):
        try:
            validate_packed(qw, s, z, bits, group, k)
        except (TypeError, ValueError) as exc:  # name the part: "qweight_b: ..."
            name, _, message = str(exc).partition(":")
            raise type(exc)(f"{name}{suffix}:{message}") from None
        if qw.device != x.device:
            raise ValueError(f"qweight{suffix}: on {qw.device}, but x is on {x.device}")
    if qb.shape[0] != qa.shape[0]:
        raise ValueError(f"qweight_b: {qb.shape[0]} rows, but qweight_a has {qa.shape[0]}")
    if sb.dtype != sa.dtype:
        raise TypeError(f"scales_b: dtype {sb.dtype} differs from scales_a dtype {sa.dtype}")
    _check_x_bias(x, bias, qa.shape[0], in_features)


def _unsupported(backend: str, m: int, x: torch.Tensor, scales: torch.Tensor, parts) -> Optional[str]:
    """Why ``backend`` cannot run this call (None if it can); ``parts``: (bits, in_features) per packed part."""
    if backend != "cuda":
        return interpreter_unsupported(backend, x, scales)
    if m > CUDA_MAX_M:
        return (f"the cuda backend of lowbit_gemm is the decode GEMV for M <= {CUDA_MAX_M} rows "
                f"(got M={m}); use backend='triton' for larger M")
    if any(padded_in_features(k, bits) > CUDA_MAX_K for bits, k in parts):
        return f"the cuda backend supports in_features <= {CUDA_MAX_K}"
    if x.dtype not in DTYPE_NAMES or scales.dtype not in DTYPE_NAMES:
        return f"the cuda backend needs float16/bfloat16 x and scales (got {x.dtype} and {scales.dtype})"
    return None


def _run_cuda(x2, segments, bias, perm):
    m, n = x2.shape[0], segments[0][0].shape[0]
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    parts = []
    for qweight, scales, zeros, fmt_name, _, group, k in segments:
        parts += [fmt_name, qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), k, group]
    mixed = dict(perm_ptr=perm.data_ptr(), **dict(zip(("fmt_b", "qweight_b_ptr", "scales_b_ptr", "zeros_b_ptr",
                                                       "k_b", "group_b"), parts[6:]))) if perm is not None else {}
    backends.extension().lowbit_gemv(
        x2.data_ptr(), 0 if bias is None else bias.data_ptr(), out.data_ptr(), m, n, x2.stride(0), out.stride(0),
        DTYPE_NAMES[x2.dtype], DTYPE_NAMES[segments[0][1].dtype],
        stream(x2), *parts[:6], **mixed)
    return out


def _run_triton(x2, segments, bias, perm):
    from ..triton_kernels import lowbit as kernels  # imported on first use: Triton is optional
    return kernels.lowbit_gemm(x2, segments, bias, perm)


_RUNNERS = {"cuda": _run_cuda, "triton": _run_triton}


def _dispatch(x, segments, bias, perm, backend, run_reference):
    """Pick the backend, then run the reference or a kernel on x flattened to [M, K]."""
    in_features = x.shape[-1]
    m = x.numel() // in_features if in_features else 0
    parts = [(bits, k) for _, _, _, bits, _, k in segments]
    name = backends.select("lowbit_gemm", x.device, backend,
                           lambda b: _unsupported(b, m, x, segments[0][1], parts))
    if name == "reference" or m == 0:
        return run_reference()
    x2 = x.reshape(m, in_features)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    # what the kernels need of each format: its name, K padded, and the columns per scale
    segments = [(q, s, z, get_format(bits).name, padded_in_features(k, bits), effective_group_size(g, k, bits), k)
                for q, s, z, bits, g, k in segments]
    with backends.device_guard(x.device):
        out = _RUNNERS[name](x2, segments, bias, perm)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _lowbit_gemm(x, qweight, scales, zeros, bias, bits, group_size, in_features, backend=None):
    _check(x, qweight, scales, zeros, bias, bits, group_size, in_features)
    return _dispatch(x, [(qweight, scales, zeros, bits, group_size, in_features)], bias, None, backend,
                     lambda: reference.lowbit_gemm(x, qweight, scales, zeros, bias, bits, group_size, in_features))


def _lowbit_gemm_mixed(x, perm, qa, sa, za, qb, sb, zb, bias, bits_a, group_a, bits_b, group_b, salient_features,
                       backend=None):
    args = (x, perm, qa, sa, za, qb, sb, zb, bias, bits_a, group_a, bits_b, group_b, salient_features)
    _check_mixed(*args)
    segments = [(qa, sa, za, bits_a, group_a, salient_features),
                (qb, sb, zb, bits_b, group_b, perm.shape[0] - salient_features)]
    return _dispatch(x, segments, bias, perm, backend, lambda: reference.lowbit_gemm_mixed(*args))


impl("lowbit_gemm", _lowbit_gemm)
impl("lowbit_gemm_mixed", _lowbit_gemm_mixed)


@torch.library.register_fake("efficient_ops::lowbit_gemm")
def _lowbit_gemm_fake(x, qweight, scales, zeros, bias, bits, group_size, in_features, backend=None):
    _check(x, qweight, scales, zeros, bias, bits, group_size, in_features)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.register_fake("efficient_ops::lowbit_gemm_mixed")
def _lowbit_gemm_mixed_fake(x, perm, qa, sa, za, qb, sb, zb, bias, bits_a, group_a, bits_b, group_b,
                            salient_features, backend=None):
    _check_mixed(x, perm, qa, sa, za, qb, sb, zb, bias, bits_a, group_a, bits_b, group_b, salient_features,
                 values=False)
    return x.new_empty((*x.shape[:-1], qa.shape[0]))


# Inference is the target; the gradient w.r.t. x and bias lets quantized layers sit inside models that
# are fine-tuned around them (the packed weights themselves are frozen).

def _grads(ctx, grad, w, bias_index, n_inputs):
    grads = [None] * n_inputs
    if ctx.needs_input_grad[0]:
        grads[0] = (grad.float() @ w()).to(grad.dtype)
    if ctx.needs_input_grad[bias_index]:
        grads[bias_index] = grad.reshape(-1, grad.shape[-1]).sum(0)
    return tuple(grads)


def _backward(ctx, grad):
    qweight, scales, zeros = ctx.saved_tensors
    return _grads(ctx, grad, lambda: dequantize_packed(qweight, scales, zeros, ctx.bits, ctx.group_size,
                                                       ctx.in_features), 4, 9)


def _setup_context(ctx, inputs, output):
    x, qweight, scales, zeros, bias, bits, group_size, in_features, backend = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.bits, ctx.group_size, ctx.in_features = bits, group_size, in_features


def _backward_mixed(ctx, grad):
    perm, qa, sa, za, qb, sb, zb = ctx.saved_tensors
    return _grads(ctx, grad, lambda: dequantize_mixed(perm, qa, sa, za, ctx.bits_a, ctx.group_a, qb, sb, zb,
                                                      ctx.bits_b, ctx.group_b, ctx.salient_features), 8, 15)


def _setup_context_mixed(ctx, inputs, output):
    x, perm, qa, sa, za, qb, sb, zb, bias, bits_a, group_a, bits_b, group_b, salient_features, backend = inputs
    ctx.save_for_backward(perm, qa, sa, za, qb, sb, zb)
    ctx.bits_a, ctx.group_a, ctx.bits_b, ctx.group_b = bits_a, group_a, bits_b, group_b
    ctx.salient_features = salient_features


torch.library.register_autograd("efficient_ops::lowbit_gemm", _backward, setup_context=_setup_context)
torch.library.register_autograd("efficient_ops::lowbit_gemm_mixed", _backward_mixed,
                                setup_context=_setup_context_mixed)


def lowbit_linear(x: torch.Tensor, qw: Union[QuantizedWeight, MixedQuantizedWeight],
                  bias: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """``x @ dequantize_weight(qw).T + bias`` with float32 accumulation.

    Args:
        x: ``[..., K]`` float16 or bfloat16 (float32 on the triton and reference backends).
        qw: a packed weight from :func:`efficient_ops.quantize_weight` (any bit width) or
            :func:`efficient_ops.quantize_weight_mixed` (run as one fused launch), on x's device.
        bias: optional ``[N]`` in x's dtype.
        backend: "cuda", "triton" or "reference"; default ``$EFFICIENT_OPS_BACKEND``, else the best
            available for x's device. A backend that cannot run the call raises, never falls back.

    Returns:
        ``[..., N]`` in x's dtype.
    """
    if isinstance(qw, MixedQuantizedWeight):
        a, b = qw.salient, qw.rest
        return torch.ops.efficient_ops.lowbit_gemm_mixed(x, qw.perm, a.qweight, a.scales, a.zeros, b.qweight,
                                                         b.scales, b.zeros, bias, a.bits, a.group_size, b.bits,
                                                         b.group_size, a.in_features, backend)
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw: expected a QuantizedWeight or MixedQuantizedWeight, got {type(qw).__name__}")
    return torch.ops.efficient_ops.lowbit_gemm(x, qw.qweight, qw.scales, qw.zeros, bias, qw.bits,
                                               qw.group_size, qw.in_features, backend)
