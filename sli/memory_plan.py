"""How a memory budget is spent: a pure function of the sizes involved."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from .settings import GB


@dataclass
class MemoryPlan:
    """How the memory budget is spent (bytes)."""

    budget: Optional[int]
    shared_bytes: int  # embeddings, final norm, head, rotary: always resident
    layer_bytes: int  # one ready decoder layer (CPU: its cached bytes + kernel tables; CUDA: dequantized)
    streaming_bytes: int  # layers in flight (running + prefetched) and one prompt-sized work buffer
    runtime_bytes: int = 0  # the kernels' runtime (numba), paid once
    kv_bytes: int = 0  # keys and values of the planned context held in memory
    resident_layers: List[int] = field(default_factory=list)
    kv_spilled_layers: List[int] = field(default_factory=list)  # layers whose KV waits on disk
    kv_spilled_bytes: int = 0

    @property
    def fixed_bytes(self) -> int:
        """What the plan needs before any layer is resident."""
        return self.shared_bytes + self.streaming_bytes + self.runtime_bytes + self.kv_bytes

    @property
    def over_budget(self) -> bool:
        """True when even streaming every layer needs more than the (set) budget."""
        return self.budget is not None and self.fixed_bytes > self.budget

    def describe(self) -> str:
        b = "unbounded" if self.budget is None else f"{self.budget / GB:.2f} GB"
        return (f"budget {b}: shared {self.shared_bytes / GB:.2f} GB, {len(self.resident_layers)} resident layers "
                f"of {self.layer_bytes / GB:.3f} GB, streaming {self.streaming_bytes / GB:.3f} GB, "
                f"KV {self.kv_bytes / GB:.3f} GB in memory + {self.kv_spilled_bytes / GB:.3f} GB on disk "
                f"({len(self.kv_spilled_layers)} layers), kernels {self.runtime_bytes / GB:.2f} GB")


def plan_memory(budget: Optional[int], *, num_layers: int, shared_bytes: int, layer_bytes: int, scratch_bytes: int,
                prefetch_depth: int, runtime_bytes: int, available_bytes: int, kv_layer_bytes: int = 0,
                kv_can_spill: bool = False) -> MemoryPlan:
    """Which layers stay resident under ``budget`` (bytes; None: ``available_bytes``).

    The shared modules, the layers in flight (the running one plus ``prefetch_depth``
    prefetched), one prompt work buffer, the kernels' runtime and the keys and values of the
    planned context (``kv_layer_bytes`` a layer) come first; when a set budget cannot hold every
    layer's keys and values and they can spill, the last layers' KV waits on disk and one
    layer's is counted in flight; the rest of the
    budget holds whole layers, from the first, that are then never streamed again.

    >>> plan_memory(1000, num_layers=8, shared_bytes=100, layer_bytes=100, scratch_bytes=0,
    ...             prefetch_depth=1, runtime_bytes=0, available_bytes=0).resident_layers
    [0, 1, 2, 3, 4, 5, 6]
    """
    streaming = (prefetch_depth + 1) * layer_bytes + scratch_bytes
    plan = MemoryPlan(budget, shared_bytes, layer_bytes, streaming, runtime_bytes, num_layers * kv_layer_bytes)
    if budget is not None and kv_can_spill and kv_layer_bytes and plan.fixed_bytes > budget:
        room = budget - (shared_bytes + streaming + runtime_bytes) - kv_layer_bytes  # one spilled layer in flight
        kept = int(max(0, min(num_layers, room // kv_layer_bytes)))
        plan.kv_spilled_layers = list(range(kept, num_layers))
        plan.kv_spilled_bytes = len(plan.kv_spilled_layers) * kv_layer_bytes
        plan.kv_bytes = (kept + (1 if plan.kv_spilled_layers else 0)) * kv_layer_bytes
    spare = (budget if budget is not None else available_bytes) - plan.fixed_bytes
    count = max(0, min(num_layers, spare // layer_bytes if layer_bytes else 0))
    plan.resident_layers = list(range(int(count)))
    return plan
