"""Keys and values of a streamed model: preallocated per layer in a compact dtype.

transformers' default cache grows every layer's keys and values by ``torch.cat`` each
token (a full copy per layer per token) and keeps them in the compute dtype (float32 on
CPU). :class:`CompactKVLayer` takes the place of each full-attention layer's cache: buffers
reserved for the whole conversation (grown by doubling when a call outruns them), written in
place, stored in bfloat16 (half of float32, lossless to ~3 digits) or int8 with a scale per
token and head. Attention gets a float copy, or, when the model runs sli's attention
(:mod:`sli.attention`), a :class:`KVRead` of the stored bytes: a decode step then reads them in
place (:func:`sli.kernels.decode_attention`) instead of widening the whole context to float32
every layer, every token.

When the memory budget cannot hold every layer's keys and values, a layer's buffers are a
shared map of a file in the cache directory (unlinked at once: nothing to clean up) and its
pages are dropped from the process as soon as its attention has read them: only the layer
being computed holds its KV in memory, the rest waits in the page cache or on disk, like
the streamed weights.
"""
from __future__ import annotations

import ctypes
import math
import mmap
import os
import tempfile
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch

from .kernels import kv_arrays, layer_ops

KV_DTYPES = ("float32", "bfloat16", "int8")
MADV_WILLNEED, MADV_DONTNEED = 3, 4


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, kv_dtype: str) -> int:
    """Bytes one token's keys and values take over every layer (int8: its scales counted)."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype={kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
    per_value = {"float32": 4, "bfloat16": 2, "int8": 1}[kv_dtype]
    scales = 2 * 4 if kv_dtype == "int8" else 0  # one float32 scale per token and head, for K and for V
    return num_layers * kv_heads * (2 * head_dim * per_value + scales)


_libc = None


def _advise(tensor: Optional[torch.Tensor], advice: int) -> None:
    """``madvise`` over a file-mapped tensor's pages: MADV_DONTNEED drops them from this
    process (they stay in the page cache), MADV_WILLNEED starts reading them in the background."""
    global _libc
    if tensor is None or tensor.numel() == 0:
        return
    if _libc is None:
        _libc = ctypes.CDLL("libc.so.6", use_errno=True)
    start = tensor.data_ptr() - tensor.data_ptr() % mmap.PAGESIZE
    size = tensor.data_ptr() + tensor.numel() * tensor.element_size() - start
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(size), advice)


def _empty(shape, dtype: torch.dtype, device, spill_dir: Optional[Path]) -> torch.Tensor:
    """An uninitialized tensor: in memory, or a shared map of a fresh, already unlinked file."""
    if spill_dir is None:
        return torch.empty(shape, dtype=dtype, device=device)
    spill_dir.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(suffix=".kv", dir=spill_dir)
    os.close(fd)
    try:
        flat = torch.from_file(path, shared=True, size=max(1, math.prod(shape)), dtype=dtype)
    finally:
        os.unlink(path)  # the map keeps the file alive; nothing is left behind
    return flat[:math.prod(shape)].view(shape)


class _Store:
    """One growing ``[B, H, capacity, D]`` buffer (plus int8 scales) written in place."""

    def __init__(self, kv_dtype: str, spill_dir: Optional[Path] = None) -> None:
        self.kv_dtype = kv_dtype
        self.spill_dir = spill_dir
        self.data: Optional[torch.Tensor] = None
        self.scale: Optional[torch.Tensor] = None
        self._arrays = None  # numpy views of a one-row store, made once per buffer
        self.one_row_capacity = 0  # the capacity of a one-row int8/bfloat16 store on CPU, else 0

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
        data = _empty((b, h, tokens, d), dtype, like.device, self.spill_dir)
        scale = _empty((b, h, tokens, 1), torch.float32, like.device, self.spill_dir) \
            if self.kv_dtype == "int8" else None
        if keep:
            data[:, :, :keep] = self.data[:, :, :keep]
            if scale is not None:
                scale[:, :, :keep] = self.scale[:, :, :keep]
        self.data, self.scale = data, scale
        self._arrays = None
        one_row = b == 1 and self.kv_dtype != "float32" and data.device.type == "cpu"
        self.one_row_capacity = tokens if one_row else 0

    def arrays(self):
        """A one-row store's buffers as numpy: ``(data [H, capacity, D], scale [H, capacity])``,
        bfloat16 as its bits (uint16), no scale (an empty array) unless int8 (what the decode
        kernels take)."""
        if self._arrays is None:
            self._arrays = kv_arrays(self.data[0], None if self.scale is None else self.scale[0, :, :, 0])
        return self._arrays

    def write(self, start: int, states: torch.Tensor) -> None:
        stop = start + states.shape[2]
        if self.kv_dtype == "int8":
            scale = states.abs().amax(dim=-1, keepdim=True).float().clamp_(min=1e-8) / 127.0
            self.scale[:, :, start:stop] = scale
            self.data[:, :, start:stop] = torch.round(states.float() / scale).clamp_(-127, 127).to(torch.int8)
        else:
            self.data[:, :, start:stop] = states

    def drop_pages(self) -> None:
        _advise(self.data, MADV_DONTNEED)
        _advise(self.scale, MADV_DONTNEED)

    def will_need(self, length: int) -> None:
        """Start reading the first ``length`` positions of every head from disk (not the
        reserved positions past them: a sparse file's holes would be read as zero pages)."""
        for t in (self.data, self.scale):
            if t is not None:
                for rows in t[:, :, :length].flatten(0, 1):
                    _advise(rows, MADV_WILLNEED)

    def read(self, length: int, dtype: torch.dtype) -> torch.Tensor:
        """The first ``length`` positions in ``dtype`` (a view when stored in it)."""
        return _read(self.data, self.scale, length, dtype)


@dataclass
class KVRead:
    """Keys or values of a batch as compact layers store them, for attention to read in place.

    ``parts``: per stored layer, ``(data [B, H, capacity, D], scale [B, H, capacity, 1] or None,
    length)``; the batch is their rows in order. ``release()`` drops a spilled layer's pages
    once attention is done with them."""

    parts: List[Tuple[torch.Tensor, Optional[torch.Tensor], int]]
    releases: List[Callable[[], None]] = field(default_factory=list)

    @classmethod
    def joined(cls, rows) -> "KVRead":
        """One batch of ``rows``: each a :class:`KVRead` or a float tensor ``[1, H, L, D]``."""
        reads = [r if isinstance(r, KVRead) else cls([(r, None, r.shape[2])]) for r in rows]
        return cls([p for r in reads for p in r.parts], [f for r in reads for f in r.releases])

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0][0].dtype

    def rows(self):
        """``(data [H, capacity, D], scale [H, capacity] or None, length)`` per batch row."""
        for data, scale, length in self.parts:
            for b in range(data.shape[0]):
                yield data[b], None if scale is None else scale[b, :, :, 0], length

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """``[B, H, L, D]`` in ``dtype``, each part left-padded with zeros to the longest ``L``
        (the attention mask, left-padded alike, hides the padding)."""
        reads = [_read(data, scale, length, dtype) for data, scale, length in self.parts]
        if len(reads) == 1:
            return reads[0]
        longest = max(r.shape[2] for r in reads)
        return torch.cat([torch.nn.functional.pad(r, (0, 0, longest - r.shape[2], 0)) for r in reads])

    def release(self) -> None:
        for release in self.releases:
            release()


def _read(data: torch.Tensor, scale: Optional[torch.Tensor], length: int, dtype: torch.dtype) -> torch.Tensor:
    """The first ``length`` positions of a store's buffers in ``dtype`` (a view when stored in it)."""
    part = data[:, :, :length]
    if scale is not None:
        return part.to(dtype) * scale[:, :, :length].to(dtype)
    return part if part.dtype == dtype else part.to(dtype)


def _compact_layer_class():
    """:class:`CompactKVLayer`, built on transformers' DynamicLayer (through the adapter)."""
    from .transformers_adapter import full_attention_cache_layer

    base = full_attention_cache_layer()

    class CompactKVLayer(base):
        """One layer's keys and values in preallocated buffers of a compact dtype."""

        def __init__(self, kv_dtype: str = "bfloat16", reserve: int = 0, spill_dir: Optional[Path] = None,
                     packed_reads: bool = False) -> None:
            super().__init__()
            if kv_dtype not in KV_DTYPES:
                raise ValueError(f"kv_dtype={kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
            if spill_dir is not None and kv_dtype == "float32":
                raise ValueError("float32 keys and values are read in place and cannot spill to disk; "
                                 "use kv_dtype='bfloat16' or 'int8'")
            self.kv_dtype = kv_dtype
            self.reserved = reserve
            self.spilled = spill_dir is not None
            self.length = 0
            self.packed_reads = packed_reads and kv_dtype != "float32"  # update returns KVReads
            self.next_spilled = None  # the spilled layer whose pages to read while this one computes
            self._keys, self._values = _Store(kv_dtype, spill_dir), _Store(kv_dtype, spill_dir)

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
            if self.packed_reads:
                return self.packed()
            keys, values = self._keys.read(needed, key_states.dtype), self._values.read(needed, value_states.dtype)
            self.release()  # attention reads the float copies: a spilled layer's pages can go
            return keys, values

        def append_one(self, keys, values) -> bool:
            """Write one position of a one-row layer from float32 numpy ``keys`` and ``values``
            (``[H * D]``, the decode step's), as :meth:`update` would write it; False (nothing
            written) where this layer takes :meth:`update` instead (see :meth:`reserve_one`)."""
            slot = self.reserve_one()
            if slot is None:
                return False
            stored_keys, key_scale, stored_values, value_scale, position = slot
            ops, heads = layer_ops(), stored_keys.shape[0]
            for stored, scale, states in ((stored_keys, key_scale, keys), (stored_values, value_scale, values)):
                if self.kv_dtype == "int8":
                    ops["store_int8"](states, heads, stored, scale, position)
                else:
                    ops["store_bf16"](states, heads, stored, position)
            return True

        def can_append_one(self) -> bool:
            """Whether :meth:`reserve_one` would give a position (nothing counted)."""
            return self.length < self._keys.one_row_capacity and not self.spilled

        def reserve_one(self):
            """The next position of a one-row layer, counted as written: ``(keys, key scales,
            values, value scales, position)`` (:meth:`arrays`) for the caller to write it in
            place now, as :meth:`update` would; None (nothing counted) where this layer takes
            :meth:`update` instead: not yet written by a prompt, spilled, several rows, float32
            or full."""
            if not self.can_append_one():
                return None
            position = self.length
            self.length += 1
            return (*self.arrays(), position)

        def arrays(self):
            """``(keys, key scales, values, value scales)`` of a one-row layer as numpy
            (:meth:`_Store.arrays`), for the decode kernels; valid up to :attr:`length`."""
            return (*self._keys.arrays(), *self._values.arrays())

        def packed(self) -> "tuple[KVRead, KVRead]":
            """The stored keys and values as :class:`KVRead` s (one pair: the keys' read
            releases both stores' pages)."""
            keys = KVRead([(self._keys.data, self._keys.scale, self.length)], [self.release])
            values = KVRead([(self._values.data, self._values.scale, self.length)])
            return keys, values

        def release(self) -> None:
            """Drop a spilled layer's pages from this process (attention has read them), and
            start reading the next spilled layer's (see :func:`link_spilled`)."""
            if self.spilled:
                self._keys.drop_pages()
                self._values.drop_pages()
                if self.next_spilled is not None:
                    self.next_spilled.will_need()

        def will_need(self) -> None:
            self._keys.will_need(self.length)
            self._values.will_need(self.length)

        def get_seq_length(self) -> int:
            return self.length

        def reset(self) -> None:
            self.length = 0

        def crop(self, max_length: int) -> None:
            """Keep the first ``max_length`` positions (a negative value removes that many)."""
            self.length = max(0, self.length + max_length) if max_length < 0 else min(self.length, max_length)

        @property
        def nbytes(self) -> int:
            """Bytes of its buffers (in memory, or on disk when spilled)."""
            return self._keys.nbytes + self._values.nbytes

    return CompactKVLayer


_CLASS = None


def compact_kv_layer(kv_dtype: str = "bfloat16", reserve: int = 0, spill_dir: Optional[Path] = None,
                     packed_reads: bool = False):
    """A new :class:`CompactKVLayer` (the class is built once, on first use); with
    ``spill_dir`` its buffers are file maps there, in memory only while it runs; with
    ``packed_reads`` its updates return :class:`KVRead` s (for :mod:`sli.attention`)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _compact_layer_class()
    return _CLASS(kv_dtype, reserve, spill_dir, packed_reads)


def link_spilled(cache):
    """``cache`` with each spilled compact layer pointing at the next one: when a layer's
    attention is done, the next spilled layer's keys and values start coming in from disk
    (``MADV_WILLNEED``) while the layers between compute, instead of faulting in during its
    own attention."""
    spilled = [layer for layer in getattr(cache, "layers", []) if getattr(layer, "spilled", False)]
    for layer, after in zip(spilled, spilled[1:] + spilled[:1]):
        layer.next_spilled = after if after is not layer else None
    return cache


def kv_cache_bytes(cache) -> "tuple[int, int]":
    """(bytes held in memory, bytes spilled to disk) by a cache's compact layers."""
    layers = [layer for layer in getattr(cache, "layers", []) if hasattr(layer, "spilled")]
    return (sum(layer.nbytes for layer in layers if not layer.spilled),
            sum(layer.nbytes for layer in layers if layer.spilled))


def _stacked_layer_class():
    from .transformers_adapter import full_attention_cache_layer

    class StackedKVLayer(full_attention_cache_layer()):
        """Several sequences' layers seen as one batch: each row writes into and reads from its
        own sequence's layer; the reads are left-padded to the longest (the attention mask,
        left-padded alike, hides the padding)."""

        def __init__(self, rows) -> None:
            super().__init__()
            self.rows = rows
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
            keys, values = [], []
            for index, row in enumerate(self.rows):
                k, v = row.update(key_states[index:index + 1], value_states[index:index + 1], *args, **kwargs)
                keys.append(k)
                values.append(v)
            packed = all(isinstance(k, KVRead) for k in keys)
            keys, values = KVRead.joined(keys), KVRead.joined(values)
            if packed:  # sli's attention reads each row in place
                return keys, values
            dense = keys.dense(key_states.dtype), values.dense(value_states.dtype)
            keys.release()
            return dense

        def get_seq_length(self) -> int:
            return max(row.get_seq_length() for row in self.rows)

    return StackedKVLayer


_STACKED = None


def stack_caches(caches, new_cache):
    """One cache object for a batch whose row i is the sequence of ``caches[i]`` (every layer of
    each a compact layer); ``new_cache()`` makes the empty container (transformers' cache class)."""
    global _STACKED
    if _STACKED is None:
        _STACKED = _stacked_layer_class()
    stacked = new_cache()
    stacked.layers = [_STACKED([cache.layers[index] for cache in caches]) for index in range(len(caches[0].layers))]
    return stacked
