"""The processor's options checked and resolved before anything loads: the strategy for the
device, the quantizer from whatever names one, the key/value dtype, the memory budget in
bytes; and glibc told to give freed layer buffers back to the OS."""
from __future__ import annotations

from typing import Optional

import torch

from .kv_cache import KV_DTYPES
from .quantization import LayerQuantizer, QuantizationConfig
from .settings import GB

# "packed": linears multiply by the cached bytes (CPU); "dequantize": each layer is
# dequantized into reused compute-dtype buffers and runs as plain modules (CUDA, or CPU).
STRATEGIES = ("packed", "dequantize")


def choose_strategy(strategy: Optional[str], device: torch.device) -> str:
    """``strategy``, or the device's default ("packed" on CPU, "dequantize" elsewhere).
    Raises ``ValueError`` for an unknown one, or "packed" off CPU."""
    default = "packed" if device.type == "cpu" else "dequantize"
    strategy = strategy or default
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {', '.join(STRATEGIES)}")
    if strategy == "packed" and device.type != "cpu":
        raise ValueError("strategy='packed' runs on CPU only (its kernels are CPU kernels); "
                         "use strategy='dequantize' on CUDA")
    return strategy


def as_quantizer(quantization_config) -> LayerQuantizer:
    """A :class:`LayerQuantizer` (an :class:`AdaptiveQuantizer` too) as it is; a config, a mode
    name or None (no quantization) wrapped in one."""
    if isinstance(quantization_config, LayerQuantizer):
        return quantization_config
    if isinstance(quantization_config, QuantizationConfig):
        return LayerQuantizer(quantization_config)
    if isinstance(quantization_config, str) or quantization_config is None:
        return LayerQuantizer(QuantizationConfig(mode=quantization_config or "none"))
    raise TypeError("quantization_config must be a QuantizationConfig, an AdaptiveQuantizer, a mode name or None")


def check_kv_options(kv_dtype: str, prefill_chunk_tokens: Optional[int]) -> None:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype={kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
    if prefill_chunk_tokens is not None and prefill_chunk_tokens < 1:
        raise ValueError(f"prefill_chunk_tokens={prefill_chunk_tokens} must be >= 1")


def budget_bytes(device: torch.device, max_gpu_memory_gb: Optional[float],
                 memory_budget_gb: Optional[float]) -> Optional[int]:
    """The memory budget that applies on ``device`` (GPU memory on CUDA, RAM on CPU), in bytes."""
    budget_gb = max_gpu_memory_gb if device.type == "cuda" else memory_budget_gb
    return int(budget_gb * GB) if budget_gb is not None else None


def return_freed_buffers_to_the_os() -> None:
    """Make glibc serve large allocations with mmap, always.

    glibc raises its mmap threshold after large blocks are freed (up to 32 MB), after
    which freed layer buffers stay in the heap and count against RSS. A fixed threshold
    keeps layer-sized buffers mmapped, so freeing one gives the memory back at once.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
