"""Plumbing shared by every op family: the library handle, impl registration, the value-check switch,
kernel dtypes and names, the launch stream and SM count, and the argument checks common to several ops.

All ops live in the ``efficient_ops`` namespace of ``torch.ops``. They are defined with
``torch.library.Library`` and Python impls for the CPU and CUDA dispatch keys, which costs a few
microseconds less per call than ``torch.library.custom_op``: several of these ops run per token.
"""

import torch

lib = torch.library.Library("efficient_ops", "DEF")

# dtypes the Triton and CUDA kernels take, and the names the CUDA bindings know them by
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def impl(name: str, fn) -> None:
    """Register ``fn`` as the CPU and CUDA implementation of ``efficient_ops::name``."""
    lib.impl(name, fn, "CPU")
    lib.impl(name, fn, "CUDA")


def checking_values(t: torch.Tensor) -> bool:
    """Whether data-dependent checks may run: they synchronise, which CUDA-graph capture forbids."""
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def interpreter_unsupported(backend: str, *tensors: torch.Tensor) -> "str | None":
    """Why ``backend`` cannot run bfloat16 here: the Triton interpreter (CPU tensors) computes bfloat16 ``tl.dot``
    and int->bfloat16 casts wrongly, so it is refused rather than returning garbage. None when it can run."""
    if backend == "triton" and any(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors):
        return ("the triton backend cannot run bfloat16 under the Triton interpreter (CPU tensors): it computes "
                "bfloat16 dots wrongly; use float16, or bfloat16 on a GPU")
    return None


def check_finite_scale(scale) -> None:
    """An explicit softmax ``scale`` must be a finite number."""
    if scale is not None and not (isinstance(scale, (int, float)) and abs(float(scale)) < float("inf")):
        raise ValueError(f"scale: expected a finite number or None, got {scale!r}")


def stream(t: torch.Tensor) -> int:
    """The raw handle of the current CUDA stream on ``t``'s device (what the bindings launch on)."""
    return torch.cuda.current_stream(t.device).cuda_stream


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (how many programs fill it)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def check_bias(bias, n: int, x: torch.Tensor) -> None:
    """An optional ``bias`` must be ``[n]``, in x's dtype, on x's device."""
    if bias is None:
        return
    if bias.shape != (n,):
        raise ValueError(f"bias: expected shape [{n}], got {tuple(bias.shape)}")
    if bias.dtype != x.dtype:
        raise TypeError(f"bias: dtype {bias.dtype} differs from x dtype {x.dtype}")
    if bias.device != x.device:
        raise ValueError(f"bias: on {bias.device}, but x is on {x.device}")
