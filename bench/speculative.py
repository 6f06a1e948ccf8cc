"""Speculative-decoding benchmark (family ``speculative``): the kernels of tree_attention against SDPA with a
tree mask and the decode floor.

Every available kernel backend of ``tree_attention`` is measured against PyTorch SDPA with an explicit tree mask
and against the decode floor in the same run; a second table times ``compact_kv`` over every layer.

**Cases** (GPU): a draft tree of T in 16, 64, 128 nodes over a committed prefix of 1K, 4K, 16K, 32K, 64K
positions, batch B in 1, 8; Hq = 32 query heads, Hkv = 8 KV heads, head_dim D = 128; bfloat16 unless
``--dtype float16``. The caches are ``[B, Hkv, S_max, D]`` with ``S_max = prefix + T`` exactly, so they hold
only what a call reads: the prefix at ``[0, prefix)`` and the tree's K/V at ``[prefix, prefix + T)``. Each
T has one fixed random tree (:func:`draft_tree`, seeded, EAGLE-like: ``ceil(log2 T)`` levels of about equal
width, each node's parent drawn from the level above with weight ``1 / (rank + 1)``, favouring the
higher-ranked drafts); its parents, depth and mean attended tree keys are written with the results.

**Baselines**, per case:

- ``sdpa+mask``: ``F.scaled_dot_product_attention(q, k, v, attn_mask, enable_gqa=True)`` over the whole
  cache with a boolean ``[B, 1, T, prefix + T]`` mask (every prefix key, plus the tree's ancestor-or-self
  mask), built outside the timed region; the row records which SDPA backend torch picked
  (``sdpa_kernel``, from ``torch._fused_sdp_choice``). When torch picks the math fallback, which
  materialises ``[B, Hq, T, S]`` float scores, the case is skipped (recorded with the reason) if its
  estimated memory exceeds :data:`SDPA_MEM_FRACTION` of the free GPU memory, or when it runs out of memory.
- ``decode floor``: plain decode attention over the same prefix, SDPA with one query token per head
  (``q [B, Hq, 1, D]`` over ``k/v[:, :, :prefix]``, ``enable_gqa=True``, torch's choice of kernel, flash on
  a GPU): the memory-bound floor that reads the same prefix bytes as the tree does.

**Columns**: ``us`` (median microseconds per call), ``floor_us``, ``vs floor = us / floor_us`` (1 = as fast
as one decode token), ``sdpa_us``, ``vs sdpa = sdpa_us / us`` (speedup over SDPA with the mask),
``GB/s = 2 * B * Hkv * prefix * D * element_size / time`` (the prefix K and V bytes, for every row, the
floor's included), ``%copy`` (of the copy bandwidth measured in the same run), ``TFLOP/s`` on the useful
flops ``4 * B * Hq * T * (prefix + mean tree keys) * D`` (the decode floor: ``4 * B * Hq * prefix * D``;
"mean tree keys" is the mean over nodes of ancestors + self, i.e. mean depth + 1), and ``err``: the
relative error (Frobenius) against SDPA with the mask computed in float32 by the math backend once per
case, one batch row at a time to bound its memory, so it never depends on the timed SDPA row being
skipped. The decode floor computes something else and has no ``err``. An ``err`` above :data:`MAX_ERR`
flags the row as wrong.

**Targets** (:data:`TARGETS`, the issue's goals on H100; benchmark goals, not tests): at prefix 32K and
T = 64, both batch sizes, every kernel backend: ``vs floor <= 1.15`` and ``vs sdpa >= 3``. They are
listed as met / missed per backend and B (a wrong output, or a skipped SDPA, misses).

**compact_kv** (second table): the accepted path ``[0, 1, 3, 6, 10]`` (accept_len 4) moved to the front of
the tree slots in a stacked cache ``[L = 32, B, Hkv = 8, S_max, D = 128]`` in one call for all layers, B in
1, 8; every backend (the reference on a GPU is timed eagerly, as it synchronises with the host and cannot
be captured in a graph). ``GB/s = 2 * L * B * Hkv * accept_len * D * element_size * 2 / time`` (K and V,
read + write). Every backend's moves are checked once against the reference on a small cache (``exact``).

**Timing** (:mod:`bench.common`): CUDA-graph replay of one call per input set, median over replays,
per call. Input sets (q and the caches) rotate through more than twice the L2 size where one set is smaller
than that (in practice prefix 1K and 4K, and 16K at B = 1); compact_kv rotates the prefix lengths over
disjoint slots of one cache instead. A backend that raises (e.g. ``BackendUnavailableError`` when the CUDA
extension lacks the kernel) is recorded in ``failed_backends`` with the reason and not tried again; the run
goes on. The reference backend, when asked for on a GPU (``--backend reference``), synchronises with the
host and is timed eagerly with CUDA events instead (``timing: eager`` in its rows).

**Without a GPU**: the reference backend only (the Triton interpreter is a test tool; pass
``--backend triton --dtype float16`` with ``TRITON_INTERPRET=1`` to run its path) at tiny shapes (B 1, Hq 4,
Hkv 2, D 64, T in 4, 16, prefix in 64, 200, float32) against SDPA on the CPU. Those numbers prove the path
end to end; they say nothing about GPU kernel speed.

Run: ``efficient-ops bench --family speculative`` (or ``python -m efficient_ops.bench.speculative
[--quick] [--dtype float16] [--backend NAME ...]``).
"""

from __future__ import annotations

import argparse
import math
import random
from typing import List

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from efficient_ops import backends, compact_kv, tree_attention, tree_depths, tree_mask

from . import common

GPU_TREES = [16, 64, 128]
GPU_PREFIXES = [1024, 4096, 16384, 32768, 65536]
GPU_BATCHES = [1, 8]
GPU_HEADS = (32, 8, 128)  # Hq, Hkv, D
CPU_TREES = [4, 16]
CPU_PREFIXES = [64, 200]
CPU_BATCHES = [1]
CPU_HEADS = (4, 2, 64)

# The tree-attention issue's goals on H100: at (prefix, T), both batch sizes, every kernel backend.
TARGETS = [dict(prefix=32768, T=64, max_vs_floor=1.15, min_vs_sdpa=3.0)]
MAX_ERR = 1e-2  # relative error against float32 SDPA above which a row is flagged wrong (fp16/bf16 bound)
SDPA_MEM_FRACTION = 0.4  # skip SDPA's math fallback when its estimate needs more than this of the free memory

SDPA, FLOOR = "sdpa+mask", "decode floor"
COMPACT_LAYERS, COMPACT_BATCHES, COMPACT_HEADS = 32, [1, 8], (8, 128)  # L, B, (Hkv, D)
CPU_COMPACT = (2, [1], (2, 64))
COMPACT_PATH = [0, 1, 3, 6, 10]  # the accepted nodes, root first; accept_len = 4
COMPACT_SPAN = 16  # tree slots per rotation set (the path reaches slot prefix + 10)

COLUMNS = ["backend", "B", "T", "prefix", "depth", "us", "floor_us", "vs floor", "sdpa_us", "vs sdpa", "GB/s",
           "%copy", "TFLOP/s", "err", "sdpa_kernel"]
COMPACT_COLUMNS = ["backend", "L", "B", "Hkv", "D", "accept_len", "timing", "us", "GB/s", "%copy", "exact"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GPU_REPS, CPU_REPS = 50, 20


def draft_tree(t: int, seed: int = 0) -> List[int]:
    """A fixed EAGLE-like draft tree of ``t`` nodes as a parent list in topological (level) order.

    ``ceil(log2 t)`` levels below the root of about equal width; each node's parent is drawn from the level
    above with weight ``1 / (rank + 1)`` (the top-ranked drafts get more children). Same ``(t, seed)``, same tree.
    """
    if t < 1:
        raise ValueError(f"a tree needs at least one node, got {t}")
    rng = random.Random(1_000_003 * seed + t)
    rest = t - 1
    levels = min(rest, max(1, math.ceil(math.log2(t)))) if rest else 0
    parents, above = [-1], [0]
    for level in range(levels):
        width = rest // levels + (1 if level < rest % levels else 0)
        weights = [1.0 / (rank + 1) for rank in range(len(above))]
        here = []
        for _ in range(width):
            parents.append(rng.choices(above, weights)[0])
            here.append(len(parents) - 1)
        above = here
    return parents


def _sdpa_math_bytes(b, hq, t, s, d) -> int:
    """Estimated peak bytes of SDPA's math fallback (it upcasts fp16/bf16 to float32): three float32 [B, Hq, T, S]
    buffers (scores, masked scores, probabilities), the mask as float [B, T, S], K/V expanded to Hq heads and q
    and the output in float32."""
    return 3 * b * hq * t * s * 4 + b * t * s * 4 + 2 * b * hq * s * d * 4 + 2 * b * hq * t * d * 4


def _oracle(q, k, v, mask) -> torch.Tensor:
    """SDPA with the mask, float32, math backend, one batch row at a time (bounded memory)."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    with sdpa_kernel(SDPBackend.MATH):
        for b in range(q.shape[0]):
            out[b:b + 1] = F.scaled_dot_product_attention(q[b:b + 1].float(), k[b:b + 1].float(),
                                                          v[b:b + 1].float(), attn_mask=mask[b:b + 1],
                                                          enable_gqa=True)
    return out


def run(device: torch.device, out_dir: str = "bench/results", quick: bool = False, dtype=None, cases=None,
        heads=None, names=None, compact: bool = True) -> dict:
    """Benchmark tree_attention (and compact_kv) on ``device``; write ``<out_dir>/<device>/speculative.{json,md}``
    and return the payload.

    ``dtype``: bfloat16 (default) or float16 on a GPU; the CPU run uses float32 unless told. ``quick`` on a GPU:
    T = 64, prefix 1K and 32K, B 1 and 8 (the targets' cases); the CPU run is small either way. ``cases``
    (``[(B, T, prefix), ...]``), ``heads`` (``(Hq, Hkv, D)``) and ``names`` (kernel backends) override the
    defaults (tests run the Triton interpreter this way); ``compact=False`` skips the compact_kv table.
    """
    gpu = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    hq, hkv, d = heads or (GPU_HEADS if gpu else CPU_HEADS)
    if cases is None:
        trees, prefixes, batches = (GPU_TREES, GPU_PREFIXES, GPU_BATCHES) if gpu else (CPU_TREES, CPU_PREFIXES,
                                                                                       CPU_BATCHES)
        if quick and gpu:
            trees, prefixes = [64], [1024, 32768]
        cases = [(b, t, p) for t in trees for p in prefixes for b in batches]
    reps = GPU_REPS if gpu else CPU_REPS
    note = ("" if gpu else f"No CUDA GPU: tiny shapes on the CPU (Hq {hq}, Hkv {hkv}, D {d}, {str(dtype)[6:]}) "
            "against SDPA on the CPU. These numbers prove the path runs; they say nothing about GPU kernel speed.")
    info, peaks = common.start_run(device, note)
    failed = {}  # backend -> why it stopped running (it raised once, or cannot run here; not tried again)
    if names is None:
        if gpu:
            names, unavailable = common.kernel_backends(device)
            failed.update(unavailable)
        else:
            names = ["reference"]
    names = list(names)
    es = torch.finfo(dtype).bits // 8
    gen = torch.Generator(device=device).manual_seed(0)
    rows, skipped, trees = [], [], {}

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    def bench_case(b, t, prefix):
        if t not in trees:
            par = torch.tensor(draft_tree(t))
            trees[t] = dict(parents=par.tolist(), depth=int(tree_depths(par).max()),
                            mean_tree_keys=tree_mask(par).sum().item() / t)
        tree = trees[t]
        s = prefix + t
        parents = torch.tensor(tree["parents"], dtype=torch.long, device=device)
        prefix_lens = torch.full((b,), prefix, dtype=torch.long, device=device)
        allowed = torch.cat([torch.ones(t, prefix, dtype=torch.bool, device=device), tree_mask(parents)[0]], dim=1)
        mask = allowed.expand(b, 1, t, s).contiguous()
        prefix_bytes = 2 * b * hkv * prefix * d * es
        set_bytes = 2 * b * hkv * s * d * es + 2 * b * hq * t * d * es  # caches + q + out
        n_sets = common.rotations(set_bytes, device)
        sets = [(randn(b, hq, t, d), randn(b, hkv, s, d), randn(b, hkv, s, d)) for _ in range(n_sets)]
        q1s = [q[:, :, :1].contiguous() for q, _, _ in sets]
        flops = 4 * b * hq * t * (prefix + tree["mean_tree_keys"]) * d
        base = dict(op="tree_attention", B=b, T=t, prefix=prefix, Hq=hq, Hkv=hkv, D=d, dtype=str(dtype).split(".")[-1],
                    depth=tree["depth"], mean_tree_keys=tree["mean_tree_keys"], sets=n_sets, bytes=prefix_bytes)
        where = dict(B=b, T=t, prefix=prefix)
        q0, k0, v0 = sets[0]
        try:
            oracle = _oracle(q0, k0, v0, mask)
        except Exception as exc:  # out of memory, most likely: the rows get err None
            oracle = None
            skipped.append(dict(backend="err oracle", **where, reason=common.why(exc)))
            common.clean_up(device)
        measured = {}  # backend -> (us, err, extra row fields, useful flops)

        # the decode floor: one query token per head over the same prefix
        try:
            floor_calls = [lambda q1=q1, k=k[:, :, :prefix], v=v[:, :, :prefix]:
                           F.scaled_dot_product_attention(q1, k, v, enable_gqa=True)
                           for q1, (_, k, v) in zip(q1s, sets)]
            measured[FLOOR] = (common.time_calls(floor_calls, device, reps=reps), None,
                               dict(sdpa_kernel=common.sdpa_choice(q1s[0], k0[:, :, :prefix], v0[:, :, :prefix])),
                               4 * b * hq * prefix * d)
        except Exception as exc:
            skipped.append(dict(backend=FLOOR, **where, reason=f"{type(exc).__name__}: {exc}"))
            common.clean_up(device)

        # SDPA with the explicit mask
        choice = common.sdpa_choice(q0, k0, v0, mask)
        free = common.free_memory(device)
        need = _sdpa_math_bytes(b, hq, t, s, d)
        if gpu and choice in (None, "math") and free is not None and need > SDPA_MEM_FRACTION * free:
            skipped.append(dict(backend=SDPA, **where, reason=f"the math fallback needs about {need / 2**30:.1f} GiB, "
                                f"more than {SDPA_MEM_FRACTION:.0%} of the free {free / 2**30:.1f} GiB"))
        else:
            try:
                out = F.scaled_dot_product_attention(q0, k0, v0, attn_mask=mask, enable_gqa=True)
                err = common.rel_err(out, oracle) if oracle is not None else None
                del out
                sdpa_calls = [lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                                   enable_gqa=True)
                              for q, k, v in sets]
                measured[SDPA] = (common.time_calls(sdpa_calls, device, reps=reps), err, dict(sdpa_kernel=choice),
                                  flops)
            except torch.cuda.OutOfMemoryError as exc:
                skipped.append(dict(backend=SDPA, **where, reason=f"out of memory: {common.first_line(exc)}"))
            except Exception as exc:
                skipped.append(dict(backend=SDPA, **where, reason=f"{type(exc).__name__}: {exc}"))
            common.clean_up(device)

        # the kernels
        for name in names:
            if name in failed:
                continue
            try:
                out = tree_attention(q0, k0, v0, prefix_lens, parents, backend=name)
                if gpu:
                    torch.cuda.synchronize(device)  # a failing kernel raises here, outside graph capture
                err = common.rel_err(out, oracle) if oracle is not None else None
                del out
                calls = [lambda q=q, k=k, v=v, name=name: tree_attention(q, k, v, prefix_lens, parents, backend=name)
                         for q, k, v in sets]
                eager = gpu and name == "reference"  # it synchronises with the host: no graph capture
                us = (common.time_eager if eager else common.time_calls)(calls, device, reps=reps)
                measured[name] = (us, err, dict(timing="eager") if eager else {}, flops)
            except Exception as exc:  # a backend that cannot run here (e.g. an extension without the kernel)
                failed[name] = f"{type(exc).__name__}: {exc}"
                print(f"tree_attention backend {name} failed at B={b} T={t} prefix={prefix}; skipping it: "
                      f"{failed[name]}")
                common.clean_up(device)

        floor_us = measured[FLOOR][0] if FLOOR in measured else None
        sdpa_us = measured[SDPA][0] if SDPA in measured else None
        for name in [n for n in names if n in measured] + [SDPA, FLOOR]:
            if name not in measured:
                continue
            us, err, extra, row_flops = measured[name]
            gbps = prefix_bytes / us / 1e3
            rows.append(dict(base, backend=name, us=us, floor_us=floor_us, sdpa_us=sdpa_us, flops=row_flops, err=err,
                             **extra, **{"vs floor": us / floor_us if floor_us else None,
                                         "vs sdpa": sdpa_us / us if sdpa_us else None, "GB/s": gbps,
                                         "%copy": 100 * gbps / peaks["copy_gbps"] if peaks["copy_gbps"] else None,
                                         "TFLOP/s": row_flops / us / 1e6,
                                         "%matmul": 100 * row_flops / us / 1e6 / peaks["matmul_tflops"]
                                         if peaks["matmul_tflops"] else None}))

    for b, t, prefix in tqdm(cases, desc="tree_attention", unit="case"):
        bench_case(b, t, prefix)
        common.clean_up(device)  # the case's tensors are gone with bench_case's frame

    compact_rows, compact_failed = [], {}
    if compact:
        compact_names = names + (["reference"] if "reference" not in names else [])
        compact_rows = _bench_compact(device, dtype, gpu, compact_names, compact_failed, peaks, reps, gen)
    payload = {"family": "speculative", "device": info, "peaks": peaks, "note": note, "dtype": str(dtype),
               "heads": dict(Hq=hq, Hkv=hkv, D=d), "trees": {str(t): v for t, v in trees.items()},
               "backends": names, "failed_backends": failed, "compact_failed_backends": compact_failed,
               "skipped": skipped, "rows": rows, "compact_rows": compact_rows,
               "targets": check_targets(rows) if gpu else []}
    table = _report(payload)
    folder = common.write_results(out_dir, "speculative", payload, table)
    peak_line = f"measured copy bandwidth {peaks['copy_gbps']:.0f} GB/s" if gpu else ""
    print(f"\ntree_attention on {info['name']} ({str(dtype)}, Hq {hq}, Hkv {hkv}, D {d}) {peak_line}\n{table}\n"
          f"results: {folder}/speculative.json, speculative.md")
    return payload


def _bench_compact(device, dtype, gpu, names, failed, peaks, reps, gen) -> List[dict]:
    """One row per batch size and backend: compact_kv of COMPACT_PATH over a stacked [L, B, Hkv, S_max, D] cache."""
    n_layers, batches, (hkv, d) = (COMPACT_LAYERS, COMPACT_BATCHES, COMPACT_HEADS) if gpu else CPU_COMPACT
    es = torch.finfo(dtype).bits // 8
    accept = len(COMPACT_PATH) - 1
    rows = []
    for b in tqdm(batches, desc="compact_kv", unit="batch"):
        moved = 2 * n_layers * b * hkv * accept * d * es * 2
        n_sets = common.rotations(moved, device)
        shape = (n_layers, b, hkv, n_sets * COMPACT_SPAN, d)
        k = torch.randn(*shape, generator=gen, device=device, dtype=dtype)
        v = torch.randn(*shape, generator=gen, device=device, dtype=dtype)
        accepted = torch.tensor([COMPACT_PATH] * b, dtype=torch.long, device=device)
        accept_len = torch.full((b,), accept, dtype=torch.long, device=device)
        prefixes = [torch.full((b,), r * COMPACT_SPAN, dtype=torch.long, device=device) for r in range(n_sets)]
        # correctness once, on a small cache: every backend's moves equal the reference's
        small = torch.randn(n_layers, b, hkv, COMPACT_SPAN + 2, d, generator=gen, device=device, dtype=dtype)
        small_v = torch.randn(small.shape, generator=gen, device=device, dtype=dtype)
        two = torch.full((b,), 2, dtype=torch.long, device=device)
        want_k, want_v = small.clone(), small_v.clone()
        compact_kv(want_k, want_v, two, accepted, accept_len, backend="reference")
        for name in names:
            if name in failed:
                continue
            try:
                got_k, got_v = small.clone(), small_v.clone()
                new_lens = compact_kv(got_k, got_v, two, accepted, accept_len, backend=name)
                exact = (torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
                         and torch.equal(new_lens, two + accept + 1))
                calls = [lambda p=p, name=name: compact_kv(k, v, p, accepted, accept_len, backend=name)
                         for p in prefixes]
                eager = gpu and name == "reference"  # it synchronises with the host: no graph capture
                us = (common.time_eager if eager else common.time_calls)(calls, device, reps=reps)
            except Exception as exc:
                failed[name] = f"{type(exc).__name__}: {exc}"
                print(f"compact_kv backend {name} failed at B={b}; skipping it: {failed[name]}")
                common.clean_up(device)
                continue
            gbps = moved / us / 1e3
            rows.append(dict(op="compact_kv", backend=name, L=n_layers, B=b, Hkv=hkv, D=d, S_max=shape[3],
                             dtype=str(dtype).split(".")[-1], accept_len=accept, path=COMPACT_PATH, sets=n_sets,
                             bytes=moved, timing="eager" if eager else ("graph" if gpu else "cpu"), us=us,
                             exact=exact, **{"GB/s": gbps, "%copy": 100 * gbps / peaks["copy_gbps"]
                                             if peaks["copy_gbps"] else None}))
        k = v = small = small_v = want_k = want_v = None  # free them (the timed lambdas read k, v by closure)
        common.clean_up(device)
    return rows


def _report(payload: dict) -> str:
    rows = payload["rows"]
    trees = payload["trees"]
    table = common.markdown_table(rows, COLUMNS)
    table += "\n\nTrees (fixed, seeded; `mean keys` = mean over nodes of ancestors + self): " + ", ".join(
        f"T={t}: depth {v['depth']}, mean keys {v['mean_tree_keys']:.2f}" for t, v in trees.items())
    wrong = [r for r in rows if r["err"] is not None and not r["err"] <= MAX_ERR]
    if wrong:
        table += (f"\n\nWRONG OUTPUTS: {len(wrong)} rows have a relative error above {MAX_ERR} against float32 SDPA "
                  "(their targets count as missed): " + ", ".join(
                      f"{r['backend']} B={r['B']} T={r['T']} prefix={r['prefix']}" for r in wrong))
    if payload["skipped"]:
        table += "\n\nSkipped:\n\n" + "\n".join(
            f"- {s['backend']} B={s['B']} T={s['T']} prefix={s['prefix']}: {s['reason']}" for s in payload["skipped"])
    failed = payload["failed_backends"]
    if failed:
        table += "\n\nBackends that failed (not timed after their first failure):\n\n" + "\n".join(
            f"- {name}: {why}" for name, why in failed.items())
    if payload["compact_rows"] or payload["compact_failed_backends"]:
        table += "\n\ncompact_kv (path " + str(COMPACT_PATH) + ", one call for all layers):\n\n" + \
            common.markdown_table(payload["compact_rows"], COMPACT_COLUMNS)
        if payload["compact_failed_backends"]:
            table += "\n\ncompact_kv backends that failed:\n\n" + "\n".join(
                f"- {name}: {why}" for name, why in payload["compact_failed_backends"].items())
    if payload["targets"]:
        table += "\n\nTargets (H100 goals of the tree-attention issue; every kernel backend and batch size):\n\n" + \
            common.markdown_table(payload["targets"], ["backend", "B", "T", "prefix", "target", "measured", "met"])
    return table


def check_targets(rows):
    """Per goal, kernel backend and batch size, two rows (vs floor, vs sdpa): the measured ratio and whether it
    meets the goal. A row whose output is wrong misses both; a case whose SDPA was skipped misses vs sdpa."""
    out = []
    for goal in TARGETS:
        for r in rows:
            if r["backend"] in (SDPA, FLOOR) or r["prefix"] != goal["prefix"] or r["T"] != goal["T"]:
                continue
            right = r.get("err") is None or r["err"] <= MAX_ERR
            where = dict(backend=r["backend"], B=r["B"], T=r["T"], prefix=r["prefix"])
            vf, vs = r.get("vs floor"), r.get("vs sdpa")
            out.append(dict(where, target=f"vs floor <= {goal['max_vs_floor']}",
                            measured=f"{vf:.2f}x" if vf is not None else "no floor",
                            met=vf is not None and vf <= goal["max_vs_floor"] and right))
            out.append(dict(where, target=f"vs sdpa >= {goal['min_vs_sdpa']}",
                            measured=f"{vs:.2f}x" if vs is not None else "sdpa skipped",
                            met=vs is not None and vs >= goal["min_vs_sdpa"] and right))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--quick", action="store_true", help="on a GPU: T = 64, prefix 1K and 32K, B 1 and 8")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="q and the caches (default: bfloat16 on a GPU, float32 on the CPU; the kernels take "
                             "float16/bfloat16 only)")
    parser.add_argument("--backend", action="append", choices=list(backends.BACKENDS), default=None,
                        help="repeatable; default: the available kernel backends on a GPU, the reference on the CPU")
    parser.add_argument("--no-compact", action="store_true", help="skip the compact_kv table")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run(device, args.out, args.quick, dtype=DTYPES[args.dtype] if args.dtype else None, names=args.backend,
        compact=not args.no_compact)


if __name__ == "__main__":
    main()
