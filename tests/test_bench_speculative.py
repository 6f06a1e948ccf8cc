"""bench/speculative.py on the CPU: the quick run writes its results (reference backend, float32) with one row
per backend and case, and its derived columns (GB/s, vs floor, vs sdpa, TFLOP/s, compact_kv GB/s) follow from the
measured times by the documented formulas; the kernel path (error check, failure handling, compact_kv exactness)
runs under the Triton interpreter at a tiny shape; the draft trees are valid and fixed; the targets table."""

import json

import pytest
import torch

from efficient_ops.bench import speculative as bench
from efficient_ops import tree_depths, tree_mask, validate_parents


def test_quick_cpu_run_writes_consistent_results(tmp_path):
    payload = bench.run(torch.device("cpu"), out_dir=str(tmp_path), quick=True)
    saved = json.loads((tmp_path / "cpu" / "speculative.json").read_text())
    md = (tmp_path / "cpu" / "speculative.md").read_text()
    assert saved["family"] == "speculative" and saved["rows"] == json.loads(json.dumps(payload["rows"]))
    assert "say nothing about GPU kernel speed" in saved["note"] and "say nothing about GPU kernel speed" in md
    assert saved["failed_backends"] == {} and saved["skipped"] == [] and saved["targets"] == []
    hq, hkv, d = bench.CPU_HEADS
    assert saved["heads"] == dict(Hq=hq, Hkv=hkv, D=d)
    rows = saved["rows"]
    cases = [(b, t, p) for t in bench.CPU_TREES for p in bench.CPU_PREFIXES for b in bench.CPU_BATCHES]
    # one row per case for the reference and each baseline
    assert sorted((r["B"], r["T"], r["prefix"], r["backend"]) for r in rows) == sorted(
        (b, t, p, name) for b, t, p in cases for name in ("reference", bench.SDPA, bench.FLOOR))
    # the main table's rows, plus one compact_kv row for the reference
    assert md.count("| reference |") == len(cases) + 1 and md.count(f"| {bench.SDPA} |") == len(cases)
    for r in rows:
        case = [x for x in rows if (x["B"], x["T"], x["prefix"]) == (r["B"], r["T"], r["prefix"])]
        floor = next(x for x in case if x["backend"] == bench.FLOOR)
        sdpa = next(x for x in case if x["backend"] == bench.SDPA)
        tree = saved["trees"][str(r["T"])]
        assert r["dtype"] == "float32" and r["Hq"] == hq and r["Hkv"] == hkv and r["D"] == d
        assert r["depth"] == tree["depth"] and r["mean_tree_keys"] == pytest.approx(tree["mean_tree_keys"])
        assert r["us"] > 0 and r["floor_us"] == floor["us"] and r["sdpa_us"] == sdpa["us"]
        assert r["vs floor"] == pytest.approx(r["us"] / floor["us"])
        assert r["vs sdpa"] == pytest.approx(sdpa["us"] / r["us"])
        assert r["bytes"] == 2 * r["B"] * hkv * r["prefix"] * d * 4
        assert r["GB/s"] == pytest.approx(r["bytes"] / r["us"] / 1e3)
        tree_keys = 1 if r["backend"] == bench.FLOOR else r["T"]
        prefix_and_tree = r["prefix"] + (0 if r["backend"] == bench.FLOOR else tree["mean_tree_keys"])
        assert r["flops"] == pytest.approx(4 * r["B"] * hq * tree_keys * prefix_and_tree * d)
        assert r["TFLOP/s"] == pytest.approx(r["flops"] / r["us"] / 1e6)
        assert r["%copy"] is None and r["sets"] == 1
        if r["backend"] == bench.FLOOR:
            assert r["err"] is None and r["vs floor"] == 1.0
        else:  # float32 against float32 SDPA
            assert r["err"] < 1e-5
    for t in bench.CPU_TREES:
        tree = saved["trees"][str(t)]
        parents = torch.tensor(tree["parents"])
        assert tree["parents"] == bench.draft_tree(t) and tree["depth"] == int(tree_depths(parents).max())
        assert tree["mean_tree_keys"] == pytest.approx(tree_mask(parents).sum().item() / t)
    (crow,) = saved["compact_rows"]
    n_layers, (b,), (chkv, cd) = bench.CPU_COMPACT
    accept = len(bench.COMPACT_PATH) - 1
    assert (crow["backend"], crow["L"], crow["B"], crow["Hkv"], crow["D"]) == ("reference", n_layers, b, chkv, cd)
    assert crow["exact"] and crow["accept_len"] == accept == 4
    assert crow["bytes"] == 2 * n_layers * b * chkv * accept * cd * 4 * 2
    assert crow["GB/s"] == pytest.approx(crow["bytes"] / crow["us"] / 1e3)
    assert "compact_kv" in md and "| reference | 2 | 1 |" in md


def test_kernel_path_under_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    from efficient_ops import backends
    if backends.device_status("triton", torch.device("cpu")) is not None:
        pytest.skip("the Triton interpreter is not enabled (TRITON_INTERPRET=1)")
    payload = bench.run(torch.device("cpu"), out_dir=str(tmp_path), cases=[(2, 8, 70)], names=["triton", "cuda"],
                        dtype=torch.float16)
    rows = payload["rows"]
    assert [r["backend"] for r in rows] == ["triton", bench.SDPA, bench.FLOOR]
    assert rows[0]["err"] < 1e-2 and rows[0]["dtype"] == "float16"
    assert rows[0]["vs floor"] == pytest.approx(rows[0]["us"] / rows[2]["us"])
    # CPU tensors: cuda raises once and is not tried again, for both ops
    assert "cuda" in payload["failed_backends"] and "cuda" in payload["compact_failed_backends"]
    assert "cuda: " in (tmp_path / "cpu" / "speculative.md").read_text()
    assert [(r["backend"], r["exact"]) for r in payload["compact_rows"]] == [("triton", True), ("reference", True)]


@pytest.mark.parametrize("t", [1, 2, 3, 4, 16, 64, 128, 256])
def test_draft_trees_are_valid_fixed_and_shallow(t):
    parents = bench.draft_tree(t)
    assert parents == bench.draft_tree(t) and len(parents) == t
    validate_parents(torch.tensor(parents))
    depth = int(tree_depths(torch.tensor(parents)).max())
    assert depth == (0 if t == 1 else min(t - 1, max(1, (t - 1).bit_length())))  # ceil(log2 t) levels


def test_targets_two_rows_per_backend_and_batch():
    def row(backend, b, vf, vs, prefix=32768, t=64, err=None):
        return {"backend": backend, "B": b, "T": t, "prefix": prefix, "vs floor": vf, "vs sdpa": vs, "err": err}

    rows = [row("cuda", 1, 1.1, 4.0), row("triton", 1, 1.2, 3.5), row("cuda", 8, 1.15, None),
            row(bench.SDPA, 1, 9.0, 1.0), row(bench.FLOOR, 1, 1.0, 9.0), row("cuda", 1, 1.0, 9.0, prefix=4096),
            row("cuda", 1, 1.0, 9.0, t=16)]
    got = bench.check_targets(rows)
    assert [(g["backend"], g["B"], g["target"].split()[1], g["met"]) for g in got] == [
        ("cuda", 1, "floor", True), ("cuda", 1, "sdpa", True), ("triton", 1, "floor", False),
        ("triton", 1, "sdpa", True), ("cuda", 8, "floor", True), ("cuda", 8, "sdpa", False)]
    assert got[-1]["measured"] == "sdpa skipped"
    rows[0]["err"] = 0.5  # fast but wrong: missed
    assert not any(g["met"] for g in bench.check_targets(rows)[:2])
