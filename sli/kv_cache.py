"""Keys and values of a streamed model: preallocated per layer in a compact dtype.

transformers' default cache grows every layer's keys and values by ``torch.cat`` each
token (a full copy per layer per token) and keeps them in the compute dtype (float32 on
CPU). :class:`CompactKVLayer` takes the place of each full-attention layer's cache: buffers
reserved for the whole conversation (grown by doubling when a call outruns them), written in
place, stored in bfloat16 (half of float32, lossless to ~3 digits) or int8 with a scale per
token and head; attention reads a float view.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

KV_DTYPES = ("float32", "bfloat16", "int8")


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, kv_dtype: str) -> int:
    """Bytes one token's keys and values take over every layer (int8: its scales counted)."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype={kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
    per_value = {"float32": 4, "bfloat16": 2, "int8": 1}[kv_dtype]
    scales = 2 * 4 if kv_dtype == "int8" else 0  # one float32 scale per token and head, for K and for V
    return num_layers * kv_heads * (2 * head_dim * per_value + scales)


class _Store:
    """One growing ``[B, H, capacity, D]`` buffer (plus int8 scales) written in place."""

    def __init__(self, kv_dtype: str) -> None:
        self.kv_dtype = kv_dtype
        self.data: Optional[torch.Tensor] = None
        self.scale: Optional[torch.Tensor] = None

    @property
    def capacity(self) -> int:
        return 0 if self.data is None else self.data.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale) if t is not None)

    def reserve(self, like: torch.Tensor, tokens: int, keep: int) -> None:
        """Room for ``tokens`` positions, the first ``keep`` copied over."""
        if tokens <= self.capacity:
            return
        b, h, _, d = like.shape
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}[self.kv_dtype]
        data = torch.empty(b, h, tokens, d, dtype=dtype, device=like.device)
        scale = torch.empty(b, h, tokens, 1, dtype=torch.float32, device=like.device) if self.kv_dtype == "int8" else None
        if keep:
            data[:, :, :keep] = self.data[:, :, :keep]
            if scale is not None:
                scale[:, :, :keep] = self.scale[:, :, :keep]
        self.data, self.scale = data, scale

    def write(self, start: int, states: torch.Tensor) -> None:
        stop = start + states.shape[2]
        if self.kv_dtype == "int8":
            scale = states.abs().amax(dim=-1, keepdim=True).float().clamp_(min=1e-8) / 127.0
            self.scale[:, :, start:stop] = scale
            self.data[:, :, start:stop] = torch.round(states.float() / scale).clamp_(-127, 127).to(torch.int8)
        else:
            self.data[:, :, start:stop] = states

    def read(self, length: int, dtype: torch.dtype) -> torch.Tensor:
        """The first ``length`` positions in ``dtype`` (a view when stored in it)."""
        part = self.data[:, :, :length]
        if self.kv_dtype == "int8":
            return (part.to(dtype) * self.scale[:, :, :length].to(dtype))
        return part if part.dtype == dtype else part.to(dtype)


def _compact_layer_class():
    """:class:`CompactKVLayer`, built on transformers' DynamicLayer (through the adapter)."""
    from .transformers_adapter import full_attention_cache_layer

    base = full_attention_cache_layer()

    class CompactKVLayer(base):
        """One layer's keys and values in preallocated buffers of a compact dtype."""

        def __init__(self, kv_dtype: str = "bfloat16", reserve: int = 0) -> None:
            super().__init__()
            if kv_dtype not in KV_DTYPES:
                raise ValueError(f"kv_dtype={kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
            self.kv_dtype = kv_dtype
            self.reserved = reserve
            self.length = 0
            self._keys, self._values = _Store(kv_dtype), _Store(kv_dtype)

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.device, self.dtype = key_states.device, key_states.dtype
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            new = key_states.shape[2]
            needed = self.length + new
            if needed > self._keys.capacity:
                target = max(needed, self.reserved, 2 * self._keys.capacity)
                self._keys.reserve(key_states, target, self.length)
                self._values.reserve(value_states, target, self.length)
            self._keys.write(self.length, key_states)
            self._values.write(self.length, value_states)
            self.length = needed
            return self._keys.read(needed, key_states.dtype), self._values.read(needed, value_states.dtype)

        def get_seq_length(self) -> int:
            return self.length

        def reset(self) -> None:
            self.length = 0

        def crop(self, max_length: int) -> None:
            """Keep the first ``max_length`` positions (a negative value removes that many)."""
            self.length = max(0, self.length + max_length) if max_length < 0 else min(self.length, max_length)

        @property
        def nbytes(self) -> int:
            return self._keys.nbytes + self._values.nbytes

    return CompactKVLayer


_CLASS = None


def compact_kv_layer(kv_dtype: str = "bfloat16", reserve: int = 0):
    """A new :class:`CompactKVLayer` (the class is built once, on first use)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _compact_layer_class()
    return _CLASS(kv_dtype, reserve)


def kv_cache_bytes(cache) -> int:
    """Bytes a cache's compact layers hold now."""
    return sum(getattr(layer, "nbytes", 0) for layer in getattr(cache, "layers", []))
