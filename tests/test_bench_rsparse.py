"""bench/rsparse.py on the CPU: the quick run writes its results (reference backend, float32), the fractions and
byte counts it reports are consistent, and the kernel path (error check, rotation, failure handling) runs
under the Triton interpreter at a tiny shape."""

import json

import pytest
import torch

from efficient_ops.bench import rsparse as bench


def test_quick_cpu_run_writes_results(tmp_path):
    payload = bench.run(torch.device("cpu"), out_dir=str(tmp_path), quick=True)
    saved = json.loads((tmp_path / "cpu" / "rsparse-quick.json").read_text())
    md = (tmp_path / "cpu" / "rsparse-quick.md").read_text()
    assert saved["family"] == "rsparse" and saved["rows"] == json.loads(json.dumps(payload["rows"]))
    assert "say nothing about GPU kernel speed" in saved["note"] and "say nothing about GPU kernel speed" in md
    rows = saved["rows"]
    k, n = bench.CPU_SHAPES[0]
    # every (M, sparsity, alpha) case once; sparsity 0 only with alpha 1
    assert sorted((r["M"], r["sparsity"], r["alpha"]) for r in rows) == sorted(
        (m, s, a) for m in bench.CPU_MS for s in (0.0, 0.5, 0.9) for a in bench.ALPHAS if s > 0 or a == 1.0)
    assert md.count("| reference |") == len(rows)
    for r in rows:
        assert r["backend"] == "reference" and r["K"] == k and r["N"] == n and r["dtype"] == "float32"
        assert r["us"] > 0 and r["dense_us"] > 0 and r["speedup"] == pytest.approx(r["dense_us"] / r["us"])
        assert r["vs ideal"] == pytest.approx(r["dense_us"] * (1 - r["sparsity"]) / r["us"])
        assert r["%copy"] is None and r["err"] is None
        channels, rank = bench.budget(k, n, r["sparsity"], r["alpha"])
        assert r["rank"] == rank and r["channels"] == channels
        # the threshold keeps the budgeted channels per row; the union of M rows is at least that
        assert r["active"] == pytest.approx(channels / k, abs=2 / k)
        assert r["active"] - 1e-9 <= r["union"] <= 1.0
        if r["M"] == 1:
            assert r["union"] == pytest.approx(r["active"])
            assert r["bytes"] == pytest.approx(
                round(r["union"] * k) * n * 4 + (k - round(r["union"] * k)) * rank * 4 + rank * n * 4 + k * 4
                + (k + n) * 4)
    assert saved["targets"] == [] and saved["failed_backends"] == {}


def test_kernel_path_under_the_interpreter(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from efficient_ops import backends
    if backends.device_status("triton", torch.device("cpu")) is not None:
        pytest.skip("the Triton interpreter is not enabled (TRITON_INTERPRET=1)")
    payload = bench.run(torch.device("cpu"), out_dir=str(tmp_path), shapes=[(96, 80)], ms=[2], sparsities=[0.5],
                        names=["triton", "cuda"], dtype=torch.float16)
    rows = payload["rows"]
    assert {r["backend"] for r in rows} == {"triton"} and len(rows) == 2
    assert all(r["err"] < 1e-2 for r in rows)
    assert "cuda" in payload["failed_backends"]  # CPU tensors: it raises once and is not tried again
    assert "cuda: " in (tmp_path / "cpu" / "rsparse.md").read_text()


def test_targets_one_row_per_backend_shape_and_alpha():
    rows = [dict(backend=b, alpha=a, sparsity=s, M=m, K=4096, N=4096, speedup=sp)
            for b, a, s, m, sp in [("cuda", 1.0, 0.5, 1, 1.9), ("triton", 1.0, 0.5, 1, 1.5),
                                   ("cuda", 0.5, 0.5, 1, 1.85), ("cuda", 1.0, 0.5, 2, 3.0), ("cuda", 1.0, 0.7, 1, 3.0)]]
    got = bench.check_targets(rows)
    assert [(t["backend"], t["alpha"], t["met"]) for t in got] == [("cuda", 1.0, True), ("triton", 1.0, False),
                                                                    ("cuda", 0.5, True)]
    rows[0]["err"] = 0.5  # fast but wrong: missed
    assert not bench.check_targets(rows)[0]["met"]
