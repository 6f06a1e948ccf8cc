"""bench/rsparse_quality.py on a tiny random Llama: the sparsity-0 row equals dense, every method and sparsity
gets a row with its layer statistics, and the dense model is left untouched (no model download, no GPU)."""

import math

import pytest
import torch

from conftest import tiny_llama

pytest.importorskip("transformers")

from efficient_ops.bench import rsparse_quality as rq  # noqa: E402


@pytest.fixture(scope="module")
def rows():
    model = tiny_llama()
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (4 * 16,))
    calib = [torch.randint(0, 128, (1, 16)) for _ in range(2)]
    return model, rq.measure(model, ids, calib, seq_len=16, sparsities=[0.5], progress=False)


def test_rows_and_sanity(rows):
    model, rows = rows
    assert [(r["method"], r["sparsity"]) for r in rows] == [
        ("dense", None), ("sanity (every channel)", 0.0), ("R-Sparse", 0.5), ("sparse only", 0.5)]
    dense, sanity = rows[0], rows[1]
    assert sanity["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-4)
    assert sanity["mean_alpha"] == 1.0 and sanity["mean_rank_fraction"] == 0.0
    assert sanity["active_fraction"] == 1.0 and sanity["read_fraction"] == pytest.approx(1.0)
    for r in rows[1:]:
        assert r["linears"] == 2 * 7 and len(r["layers"]) == 14 and math.isfinite(r["perplexity"])
        assert r["ratio_to_dense"] == pytest.approx(r["perplexity"] / dense["perplexity"])
        assert sum(r["alpha_counts"].values()) == 14 and r["calib_s"] > 0 and r["eval_s"] > 0
    rsparse, sparse_only = rows[2], rows[3]
    assert sparse_only["mean_alpha"] == 1.0 and sparse_only["mean_rank_fraction"] == 0.0
    assert rsparse["alpha"] == "searched" and 0.0 <= rsparse["mean_alpha"] <= 1.0
    # the threshold comes from other text, so the measured fraction is near, not at, the budget
    assert 0.2 < sparse_only["active_fraction"] < 0.8
    assert 0.0 < rsparse["read_fraction"] < 1.0
    # windows of 16 rows would run dense with the default max_sparse_rows=8: the rows must differ from dense
    assert abs(sparse_only["ratio_to_dense"] - 1) > 1e-3
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear  # the dense model is untouched


def test_table_and_files(rows, tmp_path):
    _, rows = rows
    table = rq._table(rows)
    assert table.count("\n") == len(rows) + 1
    assert "| dense | - |" in table and "| sparse only | 0.5 |" in table and "| 0/14 |" in table
    payload = {"rows": rows, "sanity": {"ratio_to_dense": 1.0, "ok": True}, "device": {"name": "cpu"},
               "model": {"dtype": "torch.float32", "linears_converted": 14, "skip": ["lm_head"]},
               "text": {"python": "3.11"}, "tokens_evaluated": 64, "seq_len": 16, "calib_windows": 2, "total_s": 6.0}
    folder = rq.write_results(payload, str(tmp_path))
    md = (tmp_path / "quality" / f"{rq.RESULT_NAME}.md").read_text()
    assert folder == str(tmp_path / "quality") and table in md and "(ok)" in md
    assert (tmp_path / "quality" / f"{rq.RESULT_NAME}.json").exists()
