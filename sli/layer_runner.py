"""Runs a model's decoder layers one at a time from the layer cache.

The :class:`LayerRunner` owns what a streamed pass needs to know: which layers are resident,
which are in flight (fetched and running), what to prefetch next, and where each layer's time
went. It takes over each decoder layer's ``forward`` (no hooks, no shared attributes): the
model's own forward loops over its layers as usual, and each call fetches, runs and releases
its layer. :meth:`LayerRunner.run_range` runs any range of layers on given hidden states
(pipeline stages, calibration).
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, TypeVar

import torch
from torch import nn

from . import device as device_calls
from .decode_step import DecodeStep
from .kernels import team as kernel_team
from .quantization import QuantizedLinear
from .streaming import LayerStreamer, LayerTiming, LoadedLayer

T = TypeVar("T")
TIMINGS_KEPT = 100_000  # layer timings a runner keeps (about a thousand passes of a 70B model)


@dataclass
class LayerJob:
    """One piece of work for :meth:`LayerRunner.run_layer_major`: the hidden states entering
    layer 0 and, per layer, the other arguments its forward takes."""

    hidden: torch.Tensor
    layer_inputs: List[Tuple[tuple, dict]]  # per layer: (positional args after hidden, kwargs)
    returns_tuple: bool = False  # whether the layers return (hidden, ...) rather than hidden


class LayerRunner:
    """Fetches, runs and releases ``layers`` (a decoder stack whose parameters are on the meta
    device) through ``streamer``; see the module docstring."""

    def __init__(self, layers: nn.ModuleList, streamer: LayerStreamer, device: torch.device) -> None:
        self.layers = layers
        self.streamer = streamer
        self.device = device
        self.resident: Dict[int, LoadedLayer] = {}
        self.in_flight: Dict[int, LoadedLayer] = {}
        # streamed layers read from the disk every pass (the page cache cannot keep them): read
        # ahead of their prefetch, ``streamer.depth + 1`` at a time (_read_ahead)
        self.disk_layers: Set[int] = set()
        # streamed layers the page cache is to keep that no pass has read yet: read ahead as the
        # disk layers are, until their first fetch
        self.unread_kept: Set[int] = set()
        self.timings: List[LayerTiming] = []
        self._span: Tuple[int, int] = (0, len(layers))  # the layers the current pass runs
        self._pass_start = 0.0
        self._forwards = [layer.forward for layer in layers]  # each layer's own forward
        self._steps: Dict[int, Optional[DecodeStep]] = {}  # loaded layers' one-token steps, built on first use
        self._placed: Dict[int, list] = {}  # loaded layers' tensors put in place by _place, to take back
        for index, layer in enumerate(layers):
            layer.forward = functools.partial(self._run_layer, index, layer.forward)

    # -- residency ------------------------------------------------------------------------
    @torch.inference_mode()
    def make_resident(self, indices: Iterable[int]) -> None:
        """Load layers ``indices`` once and keep them (never streamed again), in this process's
        memory: a mapping's clean file pages are the kernel's to drop under memory pressure (a
        memory cap), and a layer kept as one was read again by page faults every pass (7B NF4 under
        a 2 GB cap, 6 layers kept: 3436 MB read a token of a 3342 MB cache; docs/benchmarks.md)."""
        for index in indices:
            if index in self.resident:
                continue
            loaded = self.streamer.load(index, owned=True)
            if loaded.slot is not None:  # dequantized into a reused buffer: keep a copy
                kept = LoadedLayer({k: v.clone() for k, v in loaded.state.items()}, loaded.timing)
                self.streamer.release(loaded)
                loaded = kept
            self._materialize(index, loaded)
            self.resident[index] = loaded

    def _materialize(self, index: int, loaded: LoadedLayer) -> None:
        self._steps.pop(index, None)
        layer = self.layers[index]
        placed = _place(layer, loaded.state)
        if placed is None:
            layer.load_state_dict(loaded.state, strict=False, assign=True)
        else:
            self._placed[index] = placed
        for path, qweight in loaded.qweights.items():
            layer.get_submodule(path).load(qweight)

    def _unload(self, index: int) -> None:
        self._steps.pop(index, None)
        layer = self.layers[index]
        for module in layer.modules():
            if isinstance(module, QuantizedLinear):
                module.unload()
        placed = self._placed.pop(index, None)
        if placed is None:
            layer.to("meta")
            return
        for table, name, meta in placed:  # what _place replaced, back as it was
            table[name] = meta

    # -- passes -----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, body: Callable[[], T], span: Optional[Tuple[int, int]] = None) -> T:
        """Run ``body`` (a model forward, or a loop over layers) as one pass over ``span``
        (default every layer): layers it calls are fetched, run and released in turn. On an
        error the layers in flight and the prefetched ones are released."""
        self._span = span or (0, len(self.layers))
        self._pass_start = time.perf_counter()
        streams = any(i not in self.resident for i in range(*self._span))
        try:
            with kernel_team.paused() if streams else contextlib.nullcontext():
                return body()
        except BaseException:
            self.streamer.cancel()
            for index in list(self.in_flight):
                self._unload(index)
                self.streamer.release(self.in_flight.pop(index))
            raise
        finally:
            self.streamer.step += 1

    def run_range(self, hidden_states: torch.Tensor, start: int, stop: int, **layer_kwargs) -> torch.Tensor:
        """Hidden states after layers ``[start, stop)``; ``layer_kwargs`` are what each decoder
        layer's forward takes besides them (attention mask, position embeddings, ...)."""
        if not 0 <= start <= stop <= len(self.layers):
            raise ValueError(f"layer range [{start}, {stop}) is outside [0, {len(self.layers)}]")

        def body() -> torch.Tensor:
            hidden = hidden_states
            for index in range(start, stop):
                out = self.layers[index](hidden, **layer_kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
            return hidden

        return self.run(body, span=(start, stop))

    def run_layer_major(self, jobs: Sequence["LayerJob"]) -> None:
        """One pass over the layers carrying several independent jobs (a long prompt's chunks,
        several sequences): layer i is fetched once and runs every job's call i, in order,
        before layer i + 1. Each job's ``hidden`` ends as its last layer's output."""

        def body() -> None:
            for index in range(len(self.layers)):
                forward = self._forwards[index]

                def calls(forward=forward, index=index) -> None:
                    for job in jobs:
                        args, kwargs = job.layer_inputs[index]
                        out = self._call(index, forward, (job.hidden, *args), kwargs)
                        job.returns_tuple = isinstance(out, tuple)
                        job.hidden = out[0] if job.returns_tuple else out

                self._with_layer(index, calls)

        self.run(body)

    def _run_layer(self, index: int, forward: Callable, *args, **kwargs):
        return self._with_layer(index, lambda: self._call(index, forward, args, kwargs))

    def _call(self, index: int, forward: Callable, args: tuple, kwargs: dict):
        """Layer ``index`` (loaded) on ``args``/``kwargs``: its :class:`DecodeStep` for one
        position on CPU, where the layer has one, else its own forward."""
        step = self.decode_step(index)
        if step is not None:
            out = step.run(args, kwargs)
            if out is not None:
                return out
        return forward(*args, **kwargs)

    def decode_step(self, index: int) -> Optional[DecodeStep]:
        """Loaded layer ``index``'s one-token step (built on first use), or None where it has none."""
        if index not in self._steps:
            self._steps[index] = DecodeStep.build(self.layers[index], resident=index in self.resident)
        return self._steps[index]

    def _with_layer(self, index: int, body: Callable[[], T]) -> T:
        """Fetch layer ``index``, run ``body``, record the timing, release the layer."""
        self._prefetch_after(index)  # queued behind layer index's read: the reader never waits for this thread
        timing = self._fetch(index)
        timing.start = time.perf_counter() - self._pass_start
        t0 = time.perf_counter()
        out = body()
        device_calls.synchronize(self.device)
        timing.compute_s = time.perf_counter() - t0
        self.timings.append(timing)
        if len(self.timings) > 2 * TIMINGS_KEPT:  # a long-running process (a server) keeps the recent ones
            del self.timings[:-TIMINGS_KEPT]
        loaded = self.in_flight.pop(index, None)
        if loaded is not None:
            self._unload(index)
            self.streamer.release(loaded)
        return out

    def _fetch(self, index: int) -> LayerTiming:
        if index in self.resident:
            return LayerTiming(self.streamer.step, index, resident=True)
        loaded = self.streamer.get(index)
        self.unread_kept.discard(index)
        self._materialize(index, loaded)
        self.in_flight[index] = loaded
        return loaded.timing

    def _prefetch_after(self, index: int) -> None:
        """Start loading the next streamed layers of this pass; after its last one, the first
        streamed layer of the next pass."""
        start, stop = self._span
        self._read_ahead(index)
        ahead = [i for i in range(index + 1, stop) if i not in self.resident][:self.streamer.depth]
        for next_index in ahead:
            self.streamer.prefetch(next_index)
        if not ahead:
            first = next((i for i in range(start, stop) if i not in self.resident), None)
            if first is not None and first != index:
                self.streamer.prefetch(first)

    def _read_ahead(self, index: int) -> None:
        """Read the next ``depth + 1`` disk layers from layer ``index`` on (wrapping into the next
        pass). Those are the disk layers a prefetch may hold at once, so no more of them are in
        memory than without this; but their reads go on while the layers between run (resident
        ones, ones the page cache keeps), which a prefetch, one slot ahead of the compute, cannot
        (7B NF4 under a 2 GB cap: ten such layers, the disk idle for ~0.09 s of a 1.3 s token;
        docs/benchmarks.md). The layers the page cache is to keep count as disk layers until a
        pass has read them (:attr:`unread_kept`): read in their turn, not by the prefetch behind
        the reads ahead of it (their first read took 0.28 s against 0.045 for a disk layer's)."""
        ahead = self.disk_layers | self.unread_kept
        if not ahead:
            return
        start, stop = self._span
        upcoming = [i for i in (*range(index, stop), *range(start, index)) if i in ahead]
        for next_index in upcoming[:self.streamer.depth + 1]:
            self.streamer.read_ahead(next_index, into_page_cache=next_index not in self.disk_layers)


def _place(layer: nn.Module, state: Dict[str, torch.Tensor]) -> Optional[list]:
    """``layer.load_state_dict(state, strict=False, assign=True)`` for a layer whose parameters
    and buffers named in ``state`` are on the meta device, without its machinery: on a small
    model's layer that took ~1 ms a layer (and ``to("meta")`` ~0.8 ms to take them back), as
    much as the layer's products. Returns ``(table, name, meta tensor)`` for each tensor placed,
    for :meth:`LayerRunner._unload`; None (nothing placed) where the layer needs the full
    call: a load hook, a shape that differs (its error), a tensor not on meta."""
    if any(m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks for m in layer.modules()):
        return None
    targets = []
    for key, tensor in state.items():
        path, _, name = key.rpartition(".")
        try:
            module = layer.get_submodule(path) if path else layer
        except AttributeError:
            continue  # not the layer's: load_state_dict ignores it too (strict=False)
        table = module._parameters if name in module._parameters else module._buffers
        current = table.get(name)
        if current is None:
            if name in table:
                return None
            continue  # not the module's: load_state_dict ignores it too (strict=False)
        if current.device.type != "meta" or current.shape != tensor.shape:
            return None
        targets.append((table, name, current, tensor))
    placed = []
    for table, name, current, tensor in targets:
        is_parameter = isinstance(current, nn.Parameter)
        table[name] = nn.Parameter(tensor, requires_grad=current.requires_grad) if is_parameter else tensor
        placed.append((table, name, current))
    return placed
