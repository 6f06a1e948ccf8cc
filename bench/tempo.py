"""Tempo benchmark: the packing and relevance kernels against the PyTorch code they replace, and the
pipeline (compressor throughput, LLM time to first token) at several budgets against uniform allocation.

Kernels (GB/s = bytes the op must move / time):

- ``pack_segments`` with timestamps vs Tempo's per-segment ``torch.cat([stamp[:l], feat[:k]])`` chain
  (counts already on the host for the baseline, as in Tempo): reads and writes ``total * d`` elements;
- ``segment_relevance`` vs ``sigmoid(h.float() @ (w_yes - w_no).float())``: reads ``n * d`` elements.

Pipeline: random models (tiny on the CPU; Qwen3-VL-2B / Qwen3-4B layer shapes with few layers on a GPU,
saying so), a generated scene video as a frame tensor; TTFT = prefill of the packed context + first token.
Results: ``<out_dir>/<device>/tempo.{json,md}``.

    efficient-ops bench --family tempo [--quick]
"""

from __future__ import annotations

import time
from typing import List

import torch
from tqdm.auto import tqdm

import efficient_ops
from efficient_ops.pipelines.tempo import QwenVLCompressor, TempoLLM, TempoPipeline
from efficient_ops.pipelines.tempo.demo import scene_frames, tiny_qwen3, tiny_qwen3_vl, tiny_tokenizer

from . import common

GPU_SEGMENTS, GPU_DIMS, CPU_SEGMENTS, CPU_DIMS = (128, 512, 1024), (2048, 2560), (16, 64), (256,)
K, STAMP_LEN = 128, 6


def _kernel_rows(device, dtype, segments, dims, names) -> List[dict]:
    rows = []
    es = torch.finfo(dtype).bits // 8
    gen = torch.Generator(device=device).manual_seed(0)
    for n in segments:
        for d in dims:
            feats = torch.randn(n, K, d, generator=gen, device=device, dtype=dtype)
            counts = torch.randint(4, K + 1, (n,), generator=gen, device=device)
            stamps = torch.randn(n, STAMP_LEN, d, generator=gen, device=device, dtype=dtype)
            lens = torch.randint(4, STAMP_LEN + 1, (n,), generator=gen, device=device)
            c_host, l_host = counts.tolist(), lens.tolist()
            total = sum(c_host) + sum(l_host)

            def baseline():
                return torch.cat([t for i in range(n) for t in (stamps[i, :l_host[i]], feats[i, :c_host[i]])])

            want = baseline()
            base_us = common.time_eager([baseline], device, reps=20)
            moved = 2 * total * d * es
            rows.append(dict(op="pack_segments", impl="torch.cat per segment", n=n, d=d, us=base_us,
                             gbps=moved / base_us / 1e3, speedup=1.0))
            for name in names:
                packed, _ = efficient_ops.pack_segments(feats, counts, stamps, lens, backend=name)
                assert torch.equal(packed, want), f"pack_segments[{name}] differs from the torch.cat baseline"
                us = common.time_eager([lambda: efficient_ops.pack_segments(feats, counts, stamps, lens,
                                                                            backend=name)], device, reps=20)
                rows.append(dict(op="pack_segments", impl=name, n=n, d=d, us=us, gbps=moved / us / 1e3,
                                 speedup=base_us / us))
            h = torch.randn(n, d, generator=gen, device=device, dtype=dtype) / d ** 0.5
            wy, wn = torch.randn(2, d, generator=gen, device=device, dtype=dtype)

            def gemv():
                return torch.sigmoid(h.float() @ (wy.float() - wn.float()))

            ref = gemv()
            base_us = common.time_eager([gemv], device, reps=20)
            moved = (n * d + 2 * d) * es + 4 * n
            rows.append(dict(op="segment_relevance", impl="torch fp32 GEMV + sigmoid", n=n, d=d, us=base_us,
                             gbps=moved / base_us / 1e3, speedup=1.0))
            for name in names:
                err = common.rel_err(efficient_ops.segment_relevance(h, wy, wn, backend=name), ref)
                assert err < 1e-3, f"segment_relevance[{name}] relative error {err}"
                us = common.time_eager([lambda: efficient_ops.segment_relevance(h, wy, wn, backend=name)], device,
                                       reps=20)
                rows.append(dict(op="segment_relevance", impl=name, n=n, d=d, us=us, gbps=moved / us / 1e3,
                                 speedup=base_us / us))
    return rows


def _models(device, gpu: bool):
    tok = tiny_tokenizer()
    if gpu:  # Qwen3-VL-2B text width / Qwen3-4B layer shapes, 2 layers each: per-layer cost is real, depth is not
        vlm, llm, k = tiny_qwen3_vl(tok, hidden=2048, layers=2), tiny_qwen3(tok, hidden=2560, layers=2, head_dim=128), K
        dtype = torch.bfloat16
    else:
        vlm, llm, k = tiny_qwen3_vl(tok), tiny_qwen3(tok), 16
        dtype = torch.float32
    comp = QwenVLCompressor.from_vlm(vlm.to(device, dtype), tok, output_size=llm.config.hidden_size,
                                     num_memory_tokens=k)
    return TempoPipeline(comp, TempoLLM(llm.to(device, dtype), tok)), k


def _pipeline_rows(device, gpu: bool, quick: bool) -> List[dict]:
    pipe, k = _models(device, gpu)
    seconds = 256 if gpu else 64  # 2 fps, 8-frame segments: 64 or 16 segments
    video = scene_frames([("green", seconds * 0.4), ("red", seconds * 0.1), ("blue", seconds * 0.5)], fps=2.0)
    budgets = (4096, 8192) if gpu else (64, 128)
    if quick:
        budgets = budgets[:1]
    rows = []
    for budget in tqdm(budgets, desc="tempo pipeline", unit="budget"):
        for method in ("tempo", "uniform"):
            for attention in ("dense", "block_sparse"):
                start = time.perf_counter()
                a = pipe(video, "Which scene is red?", budget=budget, fps=2.0, method=method, attention=attention,
                         max_new_tokens=1)
                wall = time.perf_counter() - start
                n = len(a.allocation)
                rows.append(dict(budget=budget, method=method, attention=attention, segments=n, K=k,
                                 visual_tokens=a.visual_tokens_used, context=a.context_tokens,
                                 compress_seg_per_s=n / a.timings["compress_s"], ttft_ms=a.ttft_s * 1e3,
                                 wall_s=wall))
    return rows


def run(device: torch.device, out_dir: str = "bench/results", quick: bool = False) -> dict:
    """Benchmark Tempo's kernels and pipeline on ``device``; write ``<out_dir>/<device>/tempo.{json,md}``."""
    gpu = device.type == "cuda"
    note = ("" if gpu else "No CUDA GPU: kernels on the reference backend (plain PyTorch) at small sizes in float32 "
            "against the torch.cat / GEMV baselines, and the pipeline with tiny random models (K=16, budgets 64/128). "
            "These numbers show the paths run and what the baselines cost here; they say nothing about GPU kernels.")
    info, peaks = common.start_run(device, note)
    dtype = torch.bfloat16 if gpu else torch.float32
    names = ["triton"] if gpu else ["reference"]
    segments, dims = (GPU_SEGMENTS, GPU_DIMS) if gpu else (CPU_SEGMENTS, CPU_DIMS)
    if quick:
        segments, dims = segments[:2], dims[:1]
    kernels = _kernel_rows(device, dtype, segments, dims, names)
    pipeline = _pipeline_rows(device, gpu, quick)
    payload = {"device": info, "peaks": peaks, "note": note, "dtype": str(dtype), "K": K, "kernels": kernels,
               "pipeline": pipeline}
    table = (common.markdown_table(kernels, ["op", "impl", "n", "d", "us", "gbps", "speedup"]) + "\n\n" +
             common.markdown_table(pipeline, ["budget", "method", "attention", "segments", "K", "visual_tokens",
                                              "context", "compress_seg_per_s", "ttft_ms", "wall_s"]))
    stem = common.write_results(out_dir, "tempo", payload, table, quick=quick)
    print(table)
    print(f"results: {stem}.json, {stem}.md")
    return payload
