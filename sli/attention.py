"""sli's attention function: ``transformers``' SDPA attention, except that a decode step over
compact keys and values reads them in place.

A model that keeps its keys and values in sli's compact layers (:mod:`sli.kv_cache`) runs
with this function as its attention implementation (``"sli"``, registered through
:mod:`sli.transformers_adapter`, the masks still SDPA's). The layers' updates hand it
:class:`~sli.kv_cache.KVRead` s rather than float copies. One new position per sequence on
CPU goes to :func:`sli.kernels.decode_attention`, which widens each stored row in registers;
anything else (a prompt chunk, a GPU, an option the kernel lacks) gets the float copies and
``transformers``' own SDPA function, as before.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from . import kernels
from . import transformers_adapter as hf
from .kv_cache import KVRead

NAME = "sli"

# Keyword arguments the decode kernel has no answer for: with any of them set, SDPA runs.
UNSUPPORTED = ("softcap", "sliding_window", "s_aux", "sinks", "position_bias", "output_attentions")


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key, value, attention_mask: Optional[torch.Tensor],
                      dropout: float = 0.0, scaling: Optional[float] = None, **kwargs) -> Tuple[torch.Tensor, None]:
    """``transformers``' attention-interface signature: ``(attn_output [B, S, H, D], None)``."""
    if not isinstance(key, KVRead):
        return hf.sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    try:
        if _decodes_in_place(query, key, dropout, kwargs):
            return _decode(query, key, value, attention_mask, scaling), None
        dense_key, dense_value = key.dense(query.dtype), value.dense(query.dtype)
    finally:
        key.release()
    return hf.sdpa_attention(module, query, dense_key, dense_value, attention_mask, dropout=dropout, scaling=scaling,
                             **kwargs)


def _decodes_in_place(query: torch.Tensor, key: KVRead, dropout: float, kwargs) -> bool:
    return (query.shape[2] == 1 and query.device.type == "cpu" and query.dtype == torch.float32 and not dropout
            and key.dtype in (torch.int8, torch.bfloat16) and kernels.kernels_enabled()
            and not any(kwargs.get(name) for name in UNSUPPORTED))


def _decode(query: torch.Tensor, key: KVRead, value: KVRead, attention_mask: Optional[torch.Tensor],
            scaling: Optional[float]) -> torch.Tensor:
    """Each row's one query attends to its own stored positions: ``[B, 1, H, D]``."""
    batch, heads, _, dim = query.shape
    scaling = dim ** -0.5 if scaling is None else scaling
    out = torch.empty(batch, 1, heads, dim, dtype=torch.float32)
    for b, ((k, k_scale, length), (v, v_scale, _)) in enumerate(zip(key.rows(), value.rows())):
        bias = _bias(attention_mask, b, length)
        out[b, 0] = kernels.decode_attention(query[b, :, 0], k, k_scale, v, v_scale, bias, length, scaling)
    return out


def decode_one(query, layer, attention_mask: Optional[torch.Tensor], scaling: float):
    """One sequence's one query (float32 numpy ``[H * D]``, rotated) attending to the compact
    layer ``layer``'s stored positions (the new one written: :meth:`CompactKVLayer.append_one`),
    as :func:`attention_forward` computes it: float32 ``[H, D]``."""
    keys, key_scale, values, value_scale = layer.arrays()
    length = layer.length
    bias = np.zeros(length, np.float32) if attention_mask is None else row_bias(attention_mask, length)
    return kernels.decode_attention_arrays(query.reshape(-1, keys.shape[2]), keys, key_scale, values, value_scale,
                                           bias, length, scaling)


def row_bias(attention_mask: torch.Tensor, length: int) -> np.ndarray:
    """A one-row step's additive mask over its ``length`` positions, as float32 numpy."""
    return _bias(attention_mask, 0, length).numpy()


def _bias(attention_mask: Optional[torch.Tensor], row: int, length: int) -> torch.Tensor:
    """Row ``row``'s additive mask over its own ``length`` positions: the mask's last
    ``length`` columns (a batch's reads are left-padded to the longest, so a row's own
    positions are the last ones), 0 where allowed and -inf where masked."""
    if attention_mask is None:
        return torch.zeros(length, dtype=torch.float32)
    mask = attention_mask[row if attention_mask.shape[0] > 1 else 0, 0, -1, -length:]
    if mask.dtype == torch.bool:
        return torch.zeros(length, dtype=torch.float32).masked_fill_(~mask, float("-inf"))
    return mask.to(torch.float32).contiguous()


def install(model: torch.nn.Module, kv_dtype: Optional[str], device: torch.device) -> bool:
    """Make ``model`` (an SDPA model on CPU whose keys and values are kept in int8 or bfloat16)
    run :func:`attention_forward`; returns whether its KV layers should hand it
    :class:`~sli.kv_cache.KVRead` s. The decode kernel for ``kv_dtype`` is compiled (or loaded
    from numba's cache) here, so the first token does not pay for it."""
    if device.type != "cpu" or kv_dtype not in ("int8", "bfloat16") or not hf.use_attention(model, NAME,
                                                                                           attention_forward):
        return False
    if kernels.kernels_enabled():
        stored = torch.zeros(1, 2, 64, dtype=torch.int8 if kv_dtype == "int8" else torch.bfloat16)
        scale = torch.ones(1, 2) if kv_dtype == "int8" else None
        kernels.decode_attention(torch.zeros(1, 64), stored, scale, stored, scale, torch.zeros(2), 2, 0.125)
    return True
