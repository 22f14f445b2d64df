"""One pass over the layers for several independent sequences
(:meth:`sli.processor.UniversalSLIProcessor.step_many`).

Each sequence brings its own new ids, attention mask, positions and KV cache. The layers'
inputs of every sequence (a long prompt's a chunk at a time, :mod:`sli.chunked_prefill`) are
captured first; then each layer is fetched once and runs all of them before the next; last,
each sequence's norm and head give its last-position logits. Single tokens of several
sequences (decoding) run as one batch: each layer multiplies them together, every row
attending to its own keys and values (:func:`sli.kv_cache.stack_caches`).
"""
from __future__ import annotations

from typing import Any, Callable, List, Sequence, Tuple

import torch
from torch import nn

from . import transformers_adapter as hf
from .chunked_prefill import (capture_layer_inputs, chunk_bounds, chunkable, finish_forward, set_cache_length,
                              set_row_lengths)
from .kv_cache import stack_caches
from .layer_runner import LayerJob

# step_many's input: (new ids [B, S], attention mask [B, P + S], positions [B, S], KV cache)
StepInput = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]


def step_many(model: nn.Module, layers: nn.ModuleList, items: Sequence[StepInput], *, chunk_tokens: int,
              run_jobs: Callable[[List[LayerJob]], None], new_kv_cache: Callable[[], Any],
              device: torch.device) -> List[torch.Tensor]:
    """Each item's last-position logits ``[B, V]``, in the order of ``items``; the caches hold
    the new positions. ``run_jobs`` runs the captured layer jobs layer-major (the processor's
    runner); ``new_kv_cache()`` is an empty cache of the model's kind (a decode batch's frame)."""
    items = list(items)
    tokens = [i for i, (ids, _, _, kv) in enumerate(items) if ids.shape == (1, 1) and chunkable(kv)]
    batched = None
    if len(tokens) > 1:
        batched = decode_batch([items[i] for i in tokens], new_kv_cache, device)
        items = [item for i, item in enumerate(items) if i not in set(tokens)] + [batched]
    plans = []  # per item: (kv_cache, chunked, past, length, bounds, forward_kwargs, jobs)
    with torch.inference_mode():
        for ids, mask, positions, kv_cache in items:
            past, length = kv_cache.get_seq_length(), ids.shape[1]
            chunked = chunkable(kv_cache)
            # a long context takes shorter chunks: a chunk's query x key pairs as at a context of one chunk
            bounds = (chunk_bounds(length, chunk_tokens, past, max_pairs=chunk_tokens ** 2) if chunked
                      else chunk_bounds(length, length))

            def forward_kwargs(start, stop, ids=ids, mask=mask, positions=positions, kv_cache=kv_cache,
                               length=length) -> dict:
                return dict(input_ids=ids[:, start:stop], attention_mask=mask[:, :mask.shape[1] - length + stop],
                            position_ids=positions[:, start:stop], use_cache=True,
                            **{hf.cache_argument(model): kv_cache}, **hf.last_logits_kwargs(model))

            jobs = []
            for start, stop in bounds:
                if chunked:
                    set_cache_length(kv_cache, past + start)  # what this chunk's mask sees before it
                jobs.append(capture_layer_inputs(model, layers, forward_kwargs(start, stop)))
            if chunked:
                set_cache_length(kv_cache, past)
            plans.append((kv_cache, chunked, past, length, bounds, forward_kwargs, jobs))
        run_jobs([job for plan in plans for job in plan[-1]])
        logits = []
        for kv_cache, chunked, past, length, bounds, forward_kwargs, jobs in plans:
            # the norm and head's forward sees the cache as the last chunk's mask did
            rows = getattr(kv_cache.layers[0], "rows", None) if kv_cache.layers else None
            if rows is not None:  # a decode batch: each row one position back, then forward again
                set_row_lengths(kv_cache, -1)
            elif chunked:
                set_cache_length(kv_cache, past + bounds[-1][0])
            out = finish_forward(model, layers, forward_kwargs(*bounds[-1]), jobs[-1])
            if rows is not None:
                set_row_lengths(kv_cache, +1)
            elif chunked:
                set_cache_length(kv_cache, past + length)
            logits.append(out.logits[:, -1, :])
    if batched is None:
        return logits
    rows = iter(logits.pop().split(1))  # the batch came last, its rows in the order of `tokens`
    others = iter(logits)
    return [next(rows) if i in set(tokens) else next(others) for i in range(len(tokens) + len(logits))]


def decode_batch(items: Sequence[StepInput], new_kv_cache: Callable[[], Any], device: torch.device) -> StepInput:
    """Single-token items of several sequences as one batch: ids ``[N, 1]``, each row's own
    position, a mask left-padded to the longest history, and a cache whose rows are theirs."""
    lengths = [kv.get_seq_length() for _, _, _, kv in items]
    longest = max(lengths)
    mask = torch.zeros(len(items), longest + 1, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, longest - length:] = 1
    ids = torch.cat([ids for ids, _, _, _ in items])
    positions = torch.cat([positions for _, _, positions, _ in items])
    cache = stack_caches([kv for _, _, _, kv in items], new_kv_cache)
    return ids.to(device), mask.to(device), positions.to(device), cache
