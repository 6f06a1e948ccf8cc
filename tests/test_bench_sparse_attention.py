"""bench/sparse_attention.py on the CPU: the quick run writes its results (reference backend, float32) with one row
per backend and case, and its derived columns (actual density, attended pairs, TFLOP/s, vs sdpa, vs flex, speedup,
GB/s) follow from the measured times and the mask by the documented formulas; the exact pair counts agree with a
brute-force count of the element mask; the kernel path (error check, failure handling) runs under the Triton
interpreter at a tiny shape; the err oracle's slice; the cuda preflight's plumbing; the targets tables."""

import json

import pytest
import torch

from efficient_ops import backends, cli
from efficient_ops.bench import sparse_attention as bench
from efficient_ops.reference.sparse_attention import element_mask
from efficient_ops import BlockSparseMask, block_sparse_attention, streaming, topk_blocks


def brute_force_pairs(mask: BlockSparseMask, batch: int, heads: int) -> int:
    allowed = element_mask(mask.kv_num_blocks, mask.kv_indices, mask.block_m, mask.block_n, mask.q_len, mask.kv_len,
                           mask.causal)
    return int(allowed.expand(batch, heads, -1, -1).sum())


def test_quick_cpu_run_writes_consistent_results(tmp_path):
    payload = bench.run(torch.device("cpu"), out_dir=str(tmp_path), quick=True)
    saved = json.loads((tmp_path / "cpu" / "sparse_attention.json").read_text())
    md = (tmp_path / "cpu" / "sparse_attention.md").read_text()
    assert saved["family"] == "sparse_attention" and saved["rows"] == json.loads(json.dumps(payload["rows"]))
    assert saved["decode_rows"] == json.loads(json.dumps(payload["decode_rows"]))
    assert "say nothing about GPU kernel speed" in saved["note"] and "say nothing about GPU kernel speed" in md
    assert "not compiled" in saved["note"] and saved["flex"] == "eager (not compiled)"
    assert saved["failed_backends"] == {} and saved["decode_failed_backends"] == {} and saved["skipped"] == []
    assert saved["targets"] == [] and saved["decode_targets"] == [] and saved["aborted"] is None
    hq, hkv, d = bench.CPU_HEADS
    b, blk = bench.GPU_BATCH, bench.CPU_BLOCK
    assert saved["heads"] == dict(Hq=hq, Hkv=hkv, D=d) and saved["block"] == blk

    rows = saved["rows"]
    cases = [(s, dn) for s in bench.CPU_LENGTHS for dn in bench.CPU_DENSITIES]
    assert [(r["S"], r["density"], r["backend"]) for r in rows] == [
        (s, dn, name) for s, dn in cases for name in ("reference", bench.FLEX, bench.SDPA)]
    assert md.count("| reference |") == len(cases) + 2 * len(bench.CPU_BUDGETS)  # prefill + decode rows
    assert md.count(f"| {bench.FLEX} |") == md.count(f"| {bench.SDPA} |") == len(cases)
    for r in rows:
        case = [x for x in rows if (x["S"], x["density"]) == (r["S"], r["density"])]
        sdpa = next(x for x in case if x["backend"] == bench.SDPA)
        flex = next(x for x in case if x["backend"] == bench.FLEX)
        s, mq = r["S"], r["S"] // blk
        assert r["dtype"] == "float32" and (r["B"], r["Hq"], r["Hkv"], r["D"]) == (b, hq, hkv, d)
        assert r["block_m"] == r["block_n"] == blk and r["sets"] == 1
        assert r["us"] > 0 and r["sdpa_us"] == sdpa["us"] and r["flex_us"] == flex["us"]
        assert r["vs sdpa"] == pytest.approx(sdpa["us"] / r["us"])
        assert r["vs flex"] == pytest.approx(flex["us"] / r["us"])
        # the mask: selected over reachable blocks, attended pairs at most the causal ones, >= the target density
        assert r["causal_pairs"] == s * (s + 1) // 2
        assert r["reachable_blocks"] == b * hq * mq * (mq + 1) // 2
        assert r["actual density"] == pytest.approx(r["selected_blocks"] / r["reachable_blocks"])
        assert r["density"] <= r["actual density"] <= 1
        assert r["attended_pairs"] == pytest.approx(r["attended_pairs_total"] / (b * hq))
        assert r["attended_pairs"] <= r["causal_pairs"]
        if r["density"] == 1.0:
            assert r["actual density"] == 1.0 and r["attended_pairs"] == r["causal_pairs"]
        pairs = r["causal_pairs"] if r["backend"] == bench.SDPA else r["attended_pairs"]
        assert r["flops"] == pytest.approx(4 * b * hq * pairs * d)
        assert r["achieved TFLOP/s"] == pytest.approx(r["flops"] / r["us"] / 1e6)
        assert r["dense-equiv TFLOP/s"] == pytest.approx(4 * b * hq * s * (s + 1) / 2 * d / r["us"] / 1e6)
        assert r["%matmul"] is None
        assert r["timing"] == ("cpu, not compiled" if r["backend"] == bench.FLEX else "cpu")
        if r["backend"] == bench.SDPA and r["density"] < 1:
            assert r["err"] is None  # dense SDPA computes something else
        else:  # float32 against the float32 reference
            assert r["err"] < 1e-5
    # the first length's masks, rebuilt from the run's seed: exact pair counts against brute force
    gen = torch.Generator().manual_seed(0)
    s = bench.CPU_LENGTHS[0]
    q, k = torch.randn(b, hq, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen)
    for density in bench.CPU_DENSITIES:
        r = next(x for x in rows if (x["S"], x["density"]) == (s, density))
        assert r["attended_pairs_total"] == brute_force_pairs(topk_blocks(q, k, density, blk, blk), b, hq)

    drows = saved["decode_rows"]
    dcases = [(bb, c, bg) for c in bench.CPU_CONTEXTS for bb in bench.CPU_DECODE_BATCHES for bg in bench.CPU_BUDGETS]
    assert [(r["B"], r["context"], r["budget"], r["backend"], r["step"]) for r in drows] == [
        (bb, c, bg, name, step) for bb, c, bg in dcases
        for name, step in (("reference", bench.DECODE), ("reference", bench.SELECT_DECODE), (bench.DENSE, "dense"))]
    for r in drows:
        dense = next(x for x in drows if (x["B"], x["context"], x["budget"], x["backend"]) ==
                     (r["B"], r["context"], r["budget"], bench.DENSE))
        bb, c, page = r["B"], r["context"], r["page_size"]
        assert page == bench.PAGE_SIZE and r["n_pages"] == c // page and r["dtype"] == "float32"
        assert r["us"] > 0 and r["dense_us"] == dense["us"] and r["speedup"] == pytest.approx(dense["us"] / r["us"])
        if r["backend"] == bench.DENSE:
            assert r["pages"] is None and r["err"] is None and r["sdpa_kernel"] is not None
            assert r["bytes"] == 2 * bb * hkv * c * d * 4
        else:
            assert r["pages"] == min(max(2, r["budget"] // page), c // page)
            assert r["tokens_read"] == r["pages"] * page  # full pages: seq_lens = context
            read = 2 * bb * hkv * r["tokens_read"] * d * 4
            summary = 2 * bb * hkv * r["n_pages"] * d * 4
            assert r["bytes"] == read + (summary if r["step"] == bench.SELECT_DECODE else 0)
            assert r["err"] < 1e-5
        assert r["GB/s"] == pytest.approx(r["bytes"] / r["us"] / 1e3)
        assert r["%copy"] is None and r["sets"] == 1
    assert "| reference | select+decode |" in md and "| dense decode | dense |" in md


def test_kernel_path_under_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    if backends.device_status("triton", torch.device("cpu")) is not None:
        pytest.skip("the Triton interpreter is not enabled (TRITON_INTERPRET=1)")
    payload = bench.run(torch.device("cpu"), out_dir=str(tmp_path), names=["triton", "cuda"], dtype=torch.float16,
                        lengths=[64], densities=[1.0, 0.5], block=32, contexts=[64], budgets=[32])
    rows, drows = payload["rows"], payload["decode_rows"]
    assert [(r["density"], r["backend"]) for r in rows] == [
        (dn, name) for dn in (1.0, 0.5) for name in ("triton", bench.FLEX, bench.SDPA)]
    for r in rows:
        assert r["dtype"] == "float16" and (r["err"] is None or r["err"] < 1e-2)
    assert rows[0]["err"] is not None and rows[0]["vs flex"] == pytest.approx(rows[1]["us"] / rows[0]["us"])
    assert [(r["backend"], r["step"]) for r in drows] == [
        ("triton", bench.DECODE), ("triton", bench.SELECT_DECODE), (bench.DENSE, "dense")]
    assert drows[0]["err"] < 1e-2 and drows[1]["err"] < 1e-2 and drows[0]["pages"] == 2
    # CPU tensors: cuda raises once per op and is not tried again
    assert "cuda" in payload["failed_backends"] and "cuda" in payload["decode_failed_backends"]
    md = (tmp_path / "cpu" / "sparse_attention.md").read_text()
    assert md.count("- cuda: ") == 2


@pytest.mark.parametrize("q_len, kv_len, block_m, block_n, causal", [
    (128, 128, 32, 32, True), (200, 200, 32, 64, True), (100, 300, 16, 64, True), (300, 100, 64, 16, True),
    (70, 90, 32, 16, False)])
def test_pair_counts_match_brute_force(q_len, kv_len, block_m, block_n, causal):
    gen = torch.Generator().manual_seed(q_len + kv_len)
    pairs = bench.block_pairs(q_len, kv_len, block_m, block_n, causal)
    mq, nk = -(-q_len // block_m), -(-kv_len // block_n)
    everything = BlockSparseMask.from_dense(torch.ones(1, 1, mq, nk, dtype=torch.bool), block_m, block_n, q_len,
                                            kv_len, causal)
    assert pairs.shape == (mq, nk) and int(pairs.sum()) == brute_force_pairs(everything, 1, 1)
    if causal and q_len == kv_len:
        assert int(pairs.sum()) == q_len * (q_len + 1) // 2
    for blocks in (torch.rand(2, 3, mq, nk, generator=gen) < 0.4, torch.rand(1, 3, mq, nk, generator=gen) < 0.6):
        mask = BlockSparseMask.from_dense(blocks, block_m, block_n, q_len, kv_len, causal)
        counts = bench.mask_counts(mask, 2, 3)
        assert counts["attended_pairs_total"] == brute_force_pairs(mask, 2, 3)
        reachable = (pairs > 0).expand(2, 3, -1, -1)
        assert counts["reachable_blocks"] == int(reachable.sum())
        assert counts["selected_blocks"] == int((blocks.expand(2, 3, -1, -1) & reachable).sum())
    mask = streaming(q_len, kv_len, sink=4, window=40, block_m=block_m, block_n=block_n, n_heads=3, dense_heads=[1])
    assert bench.mask_counts(mask, 2, 3)["attended_pairs_total"] == brute_force_pairs(mask, 2, 3)


def test_oracle_slice_matches_the_full_reference():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 200, 64, generator=gen) for h in (8, 2, 2))
    mask = topk_blocks(q, k, 0.4, 32, 32)
    full = block_sparse_attention(q, k, v, mask, backend="reference")
    start = (200 - 100) // 32 * 32
    q_slice, sub = bench._oracle_slice(q, mask, 2, start)
    part = block_sparse_attention(q_slice, k[:, :1], v[:, :1], sub, backend="reference")
    torch.testing.assert_close(part, full[:1, :2, start:], rtol=1e-6, atol=1e-6)


def test_cuda_preflight_reports_a_failure():
    """Without a GPU the preflight scripts fail at their first CUDA call, not on a templating mistake."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the preflight would run the kernels")
    reason = bench._preflight("paged_sparse_decode", torch.bfloat16, (32, 8, 128), 128, 16)
    assert reason and "exit 1" in reason
    assert not any(word in reason for word in ("SyntaxError", "NameError", "KeyError", "ImportError"))
    code = bench._PREFLIGHT["block_sparse_attention"].format(dtype="bfloat16", heads=(32, 8, 128), block=128, page=16)
    compile(code, "preflight", "exec")


def test_targets():
    def row(backend, s, density, vs_sdpa, vs_flex, err=None):
        return {"backend": backend, "S": s, "density": density, "vs sdpa": vs_sdpa, "vs flex": vs_flex, "err": err}

    rows = [row("cuda", 4096, 1.0, 0.95, 1.0), row("triton", 131072, 1.0, 0.85, 1.0),
            row("cuda", 32768, 0.1, 9.0, 1.5), row("cuda", 32768, 0.05, 16.0, 1.2), row("cuda", 16384, 0.3, 1.0, 1.3),
            row("cuda", 32768, 0.5, 1.8, None), row(bench.SDPA, 32768, 0.1, 1.0, 0.1),
            row(bench.FLEX, 32768, 0.1, 5.0, 1.0)]
    got = bench.check_targets(rows)
    assert [(g["backend"], g["S"], g["density"], g["target"], g["met"]) for g in got] == [
        ("cuda", 4096, 1.0, "vs sdpa >= 0.9", True), ("triton", 131072, 1.0, "vs sdpa >= 0.9", False),
        ("cuda", 32768, 0.1, "vs sdpa >= 8.5", True), ("cuda", 32768, 0.1, "vs flex >= 1.3", True),
        ("cuda", 32768, 0.05, "vs sdpa >= 17", False), ("cuda", 32768, 0.05, "vs flex >= 1.3", False),
        ("cuda", 16384, 0.3, "vs flex >= 1.3", True),
        ("cuda", 32768, 0.5, "vs sdpa >= 1.7", True), ("cuda", 32768, 0.5, "vs flex >= 1.3", False)]
    assert got[-1]["measured"] == "flex skipped"
    rows[2]["err"] = 0.5  # fast but wrong: missed
    assert [g["met"] for g in bench.check_targets(rows)[2:4]] == [False, False]

    def drow(backend, step, b, speedup, context=131072, budget=4096, err=None):
        return {"backend": backend, "step": step, "B": b, "context": context, "budget": budget, "speedup": speedup,
                "err": err}

    drows = [drow("cuda", bench.DECODE, 1, 12.0), drow("cuda", bench.SELECT_DECODE, 1, 9.0),
             drow("triton", bench.DECODE, 8, None), drow("triton", bench.DECODE, 8, 30.0, budget=1024),
             drow("cuda", bench.DECODE, 8, 30.0, context=32768), drow(bench.DENSE, "dense", 1, 1.0),
             drow("cuda", bench.DECODE, 8, 11.0, err=0.2)]
    got = bench.check_decode_targets(drows)
    assert [(g["backend"], g["step"], g["B"], g["met"]) for g in got] == [
        ("cuda", bench.DECODE, 1, True), ("cuda", bench.SELECT_DECODE, 1, False), ("triton", bench.DECODE, 8, False),
        ("cuda", bench.DECODE, 8, False)]
    assert got[2]["measured"] == "dense skipped" and got[0]["target"] == "speedup >= 10"


def test_cli_lists_the_family_and_its_ops():
    assert "sparse_attention" in cli.FAMILIES
    for op in ("block_sparse_attention", "paged_sparse_decode"):
        assert set(cli.OPS[op]) == set(backends.BACKENDS)
    assert set(cli.OPS["select_pages"]) == {"reference"}  # tensor code: info shows no kernel backend for it


def test_a_lost_cuda_context_writes_what_was_measured(tmp_path, monkeypatch):
    """After a failure that leaves the CUDA context unusable the run stops, writing its results and the reason."""
    def lost(device):
        raise bench._ContextLost("AcceleratorError: CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bench, "_after_failure", lost)
    payload = bench.run(torch.device("cpu"), out_dir=str(tmp_path), names=["cuda"], lengths=[64], densities=[1.0],
                        block=32, contexts=[64], budgets=[32])
    assert "illegal memory access" in payload["aborted"] and payload["rows"] == payload["decode_rows"] == []
    assert "cuda" in payload["failed_backends"]
    assert "ABORTED" in (tmp_path / "cpu" / "sparse_attention.md").read_text()
