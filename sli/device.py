"""The CUDA calls sli makes (streams, events, pinned memory, free memory), behind one module.

Everything else treats the device as data: the dequantize strategy runs the same logic on
CPU (where these calls are no-ops or plain copies), so CI tests it without a GPU.
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch

from . import page_cache


def resolve(device: Union[str, torch.device, None]) -> torch.device:
    """``device``, or CUDA when torch sees a GPU, else CPU. Raises ``ValueError`` for a device
    sli cannot run on."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device={device!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but torch sees no CUDA GPU; use device='cpu'")
    return resolved


def copy_stream(device: torch.device) -> Optional["torch.cuda.Stream"]:
    """A side stream for host→device copies on CUDA; None elsewhere."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def pinned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in page-locked host memory (itself when it already is): CUDA copies it to the GPU
    asynchronously and at full bus speed; from pageable memory every copy is staged first."""
    return tensor if tensor.is_pinned() else tensor.pin_memory()


def to_device(tensors: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    """``tensors`` on ``device``: on CUDA pinned first, so the copy on the current (side)
    stream is truly asynchronous; as they are on CPU."""
    if device.type != "cuda":
        return tensors
    return {k: pinned(v).to(device, non_blocking=True) for k, v in tensors.items()}


def record_ready(device: torch.device, stream: Optional["torch.cuda.Stream"]):
    """An event marking work queued on ``stream`` so far (None off CUDA)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def wait_ready(device: torch.device, event) -> None:
    """Make the compute stream wait for ``event`` (nothing off CUDA)."""
    if event is not None:
        torch.cuda.current_stream(device).wait_event(event)


def synchronize(device: torch.device) -> None:
    """Wait for the compute stream (nothing off CUDA)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def side_stream_context(stream: Optional["torch.cuda.Stream"]):
    """Run the enclosed work on ``stream`` (CUDA) or as is."""
    import contextlib

    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def available_bytes(device: torch.device) -> int:
    """What a plan without a budget may use: 80% of free GPU memory, or half the memory this
    process can still take (a cgroup's limit included: :func:`sli.page_cache.memory_available`)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * 0.8)
    return int(page_cache.memory_available() * 0.5)
