"""The ``efficient-ops`` command as a user meets it: readable GPU and extension lines in ``info``, where ``bench``
writes, and what a quick run's result files record."""

import json
import sys
import types

import pytest

from efficient_ops import backends, cli

pynvml = pytest.importorskip("pynvml")


@pytest.mark.parametrize("code, words", [
    ("NVML_ERROR_LIBRARY_NOT_FOUND", "no NVIDIA driver is installed"),
    ("NVML_ERROR_DRIVER_NOT_LOADED", "not loaded"),
    ("NVML_ERROR_UNKNOWN", "could not be queried"),
])
def test_gpu_line_is_a_sentence(monkeypatch, code, words):
    def fail():
        raise pynvml.NVMLError(getattr(pynvml, code))
    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    line = cli._gpu_line()
    assert line.startswith("GPU: none found: ") and words in line and "NVMLError" not in line


def test_extension_line_gives_the_install_time_reason(monkeypatch):
    reason = "not built: nvcc was not found at install time (looked in CUDA_HOME=/opt/cuda, which has no bin/nvcc)"
    monkeypatch.setattr(backends, "extension", lambda: None)
    monkeypatch.setattr(cli, "_skip_note", lambda: reason)
    assert cli._extension_line() == f"extension: not available: {reason}"
    monkeypatch.setattr(cli, "_skip_note", lambda: None)  # no record (e.g. a source checkout): the import error
    assert cli._extension_line() == f"extension: not available: {backends.extension_status()}"


def test_info_lines(capsys):
    cli.main(["info"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("efficient_ops ") and lines[1].startswith("torch ")
    assert lines[2].startswith("GPU: ") and lines[3].startswith("extension: ")
    assert "lowbit_gemm:" in lines and all(f"{op}:" in lines for op in cli.OPS)


@pytest.fixture
def fake_family(monkeypatch):
    """``efficient_ops.bench.lowbit`` replaced by a module that records where it was asked to write."""
    calls = []
    module = types.SimpleNamespace(run=lambda device, out_dir, quick: calls.append((out_dir, quick)))
    monkeypatch.setitem(sys.modules, "efficient_ops.bench.lowbit", module)
    return calls


def test_bench_out_default_is_absolute_and_independent_of_cwd(monkeypatch, tmp_path, fake_family):
    monkeypatch.delenv(cli.RESULTS_ENV, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    cli.main(["bench", "--family", "lowbit"])
    assert fake_family == [(str(tmp_path / "data" / "efficient_ops" / "bench"), False)]
    monkeypatch.delenv("XDG_DATA_HOME")
    assert cli.default_out() == (cli.Path.home() / ".local" / "share" / "efficient_ops" / "bench").resolve()
    monkeypatch.setenv(cli.RESULTS_ENV, str(tmp_path / "mine"))
    assert cli.default_out() == tmp_path / "mine"


def test_bench_relative_out_becomes_absolute(monkeypatch, tmp_path, fake_family):
    monkeypatch.chdir(tmp_path)
    cli.main(["bench", "--family", "lowbit", "--quick", "--out", "results"])
    assert fake_family == [(str(tmp_path / "results"), True)]


def test_quick_results_record_the_run(tmp_path):
    import torch

    from efficient_ops.bench import lowbit

    lowbit.run(torch.device("cpu"), out_dir=str(tmp_path), quick=True, formats=["w4-g128"])
    assert not (tmp_path / "cpu" / "lowbit.json").exists()  # a quick run never overwrites a full one
    payload = json.loads((tmp_path / "cpu" / "lowbit-quick.json").read_text())
    run = payload["run"]
    assert run["mode"] == "quick" and run["efficient_ops"] == payload["device"]["efficient_ops"]
    assert run["commit"] is None or len(run["commit"].removesuffix("+dirty")) == 40
    assert payload["device"]["torch"] and "triton" in payload["device"]
    assert payload["rows"]
    for row in payload["rows"]:
        assert row["us_reps"] == row["f_linear_us_reps"] > 1
        assert row["us_p10"] <= row["us"] <= row["us_p90"]
    assert "(quick run)" in (tmp_path / "cpu" / "lowbit-quick.md").read_text()


def test_timing_is_the_median_with_its_spread():
    from efficient_ops.bench.common import Timing

    t = Timing([5.0, 1.0, 3.0, 2.0, 4.0])
    assert t == 3.0 and t.reps == 5 and t.p10 == pytest.approx(1.4) and t.p90 == pytest.approx(4.6)
    assert type(t * 2) is float  # call sites compute with it as a plain float
