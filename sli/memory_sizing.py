"""What the memory plan weighs, read from a model's config and its layers: one ready-to-run
layer (and a prompt's work buffer), one token's keys and values, one prompt chunk's
activations. :func:`sli.memory_plan.plan_memory` then decides how a budget is spent.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from . import transformers_adapter as hf
from .kv_cache import kv_bytes_per_token
from .quantization import CachedLayer, split_cached
from .quantization.execution import prompt_scratch_bytes
from .streaming import ready_bytes


def element_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def intermediate_size(config) -> int:
    """The width of a layer's MLP (4x the hidden size where the config names none)."""
    text = hf.text_config(config)
    return getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * text.hidden_size


def module_layer_bytes(layer: nn.Module, compute_dtype: torch.dtype) -> int:
    """Bytes of a layer that runs as plain modules (the dequantize strategy): every parameter
    in the compute dtype."""
    return sum(p.numel() for p in layer.parameters()) * element_bytes(compute_dtype)


def packed_layer_bytes(cached: CachedLayer, compute_dtype: torch.dtype) -> Tuple[int, int]:
    """(bytes a packed layer holds while loaded, bytes of a prompt's transient buffer).

    Loaded: the cached bytes, the kernels' precomputed scales and the norms in the compute
    dtype; for a prompt, the buffers one weight's linear dequantizes into on top
    (:func:`sli.quantization.execution.prompt_scratch_bytes`)."""
    qweights, _ = split_cached(cached)
    scratch = max((prompt_scratch_bytes(q) for q in qweights.values()), default=0)
    return ready_bytes(cached, compute_dtype), scratch


def attention_heads(config) -> Tuple[int, int, int]:
    """(query heads, key/value heads, head size) of a model's attention."""
    text = hf.text_config(config)
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 1)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return heads, kv_heads, head_dim


def kv_bytes(config, num_layers: int, kv_dtype: Optional[str], tokens: int, batch: int = 1) -> int:
    """Bytes the keys and values of ``tokens`` positions take, every layer (an upper bound:
    sliding-window layers hold less)."""
    _, kv_heads, head_dim = attention_heads(config)
    return batch * tokens * kv_bytes_per_token(num_layers, kv_heads, head_dim, kv_dtype)


def prompt_work_bytes(config, compute_dtype: torch.dtype, tokens: int) -> int:
    """Bytes a prompt of ``tokens`` positions holds while its layers run one after another: the
    whole prompt's hidden states into and out of the running layer, and that layer's keys and
    values as float copies for attention, and their copies repeated to the query heads where
    the model groups its query heads (GQA: ``repeat_kv``)."""
    heads, kv_heads, head_dim = attention_heads(config)
    repeated = heads if kv_heads != heads else 0
    per_token = 2 * hf.text_config(config).hidden_size + 2 * (kv_heads + repeated) * head_dim
    return int(tokens) * per_token * element_bytes(compute_dtype)


def default_prefill_chunk_tokens(config, compute_dtype: torch.dtype, memory_budget: Optional[int]) -> int:
    """What an eighth of the budget holds of one token's activations in a layer (hidden
    states, attention projections, the MLP's intermediates), 64 to 2048 tokens; 512 without
    a budget."""
    if memory_budget is None:
        return 512
    hidden = hf.text_config(config).hidden_size
    per_token = element_bytes(compute_dtype) * (4 * hidden + 3 * intermediate_size(config))
    return int(min(2048, max(64, memory_budget // 8 // per_token)))
