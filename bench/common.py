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


def time_eager(calls: Sequence[Callable[[], object]], device: torch.device, reps: int = 50) -> float:
    """Median microseconds per call without a CUDA graph: each call timed on its own with CUDA events, cycling
    through ``calls``. For calls that synchronise with the host (the reference backends), which graph capture
    forbids. Off a GPU it is :func:`time_calls`."""
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
    return statistics.median(samples)


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


def write_results(out_dir: str, family: str, payload: dict, table: str) -> str:
    """Write ``<out_dir>/<device>/<family>.json`` and ``.md``; return the folder."""
    folder = os.path.join(out_dir, device_slug(payload["device"]))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{family}.json"), "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(folder, f"{family}.md"), "w") as f:
        f.write(f"# {family} on {payload['device']['name']}\n\n{payload.get('note', '')}\n\n{table}\n")
    return folder
