"""A long prompt in chunks inside each layer: one pass over the weights, with activations
and attention scores bounded by the chunk, not the prompt.

transformers' forward runs the whole prompt through layer 0, then layer 1, ...: its
activations grow with the prompt. Cutting the prompt into chunks and running the forward per
chunk would bound them but stream every layer once per chunk. Here the layers' own inputs for
each chunk (the embeddings entering layer 0, and per layer the mask, position embeddings and
cache its forward takes) are captured from transformers' own forward with the decoder layers
replaced by recorders; the :class:`LayerRunner` then runs layer i on every chunk in order
before layer i + 1; a last forward with the layers replaced by pass-throughs applies the
final norm and head. transformers' code stays the source of truth for masks and positions.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .layer_runner import LayerJob


class _Captured(Exception):
    """Stops a recording forward once the last layer's inputs are known."""


@contextlib.contextmanager
def _forwards_replaced(layers: nn.ModuleList, make) -> Iterator[None]:
    saved = [layer.forward for layer in layers]
    try:
        for index, layer in enumerate(layers):
            layer.forward = make(index)
        yield
    finally:
        for layer, forward in zip(layers, saved):
            layer.forward = forward


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, forward_kwargs: Dict[str, Any]) -> LayerJob:
    """The inputs each decoder layer would get from ``model(**forward_kwargs)``, nothing run."""
    first: Dict[str, torch.Tensor] = {}
    inputs: List[Tuple[tuple, dict]] = []

    def make(index: int):
        def record(hidden, *args, **kwargs):
            if index == 0:
                first["hidden"] = hidden
            inputs.append((args, kwargs))
            if index == len(layers) - 1:
                raise _Captured
            return hidden
        return record

    with _forwards_replaced(layers, make):
        try:
            model(**forward_kwargs)
        except _Captured:
            pass
    if len(inputs) != len(layers):
        raise RuntimeError(f"the model's forward called {len(inputs)} of its {len(layers)} decoder layers; "
                           "chunked prefill needs every layer called once, in order")
    return LayerJob(first["hidden"], inputs)


def finish_forward(model: nn.Module, layers: nn.ModuleList, forward_kwargs: Dict[str, Any], job: LayerJob):
    """``model(**forward_kwargs)`` with the decoder layers skipped, the last one returning
    ``job.hidden``: the final norm and head on hidden states computed elsewhere."""
    last = len(layers) - 1

    def make(index: int):
        def passthrough(hidden, *args, **kwargs):
            result = job.hidden if index == last else hidden
            return (result,) if job.returns_tuple else result
        return passthrough

    with _forwards_replaced(layers, make):
        return model(**forward_kwargs)


MIN_CHUNK = 16  # the shortest chunk a long context shrinks one to


def chunk_bounds(length: int, chunk: int, past: int = 0, max_pairs: Optional[int] = None) -> List[Tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``length`` positions ``chunk`` at a time, after ``past``
    cached ones. With ``max_pairs``, a chunk is shortened so that its queries times the keys
    they see (``past + stop``) stay within it: the attention's mask and scores (``heads x
    queries x keys``) do not grow with the context (at least :data:`MIN_CHUNK` positions)."""
    bounds, start = [], 0
    while start < length:
        size = chunk
        if max_pairs is not None:
            size = min(chunk, max(MIN_CHUNK, max_pairs // (past + start + chunk)))
        bounds.append((start, min(length, start + size)))
        start += size
    return bounds


def set_cache_length(kv_cache, length: int) -> None:
    """Make every layer of ``kv_cache`` (compact layers only) hold ``length`` positions."""
    for layer in kv_cache.layers:
        layer.length = length


def set_row_lengths(stacked_cache, delta: int) -> None:
    """Move every row of a stacked (decode batch) cache ``delta`` positions."""
    for layer in stacked_cache.layers:
        for row in layer.rows:
            row.length += delta


def chunkable(kv_cache) -> bool:
    """Whether every layer of ``kv_cache`` is a compact layer (whose length can be set)."""
    layers = getattr(kv_cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "CompactKVLayer" for layer in layers)
