"""Fetching decoder layers one at a time, with a background prefetcher and reused buffers."""
from __future__ import annotations

import logging
import mmap
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import device as device_calls
from .layer_store import owned_buffer
from .quantization import CachedLayer, QuantizedTensor, codec_for, dequantize_cached, split_cached
from .quantization.codecs.base import Allocate

logger = logging.getLogger(__name__)


@dataclass
class LayerTiming:
    """Where one layer's time went in one pass (seconds; ``start`` from the pass start)."""

    step: int
    layer: int
    start: float = 0.0
    read_s: float = 0.0  # cache lookup + reading the entry's bytes
    dequant_s: float = 0.0  # codec work into the compute buffers (includes host→device copy)
    wait_s: float = 0.0  # compute thread waiting for the layer to be ready
    compute_s: float = 0.0  # the layer's forward
    nbytes: int = 0  # bytes of the cached entry
    resident: bool = False


@dataclass
class LoadedLayer:
    state: Dict[str, torch.Tensor]  # plain tensors (norms, biases; every weight when not packed)
    timing: LayerTiming
    slot: Optional[Dict[str, torch.Tensor]] = None
    ready: Optional[object] = None  # CUDA event the compute stream waits on
    qweights: Dict[str, QuantizedTensor] = field(default_factory=dict)  # linear path → prepared weight
    buffers: List[torch.Tensor] = field(default_factory=list)  # the prepared weights' pooled buffers
    read_buffer: Optional[mmap.mmap] = None  # the buffer its entry was read into (ReadBuffers), if any


class SlotPool:
    """Preallocated state-dict buffers reused layer after layer.

    Dequantizing into the same buffers each time keeps the allocator from holding a
    freed layer per step; the pool's size bounds how many streamed layers exist at once.
    """

    def __init__(self, size: int, device: torch.device, pin: bool = False) -> None:
        self.size, self.device = size, device
        self._free: "queue.Queue[Dict[str, torch.Tensor]]" = queue.Queue()
        self._made = 0
        self._lock = threading.Lock()

    def take(self, template: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        with self._lock:
            if self._free.empty() and self._made < self.size:
                self._made += 1
                return {k: torch.empty_like(v, device=self.device) for k, v in template.items()}
        slot = self._free.get()
        if any(k not in slot or slot[k].shape != v.shape or slot[k].dtype != v.dtype for k, v in template.items()):
            # A layer of another shape (rare: heterogeneous stacks): give it fresh buffers.
            slot = {k: torch.empty_like(v, device=self.device) for k, v in template.items()}
        return slot

    def give(self, slot: Dict[str, torch.Tensor]) -> None:
        self._free.put(slot)

    @property
    def made(self) -> int:
        """How many slots exist (never more than ``size``, except for odd-shaped layers)."""
        return self._made


class BufferPool:
    """float32 buffers handed out by size and given back when their layer is released.

    What preparing a packed layer computes (a 7B layer's NF4 block maxima decoded: 12.6 MB) is
    written to buffers of the last layers released, not to fresh memory: fresh pages cost more
    to fault in than the decoding itself (docs/benchmarks.md)."""

    def __init__(self) -> None:
        self._free: Dict[int, List[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, numel: int) -> torch.Tensor:
        with self._lock:
            free = self._free.get(numel)
            if free:
                return free.pop()
        return torch.empty(numel, dtype=torch.float32)

    def give(self, buffers: List[torch.Tensor]) -> None:
        with self._lock:
            for buffer in buffers:
                self._free.setdefault(buffer.numel(), []).append(buffer)


class BuffersTaken(Exception):
    """Every :class:`ReadBuffers` buffer is held by a layer."""


class ReadBuffers:
    """Buffers that disk layers are read into past the page cache (:func:`sli.cache_disk.read_direct`),
    reused layer after layer: at most ``count`` exist, the memory plan's layers in flight.

    Each is an anonymous map asking for huge pages (:func:`sli.layer_store.owned_buffer`), its
    size rounded up to 2 MiB (to a page below that). :meth:`take` never waits: with every
    buffer held it raises :class:`BuffersTaken`, and that layer is read the other way (through
    the page cache). A pass's reads ahead are asked for once the layer before has been
    released, so in a pass this does not happen; it does where layers read ahead for a pass
    that did not come (another span of layers) still hold theirs, until their release or the
    streamer's cancel."""

    ROUND = 2 << 20  # a huge page
    PAGE = 4096

    def __init__(self, count: int) -> None:
        self.count = max(1, count)
        self._free: List[mmap.mmap] = []
        self._made = 0
        self._lock = threading.Lock()

    @classmethod
    def rounded(cls, size: int) -> int:
        """The bytes a buffer for ``size`` bytes takes: whole huge pages, or whole pages below one."""
        unit = cls.ROUND if size >= cls.ROUND else cls.PAGE
        return -(-max(1, size) // unit) * unit

    def take(self, size: int) -> mmap.mmap:
        size = self.rounded(size)
        with self._lock:
            fitting = next((b for b in self._free if len(b) >= size), None)
            if fitting is not None:
                self._free.remove(fitting)
                return fitting
            if self._free:  # too small for this layer (a stack of mixed shapes): make a larger one
                self._free.pop()
                self._made -= 1
            if self._made >= self.count:
                raise BuffersTaken(f"all {self.count} read buffers are held")
            self._made += 1
        return owned_buffer(size)

    def give(self, buffer: mmap.mmap) -> None:
        with self._lock:
            self._free.append(buffer)

    @property
    def made(self) -> int:
        """How many buffers exist (held or free)."""
        return self._made


@dataclass
class DirectRead:
    """A disk layer read ahead into a :class:`ReadBuffers` buffer. ``cached`` None: not read (not
    in the cache, unreadable, no buffer free: ``buffer`` None too), or already taken by the
    layer's fetch (whose release gives the buffer back) or given back unread."""

    cached: Optional[CachedLayer]
    buffer: Optional[mmap.mmap]
    read_s: float


class LayerStreamer:
    """Turns cached layers into ready-to-run state dicts, one step ahead of the compute.

    ``fetch_cached(i, owned)`` returns layer ``i``'s :class:`CachedLayer` (filling the cache on
    a miss; ``owned``: read into this process's memory, not mapped, for a layer that stays);
    ``templates[i]`` is a dict name → (shape, dtype) describing the dequantized layer.
    ``read_into(i, take)`` (packed layers only): layer ``i``'s cache entry read past the page
    cache into a buffer ``take(size)`` gives, or None where it is not cached; the disk layers'
    read ahead (:meth:`read_ahead`) then reads them whole, into :class:`ReadBuffers`, instead
    of into the page cache.
    """

    def __init__(self, fetch_cached: Callable[[int, bool], CachedLayer], device: torch.device, dtype: torch.dtype,
                 depth: int = 1, prefetch: bool = True, packed: bool = False,
                 page_in: Optional[Callable[[int], int]] = None,
                 read_into: Optional[Callable[[int, Callable[[int], mmap.mmap]], Optional[CachedLayer]]] = None
                 ) -> None:
        self.fetch_cached = fetch_cached
        self.page_in = page_in  # page_in(i): layer i's cached bytes into the page cache (LayerStore.page_in)
        self.read_into = read_into if packed else None
        self.device, self.dtype = device, dtype
        self.packed = packed  # linears stay as cached (for QuantizedLinear); CPU only
        self.depth = max(1, depth) if prefetch else 0
        self.pool = SlotPool(self.depth + 1, device)
        self.buffers = BufferPool()  # a packed layer's prepared scales, reused
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sli-prefetch") if prefetch else None
        self._pending: Dict[int, Future] = {}
        self._awaited: Optional[int] = None  # the layer the compute thread waits for in get()
        self._disk_reader = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="sli-read-ahead")
                             if prefetch and (page_in is not None or self.read_into is not None) else None)
        self.read_buffers = ReadBuffers(self.depth + 1)  # the layers in flight: the running one and those ahead
        self._read_ahead: Dict[int, Future] = {}  # layers read ahead, until released
        self._copy_stream = device_calls.copy_stream(device)
        self.step = 0

    def read_buffer_bytes(self, file_bytes: int) -> int:
        """What the :class:`ReadBuffers` take in memory once made, for layers whose cache files
        hold ``file_bytes`` (0 where layers are not read past the page cache)."""
        if self.read_into is None or self._disk_reader is None:
            return 0
        return self.read_buffers.count * ReadBuffers.rounded(file_bytes)

    @torch.inference_mode()
    def load(self, index: int, owned: bool = False) -> LoadedLayer:
        """Layer ``index`` ready to run, loaded on this thread (``owned``: its entry read into
        this process's memory, for a layer that stays resident)."""
        return self._ready(*self._read(index, owned), owned=owned)

    def _read(self, index: int, owned: bool) -> Tuple[CachedLayer, LayerTiming, Optional[mmap.mmap]]:
        """Layer ``index``'s entry, its timing, and the :class:`ReadBuffers` buffer it was read into
        (None: mapped, or read into memory of its own)."""
        timing = LayerTiming(step=self.step, layer=index)
        ahead = None if owned or self.read_into is None else self._read_ahead.get(index)
        if ahead is not None:
            direct = ahead.result() if ahead.exception() is None else None
            if isinstance(direct, DirectRead) and direct.cached is not None:
                timing.read_s, timing.nbytes = direct.read_s, direct.cached.nbytes
                cached, direct.cached = direct.cached, None  # the layer's release drops it, not this record
                return cached, timing, direct.buffer
        t0 = time.perf_counter()
        cached = self.fetch_cached(index, owned)
        timing.read_s, timing.nbytes = time.perf_counter() - t0, cached.nbytes
        return cached, timing, None

    @torch.inference_mode()
    def _ready(self, cached: CachedLayer, timing: LayerTiming, read_buffer: Optional[mmap.mmap] = None,
               owned: bool = False) -> LoadedLayer:
        t0 = time.perf_counter()
        loaded = self._packed(cached, timing, owned) if self.packed else self._dequantized(cached, timing)
        loaded.read_buffer = read_buffer
        del cached  # drop the entry (and its file mapping) before the next read
        timing.dequant_s = time.perf_counter() - t0
        return loaded

    @torch.inference_mode()
    def _prefetched(self, index: int) -> "LoadedLayer | Tuple[CachedLayer, LayerTiming]":
        """Layer ``index`` read, and readied too unless the compute thread already waits for it.
        Then that thread, idle anyway, readies it (:meth:`get`) and this one goes on to the
        next read at once: when reading is the bottleneck (a memory cap), preparing a 7B NF4
        layer (3.4 ms) no longer adds to every layer's read."""
        read = self._read(index, False)
        if self.packed and self._awaited == index:
            return read
        return self._ready(*read)

    def _packed(self, cached: CachedLayer, timing: LayerTiming, owned: bool) -> LoadedLayer:
        if owned:  # a resident layer keeps its buffers for good
            state, qweights = ready_packed(cached, self.dtype)
            return LoadedLayer(state, timing, qweights=qweights)
        taken: List[torch.Tensor] = []

        def allocate(numel: int) -> torch.Tensor:
            taken.append(self.buffers.take(numel))
            return taken[-1]

        state, qweights = ready_packed(cached, self.dtype, allocate)
        return LoadedLayer(state, timing, qweights=qweights, buffers=taken)

    def _dequantized(self, cached: CachedLayer, timing: LayerTiming) -> LoadedLayer:
        """The layer dequantized into a reused slot of compute-dtype buffers. On CUDA the host
        tensors are pinned and copied on a side stream, dequantized there, and an event tells
        the compute stream when the layer is ready; on CPU the same steps run in place."""
        with device_calls.side_stream_context(self._copy_stream):
            on_device = CachedLayer(device_calls.to_device(cached.tensors, self.device), cached.linears)
            slot = self.pool.take(_template(on_device, self.dtype))
            state = dequantize_cached(on_device, self.dtype, out=slot)
            ready = device_calls.record_ready(self.device, self._copy_stream)
        return LoadedLayer(state, timing, slot, ready=ready)

    def prefetch(self, index: int) -> None:
        if self._executor is None or index in self._pending:
            return
        self._pending[index] = self._executor.submit(self._prefetched, index)

    def read_ahead(self, index: int, into_page_cache: bool = False) -> None:
        """Start reading layer ``index``'s bytes on a thread of its own, past the page cache into
        a read buffer where layers are read so, else (or with ``into_page_cache``: a layer the
        page cache is to keep) into the page cache; unless done since its last release. A
        prefetch holds one of ``depth + 1`` slots, so it stops while the layers before it run;
        this read does not, and keeps the disk busy through layers that need none (resident, or
        kept in the page cache). The caller bounds how many such layers are read at once
        (:meth:`sli.layer_runner.LayerRunner._read_ahead`)."""
        if self._disk_reader is None or index in self._read_ahead:
            return
        if self.read_into is not None and not into_page_cache:
            self._read_ahead[index] = self._disk_reader.submit(self._read_direct, index)
        elif self.page_in is not None:
            self._read_ahead[index] = self._disk_reader.submit(self.page_in, index)

    def _read_direct(self, index: int) -> DirectRead:
        held: List[mmap.mmap] = []  # the buffer read_into took, if it took one

        def take(size: int) -> mmap.mmap:
            held.append(self.read_buffers.take(size))
            return held[0]

        t0, cached = time.perf_counter(), None
        try:
            cached = self.read_into(index, take)
        except BuffersTaken:  # the layer's fetch reads it through the page cache
            pass
        finally:
            if cached is None and held:
                self.read_buffers.give(held.pop())
        return DirectRead(cached, held[0] if held else None, time.perf_counter() - t0)

    def _give_back_unread(self, future: Future) -> None:
        """A direct read ahead whose layer never took it: its buffer back to the pool."""
        direct = future.result() if future.exception() is None else None
        if isinstance(direct, DirectRead) and direct.cached is not None:
            direct.cached = None
            self.read_buffers.give(direct.buffer)

    def get(self, index: int) -> LoadedLayer:
        """Layer ``index`` ready to run: prefetched, or loaded now. ``wait_s`` is the time the
        layer was not ready for, readying it here included."""
        t0 = time.perf_counter()
        future = self._pending.pop(index, None)
        self._awaited = index
        try:
            loaded = future.result() if future is not None else self.load(index)
        finally:
            self._awaited = None
        if isinstance(loaded, tuple):  # read, not readied: the reader left that to this thread
            loaded = self._ready(*loaded)
        loaded.timing.wait_s = time.perf_counter() - t0
        loaded.timing.step = self.step  # a layer prefetched during the previous pass runs in this one
        device_calls.wait_ready(self.device, loaded.ready)
        return loaded

    def release(self, loaded: LoadedLayer) -> None:
        """Give back what a streamed layer borrowed, once nothing computes with it any more."""
        ahead = self._read_ahead.pop(loaded.timing.layer, None)
        if ahead is not None:  # done before the layer's pages may be dropped: a late one would read them back
            self._give_back_unread(ahead)
        if loaded.read_buffer is not None:  # nothing views it any more: the runner unloaded the layer
            self.read_buffers.give(loaded.read_buffer)
            loaded.read_buffer = None
        if loaded.buffers:
            self.buffers.give(loaded.buffers)
            loaded.buffers = []
        if loaded.slot is not None:
            if loaded.ready is not None:
                # The side stream must not overwrite this slot before compute is done with it.
                device_calls.synchronize(self.device)
            self.pool.give(loaded.slot)

    def cancel(self) -> None:
        """Drop prefetched layers (after an error, or when a pass ends early)."""
        for future in self._pending.values():
            try:
                loaded = future.result()
                if isinstance(loaded, tuple):  # read, not readied: only its buffer to give back
                    loaded = LoadedLayer({}, loaded[1], read_buffer=loaded[2])
                self.release(loaded)
            except Exception:  # the error surfaces when the layer is asked for again
                logger.debug("prefetch failed", exc_info=True)
        self._pending.clear()
        for future in self._read_ahead.values():
            self._give_back_unread(future)  # a read ahead is advisory: wait for it, whatever it met
        self._read_ahead.clear()

    def close(self) -> None:
        self.cancel()
        for executor in (self._executor, self._disk_reader):
            if executor is not None:
                executor.shutdown(wait=True)


def ready_packed(cached: CachedLayer, dtype: torch.dtype, allocate: Optional[Allocate] = None,
                 ) -> "tuple[Dict[str, torch.Tensor], Dict[str, QuantizedTensor]]":
    """A cache entry made ready for :class:`QuantizedLinear`: (plain state in ``dtype``, prepared weights).

    Linear weights stay as the entry holds them (views of its read buffer); only what the
    kernels need precomputed is added, in buffers from ``allocate`` where given (see
    :meth:`Codec.prepare`). Norms and biases are small and converted.
    """
    qweights, plain = split_cached(cached)
    prepared = {path: codec_for(q.metadata["codec"]).prepare(q, allocate) for path, q in qweights.items()}
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in plain.items()}
    return state, prepared


def ready_bytes(cached: CachedLayer, dtype: torch.dtype) -> int:
    """Bytes a packed layer holds while loaded: the entry's buffer plus what readying adds."""
    state, prepared = ready_packed(cached, dtype)
    added = sum(t.numel() * t.element_size() for q in prepared.values() for k, t in q.tensors.items() if k.startswith("_"))
    converted = sum(t.numel() * t.element_size() for k, t in state.items() if t.dtype != cached.tensors[k].dtype)
    return cached.nbytes + added + converted


def _template(cached: CachedLayer, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Meta tensors shaped like the dequantized layer (what a slot must hold)."""
    template: Dict[str, torch.Tensor] = {}
    linear_weights = {f"{p}.weight": meta for p, meta in cached.linears.items()}
    for name, meta in linear_weights.items():
        out_f, in_f = meta["shape"]
        shape = (in_f, out_f) if meta.get("transposed") else (out_f, in_f)
        template[name] = torch.empty(shape, dtype=dtype, device="meta")
    owners = sorted(cached.linears, key=len, reverse=True)
    for name, tensor in cached.tensors.items():
        owner = next((p for p in owners if name.startswith(p + ".")), None)
        if owner is not None and name != owner + ".bias":
            continue
        if tensor.is_floating_point():
            template[name] = torch.empty(tensor.shape, dtype=dtype, device="meta")
    return template
