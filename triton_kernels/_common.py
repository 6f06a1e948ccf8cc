"""Host-side helpers shared by the Triton kernel modules (like them, it imports nothing from the package)."""

import functools

import torch

INTERPRETER_SMS = 4  # CPU tensors run under the interpreter: a few programs, so CPU tests reach the split paths


@functools.lru_cache(maxsize=None)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (how many programs fill it); :data:`INTERPRETER_SMS` off CUDA."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _device_sms(device.index if device.index is not None else torch.cuda.current_device())
