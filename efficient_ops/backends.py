"""Backend availability and selection.

Every op runs on one of three backends:

- ``cuda``: the compiled extension ``efficient_ops._C`` (CUDA tensors only),
- ``triton``: the kernels in ``efficient_ops.triton_kernels`` (CUDA tensors, or CPU
  tensors under the Triton interpreter, ``TRITON_INTERPRET=1``),
- ``reference``: plain PyTorch (any device), the executable specification.

The choice, in order of precedence: the per-call ``backend=`` argument, the
``EFFICIENT_OPS_BACKEND`` environment variable, the best backend available for
the tensors' device (``cuda`` > ``triton`` > ``reference`` on a GPU;
``reference`` on the CPU). A backend that was asked for but cannot run the call
raises :class:`BackendUnavailableError` with the reason; nothing falls back
silently.

Nothing here touches a GPU at import time; the extension and Triton are imported
lazily, once, on first use.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from typing import Callable, Optional

import torch

BACKENDS = ("cuda", "triton", "reference")
ENV_VAR = "EFFICIENT_OPS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """Raised when the requested backend cannot run the call."""


@functools.lru_cache(maxsize=None)
def _import(name: str):
    """Import ``name`` once; return ``(module, None)`` or ``(None, reason)``."""
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return None, f"{name} failed to import: {type(exc).__name__}: {exc}"


def extension():
    """The compiled ``efficient_ops._C`` module, or None when it is not built."""
    return _import("efficient_ops._C")[0]


def extension_status() -> Optional[str]:
    """None when the CUDA extension imports, else why it does not."""
    module, reason = _import("efficient_ops._C")
    if module is None:
        return ("the CUDA extension efficient_ops._C is not built (install with nvcc on PATH, "
                f"or EFFICIENT_OPS_BUILD_CUDA=1 to see why it failed): {reason}")
    return None


def triton_status() -> Optional[str]:
    """None when Triton imports, else why it does not."""
    reason = _import("triton")[1]
    return None if reason is None else f"Triton is not installed or broken: {reason}"


def interpreter_enabled() -> bool:
    """Whether Triton kernels run under the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _arch_status(device_index: int) -> Optional[str]:
    major, minor = torch.cuda.get_device_capability(device_index)
    archs = extension().build_info()["archs"]
    # "90a": sm_90a machine code, runs only on 9.0. "100f": the 10.x family from 10.0 up.
    # Plain "80": sm_80 machine code plus compute_80 PTX, which the driver JIT-compiles for any newer GPU.
    cc = major * 10 + minor
    for arch in archs:
        num = int(arch.rstrip("af"))
        if arch.endswith("a") and num == cc:
            return None
        if arch.endswith("f") and num // 10 == major and num <= cc:
            return None
        if arch.isdigit() and num <= cc:
            return None
    return (f"efficient_ops._C was built for sm_{', sm_'.join(archs)}, which cannot run on this "
            f"GPU (sm_{major}{minor}); rebuild with EFFICIENT_OPS_CUDA_ARCHS={major}{minor}")


def device_status(backend: str, device: torch.device) -> Optional[str]:
    """None when ``backend`` can run on ``device`` at all, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "triton":
        reason = triton_status()
        if reason:
            return reason
        if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
            return None
        if device.type == "cpu":
            return "the triton backend runs on CPU tensors only under the interpreter (set TRITON_INTERPRET=1)"
        return f"the triton backend does not support {device.type} tensors"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors (got {device.type} tensors)"
        reason = extension_status()
        if reason:
            return reason
        return _arch_status(device.index if device.index is not None else torch.cuda.current_device())
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def select(op: str, device: torch.device, requested: Optional[str],
           unsupported: Callable[[str], Optional[str]]) -> str:
    """Pick the backend for one call of ``op``.

    ``requested`` is the per-call ``backend=`` argument (None or "" for no
    preference). ``unsupported(backend)`` returns None when the op's
    ``backend`` implementation can handle this call's arguments (shapes,
    dtypes), else the reason it cannot.
    """
    if not requested:
        requested = os.environ.get(ENV_VAR) or None
        source = f"{ENV_VAR}={requested}"
    else:
        source = f"backend={requested!r}"
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"{source}: backend must be one of {BACKENDS}")
        reason = device_status(requested, device) or unsupported(requested)
        if reason:
            raise BackendUnavailableError(f"{op}: {source} is unavailable: {reason}")
        return requested
    candidates = ("cuda", "triton", "reference") if device.type == "cuda" else ("reference",)
    for backend in candidates:
        if device_status(backend, device) is None and unsupported(backend) is None:
            return backend
    raise BackendUnavailableError(f"{op}: no backend can run this call on {device}")


def device_guard(device: torch.device):
    """Make ``device`` current for a kernel launch when it is a CUDA device other than the current one."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()
