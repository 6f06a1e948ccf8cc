"""The CUDA R-Sparse GEMV without a GPU: its block program emulated on the CPU under AddressSanitizer, and
the extension's host-side argument checks."""

import re

import pytest
import torch

from efficient_ops import backends

from conftest import build_emulation, run_emulation


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    """The emulation binary (built once per module)."""
    return build_emulation(tmp_path_factory, "rsparse")


def test_rsparse_block_program_emulated_under_asan(emulation):
    stdout = run_emulation(emulation)
    assert "host checks ok" in stdout
    assert "all 8 kernel variants and both load paths" in stdout
    assert "emulation: 439 cases ok, 0 failed" in stdout


def test_rsparse_layout_fills_the_gpu_on_llama_shapes(emulation):
    # Each role of the grid gets about 2 blocks per SM on the Llama-3-8B shapes at R = 2048 (one H100
    # has 132 SMs), and the tiles of role A read each weight_t element of an active row once.
    stdout = run_emulation(emulation, "--layout", timeout=60)
    rows = [line for line in stdout.splitlines() if line.startswith("sms=132") and " R=2048 " in line]
    assert len(rows) == 3
    for line in rows:
        blocks = [int(b) for b in re.findall(r"= (\d+)", line)]
        assert len(blocks) == 3 and min(blocks) >= 250, line


needs_extension = pytest.mark.skipif(backends.extension() is None, reason="efficient_ops._C is not built")
# Pointers only need to pass the alignment checks: without a GPU (or with the checks failing) nothing is
# dereferenced.
GOOD = dict(x_ptr=256, bias_ptr=0, out_ptr=512, M=1, K=100, N=64, R=16, x_row_stride=100, out_row_stride=64,
            weight_t_ptr=4096, col_norms_ptr=8192, threshold=0.5, v_ptr=12288, us_t_ptr=16384,
            workspace_ptr=20480, dtype="bfloat16", stream=0)


@needs_extension
@pytest.mark.parametrize("change, match", [
    (dict(M=0), "M must be in 1..8"),
    (dict(M=9), "M must be in 1..8"),
    (dict(K=-1), "K must be"),
    (dict(N=2 ** 30), "N must be"),
    (dict(R=-3), "R must be"),
    (dict(dtype="float32"), "dtype must be 'float16' or 'bfloat16'"),
    (dict(M=2, x_row_stride=99), "x_row_stride must be >= K"),
    (dict(x_row_stride=-1), "x_row_stride"),
    (dict(M=2, x_row_stride=100, out_row_stride=63), "out_row_stride must be >= N"),
    (dict(x_ptr=257), "2-byte aligned"),
    (dict(weight_t_ptr=4097), "2-byte aligned"),
    (dict(out_ptr=513), "2-byte aligned"),
    (dict(col_norms_ptr=8194), "col_norms must be 4-byte aligned"),
    (dict(workspace_ptr=20484), "workspace must be 16-byte aligned"),
    (dict(workspace_ptr=0), "out and workspace must not be null"),
    (dict(out_ptr=0), "out and workspace must not be null"),
    (dict(weight_t_ptr=0), "x, weight_t and col_norms must not be null"),
    (dict(col_norms_ptr=0), "x, weight_t and col_norms must not be null"),
    (dict(us_t_ptr=0), "us_t must not be null"),
    (dict(v_ptr=0), "v must not be null"),
    (dict(K=2 ** 30 - 1, N=2 ** 30 - 1), "too large"),
])
def test_extension_rejects_bad_arguments(change, match):
    with pytest.raises(ValueError, match="^rsparse_gemv: .*" + match):
        backends.extension().rsparse_gemv(**{**GOOD, **change})


@needs_extension
def test_extension_workspace_bytes():
    ext = backends.extension()
    # y [M, N] and z [M, R] float32, then 1 + N / 256 counters, each part rounded up to 256 bytes.
    assert ext.rsparse_workspace_bytes(M=1, N=4096, R=512) == 4 * 4096 + 4 * 512 + 256
    assert ext.rsparse_workspace_bytes(M=8, N=14336, R=0) == 4 * 8 * 14336 + 256
    assert ext.rsparse_workspace_bytes(M=3, N=7, R=5) == 256 + 256 + 256
    for bad in (dict(M=9, N=8, R=8), dict(M=-1, N=8, R=8), dict(M=1, N=-1, R=0), dict(M=1, N=8, R=-2)):
        with pytest.raises(ValueError, match="rsparse_workspace_bytes"):
            ext.rsparse_workspace_bytes(**bad)


no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU launch error")


@needs_extension
@no_gpu
@pytest.mark.parametrize("change", [
    dict(),
    dict(M=8, x_row_stride=128, out_row_stride=70, dtype="float16"),
    dict(R=0, v_ptr=0, us_t_ptr=0),                        # no low-rank branch: v and us_t may be null
    dict(K=0, x_ptr=0, weight_t_ptr=0, col_norms_ptr=0, v_ptr=0),  # K == 0: out = bias (+ 0 @ us_t)
    dict(threshold=float("-inf")),
    dict(threshold=float("nan")),
])
def test_extension_accepts_and_reaches_the_launch(change):
    # Arguments accepted: the call reaches the launch, which fails without a GPU.
    with pytest.raises(RuntimeError, match="rsparse_gemv: CUDA launch failed"):
        backends.extension().rsparse_gemv(**{**GOOD, **change})


@needs_extension
def test_extension_n_zero_launches_nothing():
    backends.extension().rsparse_gemv(**{**GOOD, "N": 0, "out_ptr": 0, "workspace_ptr": 0, "out_row_stride": 0})
