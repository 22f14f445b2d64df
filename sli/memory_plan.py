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
    num_layers: int = 0
    page_dropped_layers: List[int] = field(default_factory=list)  # streamed layers whose pages are dropped after use
    available_bytes: int = 0  # what a plan without a budget spends (sli.device.available_bytes)
    layers_in_flight: int = 1  # the running streamed layer and those prefetched (counted in streaming_bytes)
    read_buffer_bytes: int = 0  # what streaming_bytes adds for the read buffers beside mapped layers (split_streamed)

    @property
    def fixed_bytes(self) -> int:
        """What the plan needs before any layer is resident."""
        return self.shared_bytes + self.streaming_bytes + self.runtime_bytes + self.kv_bytes

    @property
    def streamed_layers(self) -> List[int]:
        """The layers read from the cache every pass."""
        resident = set(self.resident_layers)
        return [i for i in range(self.num_layers) if i not in resident]

    @property
    def pending_bytes(self) -> int:
        """What the plan adds once the model is loaded (the shared modules and the kernels'
        runtime are in memory by then): resident layers, layers in flight, keys and values."""
        return len(self.resident_layers) * self.layer_bytes + self.streaming_bytes + self.kv_bytes

    def split_streamed(self, page_cache_room: int, read_buffers: int = 0) -> None:
        """Which streamed layers keep their pages in the page cache: as many as ``page_cache_room``
        bytes hold; the others' pages are dropped as each is used (:mod:`sli.page_cache`), and
        they are read from the disk every pass. All keep them when they all fit. Where some do
        not, the layers that need no read are spread among those that do
        (:meth:`_spread_among_disk_layers`).

        ``read_buffers``: the bytes of the buffers the dropped layers are read into past the page
        cache (:class:`sli.streaming.ReadBuffers`; 0 where they are not), in memory for good once
        made. While kept layers run, mapped, those buffers already hold the next dropped layers
        read ahead: the kept layers in flight at once (:meth:`_kept_in_flight`) beside the
        buffers, where ``streaming_bytes`` counted ``layers_in_flight`` layers in all. The
        difference is added to ``streaming_bytes``, and resident layers that no longer fit the
        budget are streamed.

        >>> plan = plan_memory(400, num_layers=8, shared_bytes=100, layer_bytes=100, scratch_bytes=0,
        ...                    prefetch_depth=1, runtime_bytes=0, available_bytes=0)
        >>> plan.resident_layers, len(plan.streamed_layers)
        ([0], 7)
        >>> plan.split_streamed(250)
        >>> plan.resident_layers, plan.page_dropped_layers  # 1 resident and 2 kept, spread among the 5 read
        ([1], [0, 2, 3, 5, 7])
        >>> plan = plan_memory(500, num_layers=8, shared_bytes=100, layer_bytes=100, scratch_bytes=0,
        ...                    prefetch_depth=1, runtime_bytes=0, available_bytes=0)
        >>> plan.split_streamed(250, read_buffers=200), plan.resident_layers, plan.page_dropped_layers
        (None, [1], [0, 2, 3, 5, 7])
        >>> plan.streaming_bytes  # 2 layers in flight, + 2 buffers beside 1 kept layer
        300
        """
        while True:
            streamed = self.streamed_layers
            kept = int(min(len(streamed), page_cache_room // self.layer_bytes) if self.layer_bytes else len(streamed))
            self.page_dropped_layers = streamed[kept:]
            mapped = self._kept_in_flight(kept)  # kept layers in flight beside full buffers
            extra = (max(0, read_buffers + (mapped - self.layers_in_flight) * self.layer_bytes)
                     if read_buffers and self.page_dropped_layers else 0)
            if extra <= self.read_buffer_bytes:
                break
            self.streaming_bytes += extra - self.read_buffer_bytes
            self.read_buffer_bytes = extra
            self.resident_layers = self.resident_layers[:self._resident_count()]
        self._spread_among_disk_layers()

    def _kept_in_flight(self, kept: int) -> int:
        """How many of ``kept`` kept layers can be in flight at once once spread: the most of them
        among any ``layers_in_flight`` streamed layers in a row (the running one and those
        prefetched; a pass's last layers run before the next pass's first). Spread among disk
        layers with a prefetch depth of 1, a kept layer is followed by a disk layer, so one.

        >>> MemoryPlan(None, 0, 100, 0, num_layers=8, layers_in_flight=2)._kept_in_flight(2)
        1
        >>> MemoryPlan(None, 0, 100, 0, num_layers=8, layers_in_flight=2)._kept_in_flight(6)
        2
        >>> MemoryPlan(None, 0, 100, 0, num_layers=8, layers_in_flight=4)._kept_in_flight(3)  # kept 1, 4, 6
        2
        """
        resident = len(self.resident_layers)
        window = self.layers_in_flight
        if not kept or resident + kept >= self.num_layers:
            return min(window, kept)
        places = _spread_places(self.num_layers, resident + kept)
        resident_places, kept_places = set(places[:resident]), set(places[resident:])
        is_kept = [i in kept_places for i in range(self.num_layers) if i not in resident_places]
        ring = is_kept + is_kept[:window - 1]
        return max(sum(ring[start:start + window]) for start in range(len(is_kept)))

    def _spread_among_disk_layers(self) -> None:
        """Place the layers that need no read from the disk (resident, then kept) evenly among
        those that do, instead of first. Reading is then the bottleneck of a pass, and the read
        ahead holds only the next ``layers_in_flight`` disk layers: behind a stretch of layers
        that need no read it stops while they run (7B NF4 under a 2 GB cap: 8 such layers first,
        ~40 ms of a 0.49 s token; docs/benchmarks.md). Spread out, each runs while the disk
        reads on.

        >>> plan = MemoryPlan(None, 0, 100, 0, num_layers=12, resident_layers=[0, 1])
        >>> plan.split_streamed(200)
        >>> plan.resident_layers, plan.streamed_layers, plan.page_dropped_layers
        ([1, 4], [0, 2, 3, 5, 6, 7, 8, 9, 10, 11], [0, 2, 3, 5, 6, 8, 9, 11])
        """
        resident = len(self.resident_layers)
        quiet = resident + len(self.streamed_layers) - len(self.page_dropped_layers)
        if not self.page_dropped_layers or not quiet:
            return
        places = _spread_places(self.num_layers, quiet)
        self.resident_layers = places[:resident]
        self.page_dropped_layers = [i for i in range(self.num_layers) if i not in places]

    def _resident_count(self) -> int:
        """How many whole layers the budget (or the available memory) holds past the fixed bytes."""
        spare = (self.budget if self.budget is not None else self.available_bytes) - self.fixed_bytes
        return int(max(0, min(self.num_layers, spare // self.layer_bytes if self.layer_bytes else 0)))

    @property
    def over_budget(self) -> bool:
        """True when even streaming every layer needs more than the (set) budget."""
        return self.budget is not None and self.fixed_bytes > self.budget

    def describe(self) -> str:
        b = (f"none given, {self.available_bytes / GB:.2f} GB planned from the free memory" if self.budget is None
             else f"{self.budget / GB:.2f} GB")
        return (f"budget {b}: shared {self.shared_bytes / GB:.2f} GB, {len(self.resident_layers)} resident layers "
                f"of {self.layer_bytes / GB:.3f} GB, streaming {self.streaming_bytes / GB:.3f} GB, "
                f"KV {self.kv_bytes / GB:.3f} GB in memory + {self.kv_spilled_bytes / GB:.3f} GB on disk "
                f"({len(self.kv_spilled_layers)} layers), kernels {self.runtime_bytes / GB:.2f} GB"
                + (f"; page cache keeps {len(self.streamed_layers) - len(self.page_dropped_layers)} of "
                   f"{len(self.streamed_layers)} streamed layers" if self.page_dropped_layers else "")
                + (f" (streaming counts {self.read_buffer_bytes / GB:.3f} GB of read buffers beside mapped layers)"
                   if self.read_buffer_bytes else ""))


def _spread_places(num_layers: int, quiet: int) -> List[int]:
    """Where ``quiet`` layers that need no read sit, evenly among ``num_layers``."""
    return [(2 * i + 1) * num_layers // (2 * quiet) for i in range(quiet)]


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
    plan = MemoryPlan(budget, shared_bytes, layer_bytes, streaming, runtime_bytes, num_layers * kv_layer_bytes,
                      num_layers=num_layers, available_bytes=available_bytes, layers_in_flight=prefetch_depth + 1)
    if budget is not None and kv_can_spill and kv_layer_bytes and plan.fixed_bytes > budget:
        room = budget - (shared_bytes + streaming + runtime_bytes) - kv_layer_bytes  # one spilled layer in flight
        kept = int(max(0, min(num_layers, room // kv_layer_bytes)))
        plan.kv_spilled_layers = list(range(kept, num_layers))
        plan.kv_spilled_bytes = len(plan.kv_spilled_layers) * kv_layer_bytes
        plan.kv_bytes = (kept + (1 if plan.kv_spilled_layers else 0)) * kv_layer_bytes
    plan.resident_layers = list(range(plan._resident_count()))
    return plan
