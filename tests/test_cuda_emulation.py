"""The CUDA GEMV without a GPU: its per-lane code emulated on the CPU under AddressSanitizer, and the
extension's host-side argument checks."""

import os
import subprocess

import pytest
import torch

from efficient_ops import backends

from conftest import nvcc_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(nvcc_path() is None, reason="nvcc not found")
def test_gemv_lane_code_emulated_under_asan(tmp_path):
    exe = tmp_path / "emulation"
    source = os.path.join(REPO, "csrc", "lowbit", "lowbit_gemv.cu")
    build = subprocess.run(
        [nvcc_path(), "-std=c++17", "-O1", "-g", "-arch=sm_80", "-Xcompiler=-fsanitize=address,-fsanitize=undefined",
         f'-DEO_SRC="{source}"', "-I" + os.path.dirname(source),
         os.path.join(REPO, "tests", "csrc", "lowbit_gemv_emulation.cu"), "-o", str(exe)],
        capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "UBSAN_OPTIONS": "halt_on_error=1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "emulation: 550 cases ok, 0 failed" in run.stdout


needs_extension = pytest.mark.skipif(backends.extension() is None, reason="efficient_ops._C is not built")
GOOD = dict(x_ptr=256, qweight_ptr=4096, scales_ptr=8192, zeros_ptr=12288, bias_ptr=0, out_ptr=16384, M=1, N=8,
            K=100, K_pad=128, group_size=32, x_row_stride=100, out_row_stride=8, x_dtype="float16",
            scale_dtype="bfloat16", stream=0)


@needs_extension
@pytest.mark.parametrize("change, match", [
    (dict(M=17), "M must be in 1..16"),
    (dict(M=0), "M must be in 1..16"),
    (dict(x_dtype="float32"), "x_dtype"),
    (dict(scale_dtype="int8"), "scale_dtype"),
    (dict(qweight_ptr=4100), "qweight"),
    (dict(K_pad=100), "K_pad"),
    (dict(group_size=48), "group_size"),
])
def test_extension_rejects_bad_arguments(change, match):
    with pytest.raises(ValueError, match=match):
        backends.extension().lowbit_gemv_w4(**{**GOOD, **change})


@needs_extension
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU launch error")
def test_extension_launch_without_gpu_raises():
    with pytest.raises(RuntimeError, match="CUDA launch failed"):
        backends.extension().lowbit_gemv_w4(**GOOD)
