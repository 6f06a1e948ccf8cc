"""Benchmark plumbing shared by every family: device facts, peaks, timing, result files.

GPU timing replays a CUDA graph that runs every call once over input buffers rotating
through more than twice the L2 size, and reports the median over replays of the time
per call (CUDA events), with the 10th and 90th percentiles and the repeat count
(:class:`Timing`; the result files carry them as ``<column>_p10``, ``<column>_p90``,
``<column>_reps``). Graph replay removes Python and launch overhead, which is what a decode
step captured in a graph sees. Peaks (copy bandwidth, dense bf16 matmul) are
measured in the same run so that every row can be read as a fraction of the machine.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.nn.attention import SDPBackend


def device_info(device: torch.device) -> dict:
    """Name, driver, clocks and library versions of the machine the run is on."""
    import efficient_ops

    info = {"torch": torch.__version__, "efficient_ops": efficient_ops.__version__,
            "python": platform.python_version(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type != "cuda":
        info.update(kind="cpu", name=platform.processor() or platform.machine(), cpus=os.cpu_count())
        return info
    props = torch.cuda.get_device_properties(device)
    info.update(kind="cuda", name=props.name, capability=f"{props.major}.{props.minor}",
                sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2 ** 30, 1),
                cuda_runtime=torch.version.cuda)
    try:  # driver and clocks from NVML; optional
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        info["sm_clock_mhz"] = pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
        info["sm_clock_max_mhz"] = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)
        info["mem_clock_max_mhz"] = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        info["power_limit_w"] = pynvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000
    except Exception as exc:  # no NVML: record why, keep going
        info["nvml"] = f"unavailable: {exc}"
    return info


def device_slug(info: dict) -> str:
    """Folder name for results: the device name with spaces and odd characters replaced."""
    return "cpu" if info["kind"] == "cpu" else re.sub(r"[^A-Za-z0-9.]+", "-", info["name"]).strip("-")


class Timing(float):
    """Median microseconds per call, as a float (call sites compute with it as before), carrying the spread of
    the repeats: ``p10``, ``p90`` (microseconds) and ``reps``. :func:`write_results` stores them next to it."""

    def __new__(cls, samples_us: Sequence[float]):
        samples = sorted(samples_us)
        self = super().__new__(cls, statistics.median(samples))
        deciles = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
        self.p10, self.p90, self.reps = deciles[0], deciles[-1], len(samples)
        return self


def time_calls(calls: Sequence[Callable[[], object]], device: torch.device, reps: int = 50) -> Timing:
    """Microseconds per call over ``reps`` repeats (median and spread), cycling through ``calls`` (one per
    rotating input buffer); on a GPU each repeat is one replay of a CUDA graph of every call."""
    for call in calls[:2]:  # compile / autotune outside the timed region
        call()
    if device.type != "cuda":
        samples = []
        for r in range(reps):
            call = calls[r % len(calls)]
            start = time.perf_counter()
            call()
            samples.append((time.perf_counter() - start) * 1e6)
        return Timing(samples)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for call in calls:  # warm every buffer once, off the capture
            call()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize(device)
    del graph
    return Timing([s.elapsed_time(e) * 1e3 / len(calls) for s, e in events])


def time_eager(calls: Sequence[Callable[[], object]], device: torch.device, reps: int = 50) -> Timing:
    """Microseconds per call (median and spread) without a CUDA graph: each call timed on its own with CUDA
    events, cycling through ``calls``. For calls that synchronise with the host (the reference backends),
    which graph capture forbids. Off a GPU it is :func:`time_calls`."""
    if device.type != "cuda":
        return time_calls(calls, device, reps=reps)
    for call in calls[:2]:
        call()
    torch.cuda.synchronize(device)
    samples = []
    for r in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        calls[r % len(calls)]()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
    return Timing(samples)


def rotations(bytes_per_set: int, device: torch.device) -> int:
    """How many input sets to rotate through so that they do not fit in L2 (at least 2x L2)."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2 ** 20)
    return max(1, min(64, -(-2 * l2 // max(bytes_per_set, 1))))


def measure_peaks(device: torch.device) -> dict:
    """Copy bandwidth (GB/s, read + write) and dense bf16 matmul (TFLOP/s), measured now."""
    if device.type != "cuda":
        return {"copy_gbps": None, "matmul_tflops": None}
    n = 256 * 2 ** 20  # 1 GiB of float32 each way
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    copy_us = time_calls([lambda: dst.copy_(src)], device, reps=20)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_us = time_calls([lambda: a @ b], device, reps=20)
    return {"copy_gbps": 2 * 4 * n / copy_us / 1e3, "matmul_tflops": 2 * 8192 ** 3 / mm_us / 1e6}


def start_run(device: torch.device, note: str) -> Tuple[dict, dict]:
    """What every run starts with: print ``note`` (if any), then return :func:`device_info` and :func:`measure_peaks`
    of ``device``."""
    if note:
        print(note)
    return device_info(device), measure_peaks(device)


def kernel_backends(device: torch.device) -> Tuple[List[str], Dict[str, str]]:
    """The kernel backends (cuda, triton, in that order) that can run on ``device``, and for each one that
    cannot, the reason as ``"unavailable: <why>"`` (the form the results' failed-backend lists use)."""
    from efficient_ops import backends

    names, unavailable = [], {}
    for name in ("cuda", "triton"):
        reason = backends.device_status(name, device)
        if reason is None:
            names.append(name)
        else:
            unavailable[name] = f"unavailable: {reason}"
    return names, unavailable


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ``||out - ref|| / ||ref||`` (Frobenius, in float64); inf when ``out`` is not finite."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def sdpa_choice(q, k, v, attn_mask=None, is_causal: bool = False) -> Optional[str]:
    """The backend ``F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=is_causal, enable_gqa=True)``
    would run on, lower case (``flash_attention``, ``math``, ...), from torch's private ``torch._fused_sdp_choice``;
    None when it cannot tell."""
    try:
        choice = torch._fused_sdp_choice(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal, scale=None,
                                         enable_gqa=True)
        return SDPBackend(choice).name.lower()
    except Exception:
        return None


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message ("" when it has none): CUDA errors append long hints after it."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def why(exc: BaseException) -> str:
    """``exc`` as a one-line reason for the results: ``"<type>: <first line of the message>"``."""
    return f"{type(exc).__name__}: {first_line(exc)}"


def free_memory(device: torch.device) -> Optional[int]:
    """Free GPU memory in bytes after releasing PyTorch's cached blocks; None off a GPU."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def clean_up(device: torch.device) -> None:
    """Wait for the GPU (ignoring an error a failed kernel left behind) and release PyTorch's cached memory, so
    that the next case starts from free memory; nothing off a GPU."""
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except Exception:
            pass
        torch.cuda.empty_cache()


def markdown_table(rows: List[dict], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` over ``columns`` (floats to 3 significant digits, None as '-')."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def source_commit() -> Optional[str]:
    """The git commit of the efficient_ops sources being run (``+dirty`` with uncommitted changes) when the
    package is imported from a git checkout (an editable install); None for an installed wheel."""
    import efficient_ops

    package = os.path.dirname(os.path.abspath(efficient_ops.__file__))
    try:
        top = subprocess.run(["git", "-C", package, "rev-parse", "--show-toplevel"], check=False,
                             capture_output=True, text=True, timeout=10)
        if top.returncode != 0 or os.path.realpath(os.path.join(top.stdout.strip(), "efficient_ops")) != \
                os.path.realpath(package):
            return None  # not a checkout of this project (e.g. site-packages inside some other repository)
        head = subprocess.run(["git", "-C", package, "rev-parse", "HEAD"], check=False, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", package, "status", "--porcelain", "--untracked-files=no"],
                               check=False, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + "+dirty" if dirty else head) or None


def run_info(quick: bool) -> dict:
    """What identifies a run beyond the device: quick or full, the package version and source commit, the
    command line and how times are summarised."""
    import efficient_ops

    return {"mode": "quick" if quick else "full", "efficient_ops": efficient_ops.__version__,
            "commit": source_commit(), "command": " ".join(sys.argv),
            "timing": "per case: median microseconds per call over the repeats, with p10/p90 and the repeat "
                      "count as <column>_p10, <column>_p90, <column>_reps"}


def _spread_columns(payload: dict) -> None:
    """Next to every :class:`Timing` in the payload's row lists, add its ``_p10``, ``_p90`` and ``_reps``."""
    for rows in payload.values():
        if isinstance(rows, list):
            for row in rows:
                if isinstance(row, dict):
                    for key, value in list(row.items()):
                        if isinstance(value, Timing):
                            row.update({f"{key}_p10": value.p10, f"{key}_p90": value.p90, f"{key}_reps": value.reps})


def write_results(out_dir: str, family: str, payload: dict, table: str, *, quick: bool) -> str:
    """Write ``<out_dir>/<device>/<family>.json`` and ``.md`` (``<family>-quick.*`` for a quick run, so that it
    never overwrites a full one), with :func:`run_info` in ``payload["run"]``; return their path without the
    extension."""
    folder = os.path.join(out_dir, device_slug(payload["device"]))
    os.makedirs(folder, exist_ok=True)
    payload["run"] = run_info(quick)
    _spread_columns(payload)
    name = f"{family}-quick" if quick else family
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=1)
    run, device = payload["run"], payload["device"]
    with open(os.path.join(folder, f"{name}.md"), "w") as f:
        f.write(f"# {family} on {device['name']} ({run['mode']} run)\n\n"
                f"efficient_ops {run['efficient_ops']} (commit {run['commit'] or 'unknown: not a git checkout'}), "
                f"torch {device['torch']}, triton {device['triton']}, {device['time_utc']}; times are medians, "
                f"their p10/p90 and repeat counts are in {name}.json.\n\n{payload.get('note', '')}\n\n{table}\n")
    return os.path.join(folder, name)
