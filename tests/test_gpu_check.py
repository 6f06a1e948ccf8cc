"""bench/gpu_check.sh without a GPU: its syntax, and a dry run proving the stages are wired, each is time-boxed
(a hanging stage is ended and the later stages still run), and the results land in one folder with a summary."""

import json
import os
import shutil
import subprocess

import pytest
from conftest import REPO

SCRIPT = os.path.join(REPO, "bench", "gpu_check.sh")
STAGES = ["dry_checks", "info", "build", "ext_info", "pytest", "sanitize_cuda", "sanitize_triton", "bench_lowbit",
          "bench_rsparse", "bench_speculative", "bench_sparse_attention", "bench_tempo"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def test_syntax():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_dry_run(tmp_path):
    env = {**os.environ, "GPU_CHECK_DRY": "1", "GPU_CHECK_DRY_HANG": "pytest", "GPU_CHECK_T_PYTEST": "2",
           "GPU_CHECK_SKIP": "bench_speculative"}
    run = subprocess.run(["bash", SCRIPT, str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["stages"]}
    assert list(status) == STAGES
    assert status.pop("pytest") == "timeout" and status.pop("bench_speculative") == "skipped"
    assert set(status.values()) == {"ok"}, status  # dry_checks ran the real drivers' --list / --help
    assert summary["dry_run"] is True and summary["arch"]
    for stage in STAGES:
        assert (tmp_path / "out" / "logs" / f"{stage}.log").is_file() or stage == "bench_speculative"
    assert "| pytest | timeout |" in (tmp_path / "out" / "summary.md").read_text()
    assert "lowbit_gemv" in (tmp_path / "out" / "logs" / "dry_checks.log").read_text()
