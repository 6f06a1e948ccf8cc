"""Shared pieces of the fuzz suite: tolerances, the relative-error check, the backends this machine can run,
and strategies for shapes and dtypes."""

import re

import pytest
import torch
from hypothesis import strategies as st

import efficient_ops as eo

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN or inf in ``out`` gives inf (NaN never passes)."""
    out, ref = out.double(), ref.double()
    if out.shape != ref.shape:
        return float("inf")
    if not torch.isfinite(out).all():
        return float("inf")
    if ref.numel() == 0:
        return 0.0
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(out, ref, dtype, factor=1.0, what=""):
    err = rel_err(out, ref)
    assert err <= TOL[dtype] * factor, f"{what}: relative error {err:.3g} > {TOL[dtype] * factor:.3g}"


def kernel_backends(device=None):
    """The kernel backends that run here: triton under the interpreter on the CPU; cuda and triton on a GPU."""
    device = device or torch.device("cpu")
    names = ("cuda", "triton") if device.type == "cuda" else ("triton",)
    return [b for b in names if eo.backends.device_status(b, device) is None]


def all_backends(device=None):
    return ["reference", *kernel_backends(device)]


def expect_clear_error(fn, arg: str, types=(TypeError, ValueError)):
    """``fn()`` must raise one of ``types`` whose message names ``arg`` (as a word)."""
    with pytest.raises(types) as info:
        fn()
    assert re.search(rf"(^|\W){re.escape(arg)}(\W|$)", str(info.value)), \
        f"error does not name {arg!r}: {type(info.value).__name__}: {info.value}"


def randn(shape, dtype, generator, scale=1.0):
    return (torch.randn(shape, generator=generator, dtype=torch.float32) * scale).to(dtype)


seeds = st.integers(0, 2 ** 31 - 1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# R-Sparse calibration's public name (the package layout is being reshaped; this is the one place that knows)
calibrate = eo.calibrate
