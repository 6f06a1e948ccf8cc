"""Benchmark plumbing shared by every family: device facts, peaks, timing, result files.

GPU timing replays a CUDA graph that runs every call once over input buffers rotating
through more than twice the L2 size, and reports the median over replays of the time
per call (CUDA events). Graph replay removes Python and launch overhead, which is what
a decode step captured in a graph sees. Peaks (copy bandwidth, dense bf16 matmul) are
measured in the same run so that every row can be read as a fraction of the machine.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from typing import Callable, List, Sequence

import torch


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


def time_calls(calls: Sequence[Callable[[], object]], device: torch.device, reps: int = 50) -> float:
    """Median microseconds per call, cycling through ``calls`` (one per rotating input buffer)."""
    for call in calls[:2]:  # compile / autotune outside the timed region
        call()
    if device.type != "cuda":
        samples = []
        for r in range(reps):
            call = calls[r % len(calls)]
            start = time.perf_counter()
            call()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1e6
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
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3 / len(calls)


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


def write_results(out_dir: str, family: str, payload: dict, table: str) -> str:
    """Write ``<out_dir>/<device>/<family>.json`` and ``.md``; return the folder."""
    folder = os.path.join(out_dir, device_slug(payload["device"]))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{family}.json"), "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(folder, f"{family}.md"), "w") as f:
        f.write(f"# {family} on {payload['device']['name']}\n\n{payload.get('note', '')}\n\n{table}\n")
    return folder
