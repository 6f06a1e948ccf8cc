"""Sparse-attention benchmark: block-sparse prefill against SDPA-flash and FlexAttention, and page-selecting
sparse decode against dense decode.

**Prefill** (first table). Every available kernel backend of ``block_sparse_attention`` is measured against
dense causal SDPA (flash) and against FlexAttention with the same block mask, in the same run.

- Cases (GPU): B = 1, Hq = 32 query heads, Hkv = 8 KV heads, head_dim D = 128, bfloat16 unless ``--dtype
  float16``; causal, Sq = Skv = S in 4K, 16K, 32K, 128K; ``block_m = block_n = 128`` (``--block``); target
  densities d in 1.0, 0.5, 0.3, 0.1, 0.05. The mask is ``topk_blocks(q, k, d, block, block, causal=True)`` on
  the case's random q and k, built outside the timed region. ``actual density`` = selected blocks / causally
  reachable blocks (it is at least d: ``ceil`` per query block, and the diagonal block is always kept).
  ``attended_pairs`` is counted exactly from the mask (:func:`block_pairs`, :func:`mask_counts`): per query
  block, the sum over its selected KV blocks of the causally visible (query, key) pairs, from ``to_dense()``
  with tensor ops; it is the mean over batch rows and query heads (``attended_pairs_total`` is the sum).
- Rows per case: each kernel backend; ``flex``: ``torch.compile(flex_attention)`` (``dynamic=False``,
  compiled once per shape) with ``mask.to_flex()`` and ``enable_gqa=True`` (a failure, e.g. a compile error,
  is recorded as skipped with the reason); ``sdpa-flash``: ``F.scaled_dot_product_attention(q, k, v,
  is_causal=True, enable_gqa=True)`` under ``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``, dense, so it is
  measured once per length and repeated in every case of that length.
- Columns: ``us`` (median microseconds per call), ``sdpa_us``, ``vs sdpa = sdpa_us / us``, ``flex_us``,
  ``vs flex = flex_us / us``, ``dense-equiv TFLOP/s = 4 * B * Hq * causal_pairs * D / time`` with
  ``causal_pairs = S * (S + 1) / 2`` (the work dense causal attention does: one number for every row of a
  case), ``achieved TFLOP/s = 4 * B * Hq * attended_pairs * D / time`` (the work the sparse call does; for
  ``sdpa-flash``, which computes every causal pair, ``attended_pairs = causal_pairs``) and ``err``.
- ``err``: relative error (Frobenius) against the **reference backend** in float32 on a slice small enough
  for memory: batch row 0, the first ``min(2, Hq / Hkv)`` query heads (all on KV head 0), and the last
  1024 queries (from a multiple of block_m), with the correspondingly sliced mask. The same oracle serves
  the kernels, flex, and sdpa-flash at density 1.0 (where the mask is dense causal); sdpa-flash at d < 1
  computes something else and has no ``err``. An ``err`` above :data:`MAX_ERR` flags the row as wrong.
- Targets (:data:`PREFILL_TARGETS`, benchmark goals on H100, not tests), per kernel backend: at density 1.0,
  ``vs sdpa >= 0.9`` at every length; at density d < 1 and S = 32K, ``vs sdpa >= 0.85 / d``; at every
  density < 1 and length, ``vs flex >= 1.3``.

**Decode** (second table). B in 1, 8; Hq 32, Hkv 8, D 128; contexts 32K and 128K (``seq_lens = context``
for every row, ``S_max = context``); page size 16 (``--page-size 64``); token budgets 1K, 2K, 4K, 8K.

- Rows per case: per kernel backend, ``decode``: ``paged_sparse_decode`` over the pages ``select_pages``
  chose (selection precomputed outside the timed region), and ``select+decode``: ``select_pages`` plus
  ``paged_sparse_decode`` timed together as one graph (the backend's full step; the page summary is built
  outside). Baseline ``dense decode``: ``F.scaled_dot_product_attention(q[:, :, None], k, v,
  enable_gqa=True)`` over the whole context, torch's choice of kernel (``sdpa_kernel``, from
  ``torch._fused_sdp_choice``), measured once per (B, context) and repeated in each budget's case.
- Columns: ``pages`` (selected per KV head, ``max(2, budget // page_size)``), ``us``, ``dense_us``,
  ``speedup = dense_us / us``, ``GB/s`` on the bytes the call reads: ``2 * B * Hkv * tokens_read * D *
  element_size`` with ``tokens_read`` the valid positions in the selected pages (the mean per batch row and
  KV head; ``context`` for dense decode); ``select+decode`` adds the summary's kmin/kmax, ``2 * B * Hkv *
  n_pages * D * element_size``; ``%copy`` of the copy bandwidth measured in the same run; ``err`` against the
  reference backend in float32 on batch row 0 and the first two KV heads (their query heads).
- Target (:data:`DECODE_TARGETS`): context 128K, budget 4K: ``speedup >= 10`` for ``decode`` and
  ``select+decode``, per kernel backend and batch size.

**Timing** (:mod:`bench.common`): CUDA-graph replay of one call per input set, median over replays, per
call. Prefill input sets (q, k, v) rotate through more than twice the L2 size where one set is smaller (at
S = 4K; from 16K on one set is larger). Decode rotates over sets with their own caches, summaries and
queries so that the bytes one call actually reads (the selected pages, 4 MiB at B = 1 with a 1K budget)
exceed twice the L2 size; the number of sets is capped by :data:`DECODE_MEM_FRACTION` of the free memory and
written with each row (``sets``). A backend that raises (e.g. ``BackendUnavailableError`` when the CUDA
extension lacks the kernel) is recorded in ``failed_backends`` (prefill) or ``decode_failed_backends`` with
the reason and not tried again; the run goes on. Out of memory skips the row only. Before the run, the cuda
backend runs each op once at a small shape in a subprocess, so that a kernel that corrupts the CUDA context
(an illegal address) is recorded as failed instead of ending the run; if the context is lost during the run
anyway, the results so far are written with ``aborted`` set. The reference backend, when asked for on a GPU
(``--backend reference``), is timed eagerly with CUDA events (``timing: eager``) and is skipped where its
dense ``[S, S]`` mask does not fit.

**Without a GPU**: the reference backend only (pass ``--backend triton --dtype float16`` with
``TRITON_INTERPRET=1`` to run the Triton path under the interpreter) at tiny shapes: B 1, Hq 4, Hkv 2, D 64,
S in 128, 256, block 32, densities 1.0, 0.3; decode context 256, budgets 64, 128, page 16; float32. Flex runs
eagerly there (not compiled: it materialises the scores). Those numbers prove the path end to end; they say
nothing about GPU kernel speed.

Run: ``efficient-ops bench --family sparse_attention`` (or ``python -m efficient_ops.bench.sparse_attention
[--quick] [--dtype float16] [--backend NAME ...] [--block N] [--page-size 64] [--no-prefill] [--no-decode]``).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
import types
import warnings
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from efficient_ops import backends
from efficient_ops import (BlockSparseMask, PageSummary, block_sparse_attention, paged_sparse_decode, select_pages,
                           topk_blocks)

from . import common

GPU_LENGTHS = [4096, 16384, 32768, 131072]
GPU_DENSITIES = [1.0, 0.5, 0.3, 0.1, 0.05]
GPU_HEADS = (32, 8, 128)  # Hq, Hkv, D
GPU_BLOCK = 128
GPU_BATCH = 1
CPU_LENGTHS = [128, 256]
CPU_DENSITIES = [1.0, 0.3]
CPU_HEADS = (4, 2, 64)
CPU_BLOCK = 32

GPU_DECODE_BATCHES = [1, 8]
GPU_CONTEXTS = [32768, 131072]
GPU_BUDGETS = [1024, 2048, 4096, 8192]
CPU_DECODE_BATCHES = [1]
CPU_CONTEXTS = [256]
CPU_BUDGETS = [64, 128]
PAGE_SIZE = 16

# The sparse-attention issue's goals on H100, per kernel backend (benchmark goals, not tests).
PREFILL_TARGETS = dict(dense_min_vs_sdpa=0.9, sparse_length=32768, sparse_sdpa_factor=0.85, min_vs_flex=1.3)
DECODE_TARGETS = [dict(context=131072, budget=4096, min_speedup=10.0)]
MAX_ERR = 1e-2  # relative error against the float32 reference above which a row is flagged wrong
ERR_HEADS, ERR_QUERIES, ERR_KV_HEADS = 2, 1024, 2  # the slices the err oracles run on
DECODE_MEM_FRACTION = 0.5  # decode rotation sets may take at most this share of the free GPU memory

SDPA, FLEX, DENSE = "sdpa-flash", "flex", "dense decode"
DECODE, SELECT_DECODE = "decode", "select+decode"
COLUMNS = ["backend", "S", "density", "actual density", "us", "sdpa_us", "vs sdpa", "flex_us", "vs flex",
           "dense-equiv TFLOP/s", "achieved TFLOP/s", "err", "timing"]
DECODE_COLUMNS = ["backend", "step", "B", "context", "budget", "pages", "us", "dense_us", "speedup", "GB/s", "%copy",
                  "err", "sdpa_kernel"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PREFILL_REPS, DECODE_REPS, CPU_REPS = 20, 50, 5


class _ContextLost(RuntimeError):
    """The CUDA context is unusable (a kernel faulted): nothing more can run in this process."""


# ---------------------------------------------------------------------------------------------------- mask counts

def block_pairs(q_len: int, kv_len: int, block_m: int, block_n: int, causal: bool, device=None) -> torch.Tensor:
    """int64 ``[Mq, Nk]``: the (query, key) element pairs of block (m, n) that attention may use: every row
    times every key, or under causality (queries end-aligned, query i at position ``i + kv_len - q_len``) those
    with key position <= query position. Closed form, no [S, S] tensor.

    For the rows at positions ``p in [P0, P1]`` of a query block and the keys ``[c0, c0 + L)`` of a KV block,
    row p sees ``clamp(p + 1 - c0, 0, L)`` keys; with ``G(x) = sum_{t=1..x} min(t, L)`` the block's pairs are
    ``G(P1 + 1 - c0) - G(P0 - c0)``.
    """
    r0 = torch.arange(0, q_len, block_m, device=device, dtype=torch.int64)
    rows = (r0 + block_m).clamp_max(q_len) - r0
    c0 = torch.arange(0, kv_len, block_n, device=device, dtype=torch.int64)
    length = ((c0 + block_n).clamp_max(kv_len) - c0)[None, :]
    if not causal:
        return rows[:, None] * length
    offset = kv_len - q_len
    first = (r0 + offset)[:, None] - c0[None, :]  # P0 - c0
    last = (r0 + rows - 1 + offset)[:, None] - c0[None, :]  # P1 - c0

    def g(x):
        x = x.clamp_min(0)
        low = torch.minimum(x, length)
        return low * (low + 1) // 2 + (x - low) * length

    return g(last + 1) - g(first)


def mask_counts(mask: BlockSparseMask, batch: int, heads: int) -> dict:
    """Selected and causally reachable blocks, the actual density, and the attended element pairs of ``mask``
    over ``batch`` rows and ``heads`` query heads (a broadcast mask dimension counts once per row or head).
    ``causal_pairs`` and ``attended_pairs`` are per (batch row, head): the latter is the mean, and
    ``attended_pairs_total`` the exact sum."""
    pairs = block_pairs(mask.q_len, mask.kv_len, mask.block_m, mask.block_n, mask.causal, mask.kv_indices.device)
    dense = mask.to_dense()
    copies = (batch // dense.shape[0]) * (heads // dense.shape[1])
    reachable = pairs > 0
    selected = int((dense & reachable).sum()) * copies
    n_reachable = int(reachable.sum()) * batch * heads
    attended = int(torch.where(dense, pairs, 0).sum()) * copies
    return dict(selected_blocks=selected, reachable_blocks=n_reachable,
                actual_density=selected / n_reachable if n_reachable else 0.0, attended_pairs_total=attended,
                attended_pairs=attended / (batch * heads), causal_pairs=int(pairs.sum()))


# ---------------------------------------------------------------------------------------------------- helpers

def _after_failure(device: torch.device) -> None:
    """Free memory after a failed call; raise :class:`_ContextLost` when the CUDA context no longer works."""
    common.clean_up(device)
    if device.type != "cuda":
        return
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).item()
    except Exception as exc:
        raise _ContextLost(common.why(exc)) from exc


def _dynamo_limit():
    """Raise Dynamo's recompile limit for the run (flex recompiles per shape; the default limit is 8, past which
    it would run flex eagerly and materialise the scores)."""
    try:
        import torch._dynamo.config as cfg
    except Exception:
        return contextlib.nullcontext()
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            return cfg.patch(**{name: max(64, getattr(cfg, name))})
    return contextlib.nullcontext()


_PREFLIGHT = {
    "block_sparse_attention": """
import torch
from efficient_ops import topk_blocks, block_sparse_attention
dtype, (hq, hkv, d), block = getattr(torch, {dtype!r}), {heads!r}, {block!r}
g = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(1, hq, 1024, d, device="cuda", dtype=dtype, generator=g)
k, v = (torch.randn(1, hkv, 1024, d, device="cuda", dtype=dtype, generator=g) for _ in range(2))
out = block_sparse_attention(q, k, v, topk_blocks(q, k, 0.5, block, block, causal=True), backend="cuda")
torch.cuda.synchronize()
assert torch.isfinite(out).all()
""",
    "paged_sparse_decode": """
import torch
from efficient_ops import PageSummary, select_pages, paged_sparse_decode
dtype, (hq, hkv, d), page = getattr(torch, {dtype!r}), {heads!r}, {page!r}
g = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(2, hq, d, device="cuda", dtype=dtype, generator=g)
k, v = (torch.randn(2, hkv, 4096, d, device="cuda", dtype=dtype, generator=g) for _ in range(2))
seq_lens = torch.full((2,), 4096, dtype=torch.long, device="cuda")
pages = select_pages(q, PageSummary.build(k, seq_lens, page), seq_lens, 1024)
out = paged_sparse_decode(q, k, v, seq_lens, pages, page, backend="cuda")
torch.cuda.synchronize()
assert torch.isfinite(out).all()
""",
}


def _preflight(op: str, dtype, heads, block: int, page: int) -> Optional[str]:
    """Run ``op`` on the cuda backend once at a small shape in a subprocess; None when it ran, else why not."""
    code = _PREFLIGHT[op].format(dtype=str(dtype).split(".")[-1], heads=tuple(heads), block=block, page=page)
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "the preflight call in a subprocess did not finish in 600 s"
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in (done.stderr or done.stdout or "").splitlines() if line.strip()]
    # the exception line, not the hints CUDA errors append after it ("Compile with TORCH_USE_CUDA_DSA ...")
    errors = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b", line)]
    what = (errors or lines or ["no output"])[-1][:300]
    how = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
    return f"the preflight call in a subprocess failed ({how}): {what}"


def _flex_attention(gpu: bool):
    """FlexAttention as the benchmark calls it: compiled on a GPU, eager on the CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if gpu else flex_attention


# ---------------------------------------------------------------------------------------------------- prefill

def _oracle_slice(q, mask: BlockSparseMask, hs: int, start: int):
    """(q rows, sliced mask) of the err oracle: batch row 0, query heads [0, hs), queries [start, Sq)."""
    mb = start // mask.block_m
    heads = slice(0, hs) if mask.kv_num_blocks.shape[1] > 1 else slice(0, 1)
    sub = BlockSparseMask(mask.kv_num_blocks[:1, heads, mb:].contiguous(), mask.kv_indices[:1, heads, mb:].contiguous(),
                          mask.block_m, mask.block_n, mask.q_len - start, mask.kv_len, mask.causal)
    return q[:1, :hs, start:], sub


def _prefill_length(ctx, s: int, densities, failed: Dict[str, str], rows: List[dict], bar) -> None:
    """All cases of one sequence length: SDPA-flash once, then per density the mask, the oracle, the kernels
    and flex. Appends to ``rows`` and ``ctx.skipped``."""
    device, gpu, dtype, (hq, hkv, d), b, blk = ctx.device, ctx.gpu, ctx.dtype, ctx.heads, ctx.batch, ctx.block
    es = torch.finfo(dtype).bits // 8
    set_bytes = (2 * b * hq * s * d + 2 * b * hkv * s * d) * es  # q, out, k, v
    n_sets = common.rotations(set_bytes, device)
    sets = [(ctx.randn(b, hq, s, d), ctx.randn(b, hkv, s, d), ctx.randn(b, hkv, s, d)) for _ in range(n_sets)]
    q0, k0, v0 = sets[0]
    hs = min(ERR_HEADS, hq // hkv)  # query heads of KV head 0
    start = max(0, s - ERR_QUERIES) // blk * blk
    err_slice = f"batch 0, query heads [0, {hs}), queries [{start}, {s})"
    reps = PREFILL_REPS if gpu else CPU_REPS
    timing = "graph" if gpu else "cpu"

    # dense causal SDPA, flash backend: once per length
    sdpa_us, sdpa_out = None, None
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q0, k0, v0, is_causal=True, enable_gqa=True)
            sdpa_out = out[:1, :hs, start:].float().clone()
            del out
            calls = [lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                     for q, k, v in sets]
            sdpa_us = common.time_calls(calls, device, reps=reps)
    except Exception as exc:
        reason = f"out of memory: {common.first_line(exc)}" if isinstance(exc, torch.cuda.OutOfMemoryError) \
            else common.why(exc)
        ctx.skipped.append(dict(backend=SDPA, S=s, density=None, reason=reason))
        _after_failure(device)

    for density in densities:
        where = dict(S=s, density=density)
        mask = topk_blocks(q0, k0, density, blk, blk, causal=True)
        counts = mask_counts(mask, b, hq)
        q_slice, sub = _oracle_slice(q0, mask, hs, start)
        try:
            oracle = block_sparse_attention(q_slice.float(), k0[:1, :1].float(), v0[:1, :1].float(), sub,
                                            backend="reference").float()
        except Exception as exc:  # out of memory, most likely: the rows get err None
            oracle = None
            ctx.skipped.append(dict(backend="err oracle", **where, reason=common.why(exc)))
            _after_failure(device)

        def err_of(out):
            return common.rel_err(out[:1, :hs, start:], oracle) if oracle is not None else None

        measured = {}  # backend -> (us, err, timing, attended pairs per (batch, head))
        for name in ctx.names:
            if name in failed:
                continue
            try:
                out = block_sparse_attention(q0, k0, v0, mask, backend=name)
                if gpu:
                    torch.cuda.synchronize(device)  # a failing kernel raises here, outside graph capture
                err = err_of(out)
                del out
                calls = [lambda q=q, k=k, v=v, name=name: block_sparse_attention(q, k, v, mask, backend=name)
                         for q, k, v in sets]
                eager = gpu and name == "reference"  # the dense reference: eager, CUDA events
                us = (common.time_eager if eager else common.time_calls)(calls, device, reps=reps)
                measured[name] = (us, err, "eager" if eager else timing, counts["attended_pairs"])
            except torch.cuda.OutOfMemoryError as exc:
                ctx.skipped.append(dict(backend=name, **where, reason=f"out of memory: {common.first_line(exc)}"))
                _after_failure(device)
            except Exception as exc:  # a backend that cannot run here (e.g. an extension without the kernel)
                failed[name] = common.why(exc)
                print(f"block_sparse_attention backend {name} failed at S={s} density={density}; skipping it: "
                      f"{failed[name]}")
                _after_failure(device)

        # FlexAttention with the same mask (compiled once per shape on a GPU)
        if s in ctx.flex_failed:
            ctx.skipped.append(dict(backend=FLEX, **where, reason=ctx.flex_failed[s]))
        else:
            try:
                block_mask = mask.to_flex()
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
                    out = ctx.flex(q0, k0, v0, block_mask=block_mask, enable_gqa=True)
                    if gpu:
                        torch.cuda.synchronize(device)
                    err = err_of(out)
                    del out
                    calls = [lambda q=q, k=k, v=v: ctx.flex(q, k, v, block_mask=block_mask, enable_gqa=True)
                             for q, k, v in sets]
                    us = common.time_calls(calls, device, reps=reps)
                measured[FLEX] = (us, err, "graph, compiled" if gpu else "cpu, not compiled", counts["attended_pairs"])
            except Exception as exc:
                reason = f"out of memory: {common.first_line(exc)}" if isinstance(exc, torch.cuda.OutOfMemoryError) \
                    else common.why(exc)
                if not isinstance(exc, torch.cuda.OutOfMemoryError):
                    ctx.flex_failed[s] = f"failed at an earlier density of this shape: {reason}"
                ctx.skipped.append(dict(backend=FLEX, **where, reason=reason))
                _after_failure(device)

        if sdpa_us is not None:  # (a skipped SDPA was recorded once for the length)
            sdpa_err = common.rel_err(sdpa_out, oracle) if oracle is not None and density == 1.0 else None
            measured[SDPA] = (sdpa_us, sdpa_err, timing, counts["causal_pairs"])

        flex_us = measured[FLEX][0] if FLEX in measured else None
        base = dict(op="block_sparse_attention", B=b, S=s, Hq=hq, Hkv=hkv, D=d, dtype=str(dtype).split(".")[-1],
                    block_m=blk, block_n=blk, density=density, **{"actual density": counts["actual_density"]},
                    selected_blocks=counts["selected_blocks"], reachable_blocks=counts["reachable_blocks"],
                    attended_pairs=counts["attended_pairs"], attended_pairs_total=counts["attended_pairs_total"],
                    causal_pairs=counts["causal_pairs"], sets=n_sets, err_slice=err_slice)
        dense_flops = 4 * b * hq * counts["causal_pairs"] * d
        for name in [n for n in ctx.names if n in measured] + [FLEX, SDPA]:
            if name not in measured:
                continue
            us, err, row_timing, pairs = measured[name]
            flops = 4 * b * hq * pairs * d
            rows.append(dict(base, backend=name, us=us, sdpa_us=sdpa_us, flex_us=flex_us, err=err, timing=row_timing,
                             flops=flops, dense_flops=dense_flops, sdpa_kernel="flash_attention" if name == SDPA
                             else None, **{
                                 "vs sdpa": sdpa_us / us if sdpa_us else None,
                                 "vs flex": flex_us / us if flex_us else None,
                                 "dense-equiv TFLOP/s": dense_flops / us / 1e6,
                                 "achieved TFLOP/s": flops / us / 1e6,
                                 "%matmul": 100 * flops / us / 1e6 / ctx.peaks["matmul_tflops"]
                                 if ctx.peaks["matmul_tflops"] else None}))
        common.clean_up(device)
        bar.update(1)


# ---------------------------------------------------------------------------------------------------- decode

def _tokens_read(pages: torch.Tensor, seq_lens: torch.Tensor, page_size: int) -> int:
    """Valid positions (below each row's length) in the listed pages, summed over batch rows and KV heads."""
    start = pages.long() * page_size
    valid = (seq_lens.long()[:, None, None] - start).clamp(0, page_size)
    return int(torch.where(pages >= 0, valid, 0).sum())


def _decode_group(ctx, b: int, context: int, budgets, failed: Dict[str, str], rows: List[dict], bar) -> None:
    """All budgets of one (B, context): the rotation sets (caches, summaries, queries), dense decode once, then
    per budget the selection, the oracle, and each kernel backend's decode and select+decode."""
    device, gpu, dtype, (hq, hkv, d), page = ctx.device, ctx.gpu, ctx.dtype, ctx.heads, ctx.page_size
    es = torch.finfo(dtype).bits // 8
    g = hq // hkv
    seq_lens = torch.full((b,), context, dtype=torch.long, device=device)
    cache_bytes = 2 * b * hkv * context * d * es
    n_pages = -(-context // page)
    min_read = 2 * b * hkv * min(max(2, min(budgets) // page), n_pages) * page * d * es
    n_sets = max(common.rotations(min_read, device), common.rotations(cache_bytes, device))
    free = common.free_memory(device)
    if free is not None:  # each set: K and V, the summary (kmin + kmax: 1 / page of that) and a margin
        n_sets = max(1, min(n_sets, int(DECODE_MEM_FRACTION * free // (cache_bytes * (1 + 1 / page) * 1.1))))
    sets = []
    for _ in range(n_sets):
        k, v = ctx.randn(b, hkv, context, d), ctx.randn(b, hkv, context, d)
        sets.append((ctx.randn(b, hq, d), k, v, PageSummary.build(k, seq_lens, page)))
        common.clean_up(device)
    q0, k0, v0, summary0 = sets[0]
    reps = DECODE_REPS if gpu else CPU_REPS
    timing = "graph" if gpu else "cpu"
    kh = min(ERR_KV_HEADS, hkv)

    # dense decode over the whole context, torch's kernel: once per (B, context)
    dense_us, dense_reason = None, None
    choice = common.sdpa_choice(q0[:, :, None], k0, v0, is_causal=False)
    try:
        calls = [lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
                 for q, k, v, _ in sets]
        dense_us = common.time_calls(calls, device, reps=reps)
    except Exception as exc:
        dense_reason = f"out of memory: {common.first_line(exc)}" if isinstance(exc, torch.cuda.OutOfMemoryError) \
            else common.why(exc)
        _after_failure(device)

    for budget in budgets:
        where = dict(B=b, context=context, budget=budget)
        page_lists = [select_pages(q, summary, seq_lens, budget) for q, _, _, summary in sets]
        pages0 = page_lists[0]
        n_sel = pages0.shape[2]
        tokens = _tokens_read(pages0, seq_lens, page)
        read = 2 * tokens * d * es
        summary_bytes = 2 * b * hkv * summary0.kmin.shape[2] * d * summary0.kmin.element_size()
        try:
            oracle = paged_sparse_decode(q0[:1, :kh * g].float(), k0[:1, :kh].float(), v0[:1, :kh].float(),
                                         seq_lens[:1], pages0[:1, :kh].contiguous(), page, backend="reference").float()
        except Exception as exc:
            oracle = None
            ctx.skipped.append(dict(backend="err oracle", step=DECODE, **where, reason=common.why(exc)))
            _after_failure(device)

        def err_of(out):
            return common.rel_err(out[:1, :kh * g], oracle) if oracle is not None else None

        measured = []  # (backend, step, us, err, timing, bytes)
        for name in ctx.names:
            if name in failed:
                continue
            eager = gpu and name == "reference"
            timer = common.time_eager if eager else common.time_calls
            try:
                out = paged_sparse_decode(q0, k0, v0, seq_lens, pages0, page, backend=name)
                if gpu:
                    torch.cuda.synchronize(device)
                err = err_of(out)
                calls = [lambda q=q, k=k, v=v, p=p, name=name: paged_sparse_decode(q, k, v, seq_lens, p, page,
                                                                                   backend=name)
                         for (q, k, v, _), p in zip(sets, page_lists)]
                measured.append((name, DECODE, timer(calls, device, reps=reps), err, "eager" if eager else timing,
                                 read))
                out = paged_sparse_decode(q0, k0, v0, seq_lens, select_pages(q0, summary0, seq_lens, budget), page,
                                          backend=name)
                if gpu:
                    torch.cuda.synchronize(device)
                err = err_of(out)
                del out
                calls = [lambda q=q, k=k, v=v, sm=sm, name=name: paged_sparse_decode(
                    q, k, v, seq_lens, select_pages(q, sm, seq_lens, budget), page, backend=name)
                    for q, k, v, sm in sets]
                measured.append((name, SELECT_DECODE, timer(calls, device, reps=reps), err,
                                 "eager" if eager else timing, read + summary_bytes))
            except torch.cuda.OutOfMemoryError as exc:
                ctx.skipped.append(dict(backend=name, step=DECODE, **where,
                                        reason=f"out of memory: {common.first_line(exc)}"))
                _after_failure(device)
            except Exception as exc:
                failed[name] = common.why(exc)
                print(f"paged_sparse_decode backend {name} failed at B={b} context={context} budget={budget}; "
                      f"skipping it: {failed[name]}")
                _after_failure(device)
        if dense_us is not None:
            measured.append((DENSE, "dense", dense_us, None, timing, cache_bytes))
        else:
            ctx.skipped.append(dict(backend=DENSE, step="dense", **where, reason=dense_reason))

        base = dict(op="paged_sparse_decode", B=b, context=context, budget=budget, page_size=page, Hq=hq, Hkv=hkv,
                    D=d, dtype=str(dtype).split(".")[-1], n_pages=summary0.kmin.shape[2], sets=n_sets,
                    err_slice=f"batch 0, KV heads [0, {kh}) (query heads [0, {kh * g}))")
        for name, step, us, err, row_timing, nbytes in measured:
            gbps = nbytes / us / 1e3
            dense = name == DENSE
            rows.append(dict(base, backend=name, step=step, pages=None if dense else n_sel,
                             tokens_read=context if dense else tokens / (b * hkv), bytes=nbytes, us=us,
                             dense_us=dense_us, err=err, timing=row_timing, sdpa_kernel=choice if dense else None,
                             **{"speedup": dense_us / us if dense_us else None, "GB/s": gbps,
                                "%copy": 100 * gbps / ctx.peaks["copy_gbps"] if ctx.peaks["copy_gbps"] else None}))
        common.clean_up(device)
        bar.update(1)


# ---------------------------------------------------------------------------------------------------- run

def run(device: torch.device, out_dir: str = "bench/results", quick: bool = False, dtype=None, names=None,
        heads=None, lengths=None, densities=None, block=None, decode_batches=None, contexts=None, budgets=None,
        page_size: int = PAGE_SIZE, prefill: bool = True, decode: bool = True) -> dict:
    """Benchmark block-sparse prefill and sparse decode on ``device``; write
    ``<out_dir>/<device>/sparse_attention.{json,md}`` and return the payload.

    ``dtype``: bfloat16 (default) or float16 on a GPU; the CPU run uses float32 unless told. ``quick`` on a GPU:
    prefill S 4K and 32K at densities 1.0 and 0.1, decode context 128K with budget 4K at B 1 and 8 (the
    targets' cases); the CPU run is small either way. ``heads`` (``(Hq, Hkv, D)``), ``lengths``, ``densities``,
    ``block``, ``decode_batches``, ``contexts``, ``budgets`` and ``names`` (kernel backends) override the
    defaults (tests run the Triton interpreter this way); ``prefill=False`` / ``decode=False`` skip a table.
    """
    gpu = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    heads = tuple(heads or (GPU_HEADS if gpu else CPU_HEADS))
    hq, hkv, d = heads
    block = block or (GPU_BLOCK if gpu else CPU_BLOCK)
    if gpu:
        lengths = lengths or ([4096, 32768] if quick else GPU_LENGTHS)
        densities = densities or ([1.0, 0.1] if quick else GPU_DENSITIES)
        decode_batches = decode_batches or GPU_DECODE_BATCHES
        contexts = contexts or ([131072] if quick else GPU_CONTEXTS)
        budgets = budgets or ([4096] if quick else GPU_BUDGETS)
    else:
        lengths, densities = lengths or CPU_LENGTHS, densities or CPU_DENSITIES
        decode_batches, contexts = decode_batches or CPU_DECODE_BATCHES, contexts or CPU_CONTEXTS
        budgets = budgets or CPU_BUDGETS
    note = ("" if gpu else f"No CUDA GPU: tiny shapes on the CPU (Hq {hq}, Hkv {hkv}, D {d}, {str(dtype)[6:]}) "
            "against SDPA (flash, CPU) and FlexAttention run eagerly (not compiled) on the CPU. These numbers prove "
            "the path runs; they say nothing about GPU kernel speed.")
    info, peaks = common.start_run(device, note)
    failed, decode_failed = {}, {}  # backend -> why it stopped running (not tried again)
    if names is None:
        if gpu:
            names, unavailable = common.kernel_backends(device)
            failed.update(unavailable)
            decode_failed.update(unavailable)
        else:
            names = ["reference"]
    names = list(names)
    if gpu and "cuda" in names:  # a faulting kernel would take the whole process down: try it aside first
        for op, store, wanted in (("block_sparse_attention", failed, prefill), ("paged_sparse_decode", decode_failed,
                                                                                 decode)):
            reason = _preflight(op, dtype, heads, block, page_size) if wanted else None
            if reason:
                store["cuda"] = reason
                print(f"{op} backend cuda failed its preflight; skipping it: {reason}")
    gen = torch.Generator(device=device).manual_seed(0)

    ctx = types.SimpleNamespace(  # what the per-length / per-group functions share
        device=device, gpu=gpu, dtype=dtype, heads=heads, batch=GPU_BATCH, block=block, page_size=page_size,
        names=names, peaks=peaks, skipped=[], flex_failed={}, flex=None,
        randn=lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype))
    rows, decode_rows, aborted = [], [], None
    try:
        if prefill:
            ctx.flex = _flex_attention(gpu)
            with _dynamo_limit(), tqdm(total=len(lengths) * len(densities), desc="sparse_attention prefill",
                                       unit="case") as bar:
                for s in lengths:
                    _prefill_length(ctx, s, list(densities), failed, rows, bar)
                    common.clean_up(device)  # the length's tensors are gone with _prefill_length's frame
        if decode:
            groups = [(b, c) for c in contexts for b in decode_batches]
            with tqdm(total=len(groups) * len(budgets), desc="sparse_attention decode", unit="case") as bar:
                for b, c in groups:
                    _decode_group(ctx, b, c, list(budgets), decode_failed, decode_rows, bar)
                    common.clean_up(device)
    except _ContextLost as exc:
        aborted = (f"the CUDA context was lost after a failure ({exc}); the results below are those measured "
                   "before it")
        print(aborted)
    payload = {"family": "sparse_attention", "device": info, "peaks": peaks, "note": note, "dtype": str(dtype),
               "heads": dict(Hq=hq, Hkv=hkv, D=d), "batch": GPU_BATCH, "block": block, "page_size": page_size,
               "backends": names, "flex": "compiled (torch.compile, dynamic=False)" if gpu else "eager (not compiled)",
               "err_reference": "the reference backend in float32 on a slice (err_slice in each row)",
               "failed_backends": failed, "decode_failed_backends": decode_failed, "skipped": ctx.skipped,
               "aborted": aborted, "rows": rows, "decode_rows": decode_rows,
               "targets": check_targets(rows) if gpu else [],
               "decode_targets": check_decode_targets(decode_rows) if gpu else []}
    table = _report(payload)
    folder = common.write_results(out_dir, "sparse_attention", payload, table)
    peak_line = (f" measured copy bandwidth {peaks['copy_gbps']:.0f} GB/s, bf16 matmul "
                 f"{peaks['matmul_tflops']:.0f} TFLOP/s" if gpu else "")
    print(f"\nsparse_attention on {info['name']} ({str(dtype)}, Hq {hq}, Hkv {hkv}, D {d}){peak_line}\n{table}\n"
          f"results: {folder}/sparse_attention.json, sparse_attention.md")
    return payload


def _where(s: dict) -> str:
    keys = ("S", "density", "B", "context", "budget", "step")
    return " ".join(f"{k}={s[k]}" for k in keys if s.get(k) is not None)


def _report(payload: dict) -> str:
    rows, decode_rows = payload["rows"], payload["decode_rows"]
    parts = []
    if payload["aborted"]:
        parts.append(f"ABORTED: {payload['aborted']}")
    parts.append(f"Prefill (B {payload['batch']}, causal, block {payload['block']}; flex {payload['flex']}; err vs "
                 "the float32 reference on the slice in err_slice):\n\n" + common.markdown_table(rows, COLUMNS))
    parts.append(f"Decode (page size {payload['page_size']}; err vs the float32 reference on batch 0, KV heads 0-1):"
                 "\n\n" + common.markdown_table(decode_rows, DECODE_COLUMNS))
    wrong = [r for r in rows + decode_rows if r["err"] is not None and not r["err"] <= MAX_ERR]
    if wrong:
        parts.append(f"WRONG OUTPUTS: {len(wrong)} rows have a relative error above {MAX_ERR} against the float32 "
                     "reference (their targets count as missed): " + ", ".join(
                         f"{r['backend']} {_where(r)}" for r in wrong))
    if payload["skipped"]:
        parts.append("Skipped:\n\n" + "\n".join(f"- {s['backend']} {_where(s)}: {s['reason']}"
                                                 for s in payload["skipped"]))
    for key, what in (("failed_backends", "block_sparse_attention"), ("decode_failed_backends", "paged_sparse_decode")):
        if payload[key]:
            parts.append(f"{what} backends that failed (not timed after their first failure):\n\n" + "\n".join(
                f"- {name}: {why}" for name, why in payload[key].items()))
    if payload["targets"]:
        parts.append("Prefill targets (H100 goals; every kernel backend):\n\n" + common.markdown_table(
            payload["targets"], ["backend", "S", "density", "target", "measured", "met"]))
    if payload["decode_targets"]:
        parts.append("Decode targets (H100 goals; every kernel backend, step and batch size):\n\n" +
                     common.markdown_table(payload["decode_targets"],
                                           ["backend", "step", "B", "context", "budget", "target", "measured", "met"]))
    return "\n\n".join(parts)


def _right(r: dict) -> bool:
    return r.get("err") is None or r["err"] <= MAX_ERR


def check_targets(rows: List[dict]) -> List[dict]:
    """Prefill goals per kernel backend row: density 1.0: ``vs sdpa >= 0.9`` (every length); density d < 1:
    ``vs sdpa >= 0.85 / d`` at S = 32K and ``vs flex >= 1.3`` at every length. A wrong output misses; a case
    whose SDPA or flex was skipped misses that goal."""
    t = PREFILL_TARGETS
    out = []
    for r in rows:
        if r["backend"] in (SDPA, FLEX):
            continue
        where = dict(backend=r["backend"], S=r["S"], density=r["density"])
        goals = []
        if r["density"] >= 1.0:
            goals.append(("vs sdpa", t["dense_min_vs_sdpa"]))
        else:
            if r["S"] == t["sparse_length"]:
                goals.append(("vs sdpa", t["sparse_sdpa_factor"] / r["density"]))
            goals.append(("vs flex", t["min_vs_flex"]))
        for column, bound in goals:
            value = r.get(column)
            out.append(dict(where, target=f"{column} >= {bound:.3g}",
                            measured=f"{value:.2f}x" if value is not None else f"{column.split()[1]} skipped",
                            met=value is not None and value >= bound and _right(r)))
    return out


def check_decode_targets(rows: List[dict]) -> List[dict]:
    """Decode goals: at (context, budget), ``speedup >= 10`` for each kernel backend's decode and select+decode
    rows, both batch sizes. A wrong output, or a case without dense decode, misses."""
    out = []
    for goal in DECODE_TARGETS:
        for r in rows:
            if r["step"] not in (DECODE, SELECT_DECODE) or (r["context"], r["budget"]) != (goal["context"],
                                                                                        goal["budget"]):
                continue
            value = r.get("speedup")
            out.append(dict(backend=r["backend"], step=r["step"], B=r["B"], context=r["context"], budget=r["budget"],
                            target=f"speedup >= {goal['min_speedup']:g}",
                            measured=f"{value:.2f}x" if value is not None else "dense skipped",
                            met=value is not None and value >= goal["min_speedup"] and _right(r)))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--quick", action="store_true",
                        help="on a GPU: prefill S 4K and 32K at densities 1.0 and 0.1; decode 128K context, budget 4K")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="q and the caches (default: bfloat16 on a GPU, float32 on the CPU; the kernels take "
                             "float16/bfloat16 only)")
    parser.add_argument("--backend", action="append", choices=list(backends.BACKENDS), default=None,
                        help="repeatable; default: the available kernel backends on a GPU, the reference on the CPU")
    parser.add_argument("--block", type=int, choices=[16, 32, 64, 128], default=None,
                        help="block_m = block_n of the prefill mask (default: 128 on a GPU, 32 on the CPU)")
    parser.add_argument("--page-size", type=int, choices=[16, 64], default=PAGE_SIZE)
    parser.add_argument("--no-prefill", action="store_true", help="skip the prefill table")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode table")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run(device, args.out, args.quick, dtype=DTYPES[args.dtype] if args.dtype else None, names=args.backend,
        block=args.block, page_size=args.page_size, prefill=not args.no_prefill, decode=not args.no_decode)


if __name__ == "__main__":
    main()
