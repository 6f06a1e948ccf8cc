"""The CUDA GEMV without a GPU: its per-warp code emulated on the CPU under AddressSanitizer, and the
extension's host-side argument checks."""

import pytest
import torch

from efficient_ops import backends
from efficient_ops.formats import lowbit

from conftest import build_emulation, run_emulation


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    """The emulation binary (built once per module)."""
    return build_emulation(tmp_path_factory, "lowbit")


def test_gemv_lane_code_emulated_under_asan(emulation):
    stdout = run_emulation(emulation)
    assert "emulation: 1777 cases ok, 0 failed" in stdout


def test_emulation_packer_matches_pack_levels(emulation):
    # The emulation packs levels with its own code, written from the format specification; here it
    # must agree with the Python packer, so that the two cannot share a misreading with the kernel.
    stdout = run_emulation(emulation, "--pack", timeout=60)
    bits = {"w4": 4, "w3": 3, "w2": 2, "ternary": 1.58, "w1": 1}
    lines = stdout.split("\n")[:len(bits)]
    for line in lines:
        name, *words = line.split()
        fmt = lowbit.get_format(bits[name])
        k = torch.arange(2 * fmt.k_align)
        q = ((7 * k + k // 5 + 3) % fmt.levels).reshape(1, -1)
        expected = lowbit.pack_levels(q, bits[name]).view(-1).tolist()
        assert [w - (1 << 32) if w >= 1 << 31 else w for w in map(int, words)] == expected, name


needs_extension = pytest.mark.skipif(backends.extension() is None, reason="efficient_ops._C is not built")
# Pointers only need to pass the alignment checks: without a GPU (or with the checks failing) nothing
# is dereferenced.
GOOD = dict(x_ptr=256, bias_ptr=0, out_ptr=16384, M=1, N=8, x_row_stride=100, out_row_stride=8,
            x_dtype="float16", scale_dtype="bfloat16", stream=0,
            fmt_a="w4", qweight_a_ptr=4096, scales_a_ptr=8192, zeros_a_ptr=12288, k_a=100, group_a=32)
MIXED = dict(GOOD, x_row_stride=400, perm_ptr=20480, fmt_b="w1", qweight_b_ptr=24576, scales_b_ptr=28672,
             zeros_b_ptr=32768, k_b=300, group_b=384)
FORMATS = ("w4", "w3", "w2", "ternary", "w1")


@needs_extension
@pytest.mark.parametrize("base, change, match", [
    (GOOD, dict(M=17), "M must be in 1..16"),
    (GOOD, dict(M=0), "M must be in 1..16"),
    (GOOD, dict(x_dtype="float32"), "x_dtype"),
    (GOOD, dict(scale_dtype="int8"), "scale_dtype"),
    (GOOD, dict(fmt_a="w5"), "fmt_a must be one of"),
    (GOOD, dict(fmt_a=""), "fmt_a must be one of"),
    (GOOD, dict(qweight_a_ptr=4100), "qweight_a must be 16-byte aligned"),
    (GOOD, dict(scales_a_ptr=8193), "scales_a and zeros_a must be 2-byte aligned"),
    (GOOD, dict(qweight_a_ptr=0), "must not be null"),
    (GOOD, dict(k_a=-1), "k_a"),
    (GOOD, dict(k_a=2 ** 20 + 1), "k_a"),
    (GOOD, dict(fmt_a="ternary", k_a=2 ** 20 - 10), "k_a"),  # pads past 2^20 (160-column blocks)
    (GOOD, dict(group_a=48), "group_a must be a multiple of 32"),
    (GOOD, dict(group_a=0), "group_a"),
    (GOOD, dict(N=2 ** 31), "N must be"),
    (GOOD, dict(x_row_stride=-1), "x_row_stride"),
    (GOOD, dict(M=2, out_row_stride=4), "out_row_stride"),
    (GOOD, dict(x_ptr=257), "2-byte aligned"),
    (GOOD, dict(fmt_b="w1", qweight_b_ptr=24576, scales_b_ptr=28672, zeros_b_ptr=32768, k_b=300, group_b=384),
     "needs perm"),
    (GOOD, dict(k_b=300), "need fmt_b"),
    (GOOD, dict(qweight_b_ptr=24576), "need fmt_b"),
    (MIXED, dict(fmt_b="w5"), "fmt_b must be one of"),
    (MIXED, dict(perm_ptr=20482), "perm must be 4-byte aligned"),
    (MIXED, dict(qweight_b_ptr=24580), "qweight_b must be 16-byte aligned"),
    (MIXED, dict(group_b=100), "group_b must be a multiple of 32"),
    (MIXED, dict(k_b=-5), "k_b"),
    (MIXED, dict(zeros_b_ptr=0), "qweight_b, scales_b and zeros_b must not be null"),
    (MIXED, dict(M=3, x_row_stride=2 ** 30), "x_row_stride"),
])
def test_extension_rejects_bad_arguments(base, change, match):
    with pytest.raises(ValueError, match=match):
        backends.extension().lowbit_gemv(**{**base, **change})


no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU launch error")


@needs_extension
@no_gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_extension_launch_without_gpu_raises(fmt):
    # Arguments accepted: the call reaches the launch, which fails without a GPU.
    with pytest.raises(RuntimeError, match="CUDA launch failed"):
        backends.extension().lowbit_gemv(**{**GOOD, "fmt_a": fmt})


@needs_extension
@no_gpu
@pytest.mark.parametrize("fmt_a", FORMATS)
@pytest.mark.parametrize("fmt_b", FORMATS)
def test_extension_accepts_every_mixed_pair(fmt_a, fmt_b):
    with pytest.raises(RuntimeError, match="CUDA launch failed"):
        backends.extension().lowbit_gemv(**{**MIXED, "fmt_a": fmt_a, "fmt_b": fmt_b})


@needs_extension
@no_gpu
def test_extension_accepts_perm_with_one_segment():
    with pytest.raises(RuntimeError, match="CUDA launch failed"):
        backends.extension().lowbit_gemv(**{**GOOD, "perm_ptr": 20480})
