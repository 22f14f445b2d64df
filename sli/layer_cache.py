"""LayerCache: quantized layers on disk (safetensors files, diskcache index) plus an LRU memory tier.

Serialization and policy are split as in diskcache itself: :class:`DurableDisk` decides
how bytes reach a file (temporary name, fsync, rename); ``diskcache.Cache`` owns the
SQLite index, the size limit and least-recently-used eviction, which makes one directory
safe for several processes. This module adds the entry format (a safetensors file whose
header carries the config and codec metadata), the checksum, and the memory tier.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
import sqlite3
import struct
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import diskcache
import psutil
import torch
import xxhash
from safetensors.torch import save as safetensors_save

from .errors import CacheError
from .quantization import CachedLayer, LayerQuantizer, QuantizationConfig, QuantizationMode

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
GB = 1024**3

# Defaults, with units.
DEFAULT_SETTINGS = {
    "max_cache_size_gb": 50.0,  # disk tier size limit, GiB
    "memory_fraction": 0.10,  # memory tier size when not given: this share of available RAM
}

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class DurableDisk(diskcache.Disk):
    """diskcache's Disk, writing each file under a temporary name, fsynced, then renamed.

    diskcache inserts the index row only after ``store`` returns, so a process killed in
    the middle of a write leaves at most a stray temporary file, never a served entry.
    """

    def _write(self, full_path, iterator, mode, encoding=None):
        directory = os.path.dirname(full_path)
        os.makedirs(directory, exist_ok=True)
        tmp_path = f"{full_path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp_path, "wb" if "b" in mode else "w", encoding=encoding) as writer:
                size = 0
                for chunk in iterator:
                    size += len(chunk)
                    writer.write(chunk)
                writer.flush()
                os.fsync(writer.fileno())
            os.replace(tmp_path, full_path)
        except BaseException:
            # Narrow and deliberate: the temporary file is ours alone; nothing else to undo.
            try:
                os.remove(tmp_path)
            except OSError:
                pass
            raise
        return size


@dataclass
class CacheStats:
    entries: int = 0
    disk_bytes: int = 0
    memory_bytes: int = 0
    memory_entries: int = 0
    memory_hits: int = 0
    memory_misses: int = 0
    disk_hits: int = 0
    disk_misses: int = 0
    evictions: int = 0  # from the memory tier, by this process
    corrupt: int = 0

    def to_dict(self) -> Dict[str, int]:
        return asdict(self)


ConfigLike = Union[QuantizationConfig, LayerQuantizer, QuantizationMode, str]


def _as_config(config: ConfigLike) -> Union[QuantizationConfig, LayerQuantizer]:
    if isinstance(config, (QuantizationConfig, LayerQuantizer)):
        return config
    return QuantizationConfig(mode=config)


def _config_json(config: Union[QuantizationConfig, LayerQuantizer]) -> str:
    if isinstance(config, QuantizationConfig):
        return json.dumps(config.to_dict(), sort_keys=True)
    parts = {name: getattr(config, name).to_dict() for name in ("base_config", "attention_config", "ffn_config")
             if hasattr(config, name)} or {"config": config.config.to_dict()}
    return json.dumps(parts, sort_keys=True)


def checksum(data) -> str:
    """xxh3-64 of the bytes: ~11 GB/s here, next to ~1.3 GB/s for a cold disk read."""
    return xxhash.xxh3_64_hexdigest(data)


def serialize(entry: CachedLayer, header: Dict[str, str]) -> bytes:
    """The entry as safetensors bytes; ``header`` goes into the file's metadata."""
    metadata = dict(header, linears=json.dumps(entry.linears, sort_keys=True), format=str(FORMAT_VERSION))
    tensors = {name: t.detach().contiguous().cpu() for name, t in entry.tensors.items()}
    return safetensors_save(tensors, metadata=metadata)


def deserialize(buffer: bytearray) -> Tuple[CachedLayer, Dict[str, str]]:
    """Parse safetensors bytes without copying: each tensor is a view of ``buffer``."""
    if len(buffer) < 8:
        raise ValueError("file shorter than a safetensors header")
    (header_len,) = struct.unpack("<Q", bytes(buffer[:8]))
    if 8 + header_len > len(buffer):
        raise ValueError("header runs past the end of the file")
    header = json.loads(bytes(buffer[8:8 + header_len]))
    metadata = header.pop("__metadata__", {}) or {}
    base = 8 + header_len
    tensors: Dict[str, torch.Tensor] = {}
    for name, info in header.items():
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        if base + end > len(buffer):
            raise ValueError(f"tensor {name} runs past the end of the file")
        count = (end - start) // dtype.itemsize
        flat = torch.frombuffer(buffer, dtype=dtype, offset=base + start, count=count) if count else \
            torch.empty(0, dtype=dtype)
        tensors[name] = flat.view(info["shape"])
    linears = json.loads(metadata.get("linears", "{}"))
    return CachedLayer(tensors, linears), metadata


class LayerCache:
    """A size-bounded store of quantized layers: a disk tier and an LRU memory tier.

    Args:
        cache_dir: the directory (created if missing). Several processes may share it.
        max_cache_size_gb: the disk tier's size limit; least recently used entries go first.
        max_memory_cache_size_gb: the memory tier's size limit (0 turns it off); by default
            10% of the RAM psutil reports available.

    Keys are (model id, layer, config fingerprint): one directory holds several models and
    modes side by side, and bytes made under one config never answer for another.
    """

    def __init__(self, cache_dir: Union[str, Path], max_cache_size_gb: Optional[float] = None,
                 max_memory_cache_size_gb: Optional[float] = None) -> None:
        self.cache_dir = Path(cache_dir).expanduser()
        size_gb = DEFAULT_SETTINGS["max_cache_size_gb"] if max_cache_size_gb is None else max_cache_size_gb
        if size_gb <= 0:
            raise ValueError(f"max_cache_size_gb={size_gb} must be positive")
        self.size_limit = int(size_gb * GB)
        if max_memory_cache_size_gb is None:
            self.memory_limit = int(psutil.virtual_memory().available * DEFAULT_SETTINGS["memory_fraction"])
        else:
            self.memory_limit = int(max_memory_cache_size_gb * GB)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self._disk = diskcache.Cache(str(self.cache_dir), size_limit=self.size_limit,
                                         eviction_policy="least-recently-used", disk=DurableDisk,
                                         disk_min_file_size=0, cull_limit=0)
        except (OSError, sqlite3.Error) as exc:
            raise CacheError(f"cannot open the layer cache at {self.cache_dir} ({exc}); "
                             f"{_free_space(self.cache_dir)}; pass a writable --cache-dir") from exc
        self._memory: "OrderedDict[str, CachedLayer]" = OrderedDict()
        self._memory_bytes = 0
        self._lock = threading.RLock()
        self._stats = CacheStats()

    # -- keys -------------------------------------------------------------------------
    @staticmethod
    def key(model_id: str, layer: Union[int, str], config: ConfigLike) -> str:
        """The index key. File names come from diskcache, never from the model id, so an id
        such as ``../../etc`` cannot leave the cache directory."""
        return f"{model_id}\x00{layer}\x00{_as_config(config).fingerprint()}"

    # -- core, tensor-level API -----------------------------------------------------------
    def put(self, model_id: str, layer: Union[int, str], config: ConfigLike, entry: CachedLayer) -> int:
        """Store ``entry``; returns the bytes written. Replaces an existing entry."""
        config = _as_config(config)
        data = serialize(entry, {"model_id": model_id, "layer": str(layer), "config": _config_json(config)})
        if len(data) > self.size_limit:
            raise CacheError(f"layer {layer} of {model_id} takes {len(data) / GB:.3f} GiB, more than the whole cache "
                             f"limit of {self.size_limit / GB:.3f} GiB; raise max_cache_size_gb")
        key = self.key(model_id, layer, config)
        try:
            self._disk.set(key, io.BytesIO(data), read=True, tag=checksum(data))
            # diskcache's own culling (cull_limit) drops a fixed number of entries per set;
            # cull() drops least-recently-used entries just until the volume fits.
            self._disk.cull()
        except OSError as exc:
            raise CacheError(f"cannot write layer {layer} of {model_id} to {self.cache_dir} ({exc.strerror or exc}); "
                             f"{_free_space(self.cache_dir)}; free space or pass another --cache-dir") from exc
        except sqlite3.Error as exc:
            raise CacheError(f"cannot update the cache index in {self.cache_dir} ({exc}); "
                             f"{_free_space(self.cache_dir)}") from exc
        self._remember(key, entry)
        return len(data)

    def get(self, model_id: str, layer: Union[int, str], config: ConfigLike) -> Optional[CachedLayer]:
        """The entry, from memory or disk, or None. A corrupt file is removed and counted
        as a miss, never returned."""
        key = self.key(model_id, layer, config)
        with self._lock:
            entry = self._memory.get(key)
            if entry is not None:
                self._memory.move_to_end(key)
                self._stats.memory_hits += 1
                return entry
            self._stats.memory_misses += 1
        entry = self._read(key)
        with self._lock:
            if entry is None:
                self._stats.disk_misses += 1
                return None
            self._stats.disk_hits += 1
        self._remember(key, entry)
        return entry

    def contains(self, model_id: str, layer: Union[int, str], config: ConfigLike) -> bool:
        key = self.key(model_id, layer, config)
        return key in self._memory or key in self._disk

    def delete(self, model_id: str, layer: Union[int, str], config: Optional[ConfigLike] = None) -> int:
        """Remove one entry, or every config's entry of that layer when ``config`` is None."""
        prefix = f"{model_id}\x00{layer}\x00"
        keys = [self.key(model_id, layer, config)] if config is not None else \
            [k for k in self._disk.iterkeys() if isinstance(k, str) and k.startswith(prefix)]
        removed = 0
        for key in keys:
            with self._lock:
                self._forget(key)
            removed += bool(self._disk.delete(key))
        return removed

    def clear(self) -> None:
        with self._lock:
            self._memory.clear()
            self._memory_bytes = 0
        self._disk.clear()

    def stats(self) -> CacheStats:
        with self._lock:
            stats = CacheStats(**self._stats.to_dict())
            stats.memory_bytes, stats.memory_entries = self._memory_bytes, len(self._memory)
        stats.entries = len(self._disk)
        stats.disk_bytes = self._disk.volume()
        return stats

    def entries(self) -> List[Dict[str, str]]:
        """(model id, layer, fingerprint) of every entry on disk."""
        return [dict(zip(("model_id", "layer", "fingerprint"), k.split("\x00"))) for k in self._disk.iterkeys()
                if isinstance(k, str)]

    def verify(self, remove: bool = False) -> List[str]:
        """Check every entry's checksum and format; returns the bad keys (removed on request)."""
        bad = []
        for key in list(self._disk.iterkeys()):
            if self._read(key, remove=False) is None and key in self._disk:
                bad.append(key.replace("\x00", ":"))
                if remove:
                    self._disk.delete(key)
        return bad

    # -- the reference API ------------------------------------------------------------
    def cache_layer(self, model_id: str, layer_index: Union[int, str], layer: Union[torch.nn.Module, CachedLayer],
                    quantization_mode: ConfigLike = "none") -> int:
        """Store a (quantized) layer module or a :class:`CachedLayer`; returns bytes written."""
        config = _as_config(quantization_mode)
        if not isinstance(layer, CachedLayer):
            quantizer = config if isinstance(config, LayerQuantizer) else LayerQuantizer(config)
            layer = quantizer.to_cached(layer)
        return self.put(model_id, layer_index, config, layer)

    def get_layer(self, model_id: str, layer_index: Union[int, str],
                  quantization_config: Optional[ConfigLike] = None) -> Optional[CachedLayer]:
        """The cached layer; with no config, the only one cached for that layer."""
        if quantization_config is not None:
            return self.get(model_id, layer_index, quantization_config)
        prefix = f"{model_id}\x00{layer_index}\x00"
        keys = [k for k in self._disk.iterkeys() if isinstance(k, str) and k.startswith(prefix)]
        if not keys:
            return None
        if len(keys) > 1:
            raise ValueError(f"layer {layer_index} of {model_id} is cached under {len(keys)} configs "
                             f"({', '.join(k.rsplit(chr(0), 1)[1] for k in keys)}); pass quantization_config")
        entry = self._read(keys[0])
        if entry is not None:
            self._stats.disk_hits += 1
        return entry

    # -- internals --------------------------------------------------------------------
    def _read(self, key: str, remove: bool = True) -> Optional[CachedLayer]:
        try:
            handle, tag = self._disk.get(key, read=True, tag=True)
        except (OSError, sqlite3.Error) as exc:
            logger.warning("layer cache read of %r failed: %s", key, exc)
            return None
        if handle is None:
            return None
        with handle:
            path = handle.name
            try:
                size = os.fstat(handle.fileno()).st_size
                buffer = bytearray(size)
                read = handle.readinto(buffer)
            except OSError as exc:
                logger.warning("cannot read %s: %s", path, exc)
                return None
        try:
            if read != size or checksum(buffer) != tag:
                raise ValueError("checksum mismatch (truncated or altered file)")
            entry, metadata = deserialize(buffer)
            if metadata.get("format") != str(FORMAT_VERSION):
                raise ValueError(f"format {metadata.get('format')} is not {FORMAT_VERSION}")
        except (ValueError, KeyError, json.JSONDecodeError, RuntimeError) as exc:
            logger.warning("corrupt layer cache entry %s (%s): removed, treated as a miss", path, exc)
            with self._lock:
                self._stats.corrupt += 1
            if remove:
                self._disk.delete(key)
            return None
        return entry

    def _remember(self, key: str, entry: CachedLayer) -> None:
        nbytes = entry.nbytes
        with self._lock:
            self._forget(key)
            if nbytes > self.memory_limit:
                return
            self._memory[key] = entry
            self._memory_bytes += nbytes
            while self._memory_bytes > self.memory_limit:
                _, old = self._memory.popitem(last=False)
                self._memory_bytes -= old.nbytes
                self._stats.evictions += 1

    def _forget(self, key: str) -> None:
        old = self._memory.pop(key, None)
        if old is not None:
            self._memory_bytes -= old.nbytes

    def close(self) -> None:
        self._disk.close()

    def __enter__(self) -> "LayerCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LayerCache({str(self.cache_dir)!r}, max_cache_size_gb={self.size_limit / GB:g})"


def _free_space(path: Path) -> str:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return "free space unknown"
    return f"{usage.free / GB:.2f} GiB free on {probe}"
