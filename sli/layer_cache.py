"""LayerCache: quantized layers on disk (safetensors files, diskcache index) plus an LRU memory tier.

Serialization and policy are split as in diskcache itself: :class:`DurableDisk` decides
how bytes reach a file (temporary name, fsync, rename); ``diskcache.Cache`` owns the
SQLite index, the size limit and least-recently-used eviction, which makes one directory
safe for several processes. This module adds the entry format (a safetensors file whose
header carries the config and codec metadata), the checksum, and the memory tier.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import mmap
import os
import shutil
import sqlite3
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import diskcache
import psutil
import torch
import xxhash

from .errors import CacheError
from .quantization import CachedLayer, LayerQuantizer, QuantizationConfig, QuantizationMode, _is_conv1d, is_linear

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
GB = 1024**3

# Defaults, with units.
DEFAULT_SETTINGS = {
    "max_cache_size_gb": 50.0,  # disk tier size limit, GiB
    "memory_fraction": 0.10,  # memory tier size when not given: this share of available RAM
}
TEMPORARY_MAX_AGE_S = 3600.0  # a temporary file older than this, seconds, is a killed writer's leftover
# A file whose checksum passed is not hashed again by this process while its identity
# (device, inode, size, mtime) is unchanged, but only once its mtime is this much older than
# the check: a write within the file system's timestamp granularity of the check could
# otherwise leave the mtime as it was (git's "racy clean" rule).
RACY_MTIME_S = 2.0

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
        tmp_path = f"{full_path}.{os.getpid()}.{threading.get_ident()}.tmp"
        for attempt in range(10):
            os.makedirs(directory, exist_ok=True)
            try:
                writer = open(tmp_path, "wb" if "b" in mode else "w", encoding=encoding)
                break
            except FileNotFoundError:
                # Tolerated race, as in diskcache's own Disk._write: another process's
                # Disk.remove pruned the (empty) sub-directory between makedirs and open.
                if attempt == 9:
                    raise
        try:
            with writer:
                size = 0
                for chunk in iterator:
                    size += len(chunk)
                    writer.write(chunk)
                writer.flush()
                # fsync before rename: diskcache's own _write neither syncs nor renames, so a
                # crash could leave a committed row naming a short file. The checksum would
                # catch that, but an entry should be whole before its name exists at all.
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
    evictions: int = 0  # memory-tier evictions by this process
    disk_evictions: int = 0  # disk-tier (size limit) evictions by this process
    corrupt: int = 0  # entries found truncated or altered, removed and counted as misses

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


_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


class SerializedEntry:
    """An entry in the safetensors format, as chunks that view the entry's tensors.

    ``safetensors.torch.save`` builds the whole file in one bytes object: a second copy of
    a layer (0.4 GB for a 7B layer in bf16) at the moment a warm-up holds the most. Here
    the header is built, and the tensor data is written and hashed straight from the
    tensors' memory. ``read`` hands out the chunks in order (diskcache's file-like input).
    """

    def __init__(self, entry: CachedLayer, header: Dict[str, str]) -> None:
        metadata = dict(header, linears=json.dumps(entry.linears, sort_keys=True), format=str(FORMAT_VERSION))
        described: Dict[str, Any] = {"__metadata__": metadata}
        self._chunks: List[Any] = []
        offset = 0
        for name, tensor in entry.tensors.items():
            t = tensor.detach().cpu().contiguous()
            nbytes = t.numel() * t.element_size()
            described[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                               "data_offsets": [offset, offset + nbytes]}
            if nbytes:
                self._chunks.append(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            offset += nbytes
        head = json.dumps(described, separators=(",", ":")).encode("utf-8")
        head += b" " * (-len(head) % 8)  # safetensors aligns the data to 8 bytes
        self._chunks.insert(0, struct.pack("<Q", len(head)) + head)
        self.size = 8 + len(head) + offset
        self._next = 0

    def checksum(self) -> str:
        """:func:`checksum` of the file's bytes, without joining them."""
        h = xxhash.xxh3_64()
        for chunk in self._chunks:
            h.update(chunk)
        return h.hexdigest()

    def read(self, size: int = -1):
        if self._next >= len(self._chunks):
            return b""
        self._next += 1
        return self._chunks[self._next - 1]


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
        max_cache_size_gb: the disk tier's size limit in GiB, index included; least
            recently used entries are evicted to keep it.
        max_memory_cache_size_gb: the memory tier's size limit in GiB (0 turns it off);
            None means 10% of the RAM psutil reports available.

    Raises:
        CacheError: the directory cannot be created or its index opened.

    Keys are (model id, layer, config fingerprint): one directory holds several models and
    modes side by side, and bytes made under one config never answer for another. Layers
    are an int index or a name ("embed", "norm", "lm_head").

    >>> import tempfile, torch
    >>> with LayerCache(tempfile.mkdtemp(), max_cache_size_gb=0.01) as cache:
    ...     written = cache.put("m", 0, "none", CachedLayer({"w": torch.ones(4)}))
    ...     cache.get("m", 0, "none").tensors["w"].tolist()
    [1.0, 1.0, 1.0, 1.0]
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
        elif max_memory_cache_size_gb < 0:
            raise ValueError(f"max_memory_cache_size_gb={max_memory_cache_size_gb} must be >= 0 (0 turns it off)")
        else:
            self.memory_limit = int(max_memory_cache_size_gb * GB)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            # cull_limit=0: diskcache's own culling removes up to cull_limit entries at once
            # whenever the volume crosses the limit (16 layers of ~100 MB to make room for
            # one); _evict_to_limit removes exactly as many as needed, oldest access first.
            # disk_min_file_size=0: every value is a file, never a BLOB in the SQLite index.
            self._disk = diskcache.Cache(str(self.cache_dir), size_limit=self.size_limit,
                                         eviction_policy="least-recently-used", disk=DurableDisk,
                                         disk_min_file_size=0, cull_limit=0)
        except (OSError, sqlite3.Error) as exc:
            raise CacheError(f"cannot open the layer cache at {self.cache_dir} ({exc}); "
                             f"{_free_space(self.cache_dir)}; pass a writable --cache-dir") from exc
        self._sweep_temporaries()
        self._memory: "OrderedDict[str, CachedLayer]" = OrderedDict()
        self._memory_bytes = 0
        self._lock = threading.RLock()  # guards the memory tier and the counters
        self._stats = CacheStats()
        self._verified: Dict[Tuple[str, str], Tuple[int, int, int, int]] = {}  # (key, tag) → file identity

    # -- keys -------------------------------------------------------------------------
    @staticmethod
    def key(model_id: str, layer: Union[int, str], config: ConfigLike) -> str:
        """The index key. File names come from diskcache (random hex), never from the model
        id, so an id such as ``../../etc`` cannot leave the cache directory."""
        return f"{model_id}\x00{layer}\x00{_as_config(config).fingerprint()}"

    def _layer_keys(self, model_id: str, layer: Union[int, str]) -> List[str]:
        """Every key of (model, layer), any config, on disk or in memory."""
        prefix = f"{model_id}\x00{layer}\x00"
        with self._lock:
            keys = {k for k in self._memory if k.startswith(prefix)}
        keys.update(k for k in self._disk.iterkeys() if isinstance(k, str) and k.startswith(prefix))
        return sorted(keys)

    # -- core, tensor-level API -----------------------------------------------------------
    def put(self, model_id: str, layer: Union[int, str], config: ConfigLike, entry: CachedLayer,
            memory: bool = True) -> int:
        """Store ``entry`` (replacing any entry under the same key); returns the bytes written.

        ``memory=False`` leaves the memory tier alone (for callers that keep their own
        resident set). Raises :class:`CacheError` when the entry is larger than the whole
        size limit or the directory is unwritable or full; the cache then holds what it
        held before.
        """
        config = _as_config(config)
        data = SerializedEntry(entry, {"model_id": str(model_id), "layer": str(layer), "config": _config_json(config)})
        if data.size > self.size_limit:
            raise CacheError(f"layer {layer} of {model_id} takes {data.size / GB:.3f} GiB, more than the whole cache "
                             f"limit of {self.size_limit / GB:.3f} GiB; raise max_cache_size_gb")
        key = self.key(model_id, layer, config)
        # The checksum lives in the index row's tag, not in the file's header: a header
        # cannot carry the hash of bytes that include itself, and the row (file name + tag)
        # commits in one SQLite transaction after the file is whole, so name and checksum
        # always describe the same bytes. It covers the whole file, header and tensor data.
        try:
            self._disk.set(key, data, read=True, tag=data.checksum())
            self._evict_to_limit(keep=key)
        except OSError as exc:
            raise CacheError(f"cannot write layer {layer} of {model_id} to {self.cache_dir} ({exc.strerror or exc}); "
                             f"{_free_space(self.cache_dir)}; free space or pass another --cache-dir") from exc
        except (sqlite3.Error, diskcache.Timeout) as exc:
            raise CacheError(f"cannot update the cache index in {self.cache_dir} ({exc}); "
                             f"{_free_space(self.cache_dir)}") from exc
        if memory:
            self._remember(key, entry)
        else:
            with self._lock:
                self._forget(key)  # never serve an older entry from memory
        return data.size

    def get(self, model_id: str, layer: Union[int, str], config: ConfigLike,
            memory: bool = True, mapped: bool = False) -> Optional[CachedLayer]:
        """The entry, from the memory tier or else the disk, or None.

        A disk hit is promoted into the memory tier when it fits, unless ``memory=False``.
        ``mapped=True`` maps a disk hit's file instead of reading it into a private buffer:
        its tensors then view the page cache (copy-on-write), which for a file the kernel
        already holds costs a few ms instead of ~150 ms for 200 MB here (no copy, no page
        faults on fresh memory); the file is read into the page cache first (:func:`_page_in`). Cache files are never rewritten in place (eviction unlinks
        them, and a mapping outlives that). Such a hit is not promoted into the memory tier.
        A truncated or altered file is logged, removed and counted as a miss, never returned:
        the checksum is checked on a file's first read by this process and again whenever
        its size or mtime changes (see :data:`RACY_MTIME_S`), so a layer streamed every
        token is hashed once, not once per token.
        """
        return self._get(self.key(model_id, layer, config), memory and not mapped, mapped)

    def __getitem__(self, key: Tuple[str, Union[int, str], ConfigLike]) -> CachedLayer:
        entry = self.get(*key)
        if entry is None:
            raise KeyError(key)
        return entry

    def contains(self, model_id: str, layer: Union[int, str], config: ConfigLike) -> bool:
        """True when the entry is in either tier (without reading or checking it)."""
        key = self.key(model_id, layer, config)
        with self._lock:
            if key in self._memory:
                return True
        return key in self._disk

    def delete(self, model_id: str, layer: Union[int, str], config: Optional[ConfigLike] = None) -> int:
        """Remove one entry, or every config's entry of that layer when ``config`` is None.

        Returns the number of keys removed (from either tier).
        """
        keys = [self.key(model_id, layer, config)] if config is not None else self._layer_keys(model_id, layer)
        removed = 0
        for key in keys:
            with self._lock:
                in_memory = self._forget(key)
            removed += bool(self._disk.delete(key)) or in_memory
        return removed

    def clear(self) -> None:
        """Remove every entry of both tiers (other processes' entries too)."""
        with self._lock:
            self._memory.clear()
            self._memory_bytes = 0
        self._disk.clear()

    def stats(self) -> CacheStats:
        """Counters of this process, entry count and bytes of both tiers."""
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
        """Check every disk entry's checksum and format.

        Returns the bad keys as ``"model:layer:fingerprint"``; removes them when ``remove``.
        """
        bad = []
        for key in list(self._disk.iterkeys()):
            with self._lock:
                corrupt_before = self._stats.corrupt
            self._read(key, remove=remove, recheck=True)
            with self._lock:
                # A key another process evicted meanwhile is a miss, not a bad entry.
                if self._stats.corrupt > corrupt_before:
                    bad.append(key.replace("\x00", ":"))
        return bad

    # -- the reference API ------------------------------------------------------------
    def cache_layer(self, model_id: str, layer_index: Union[int, str], layer: Union[torch.nn.Module, CachedLayer],
                    quantization_mode: ConfigLike = "none") -> int:
        """Store a layer; returns the bytes written.

        ``layer`` is a :class:`CachedLayer` or an ``nn.Module`` (quantized already or not:
        :meth:`LayerQuantizer.to_cached` serializes it as it is). ``quantization_mode`` is a
        mode name, a :class:`QuantizationMode` or a :class:`QuantizationConfig`; it is the
        key the layer is filed under.
        """
        config = _as_config(quantization_mode)
        if not isinstance(layer, CachedLayer):
            quantizer = config if isinstance(config, LayerQuantizer) else LayerQuantizer(config)
            if LayerQuantizer.is_quantized(layer):
                layer = quantizer.to_cached(layer)
            else:
                # Quantize from the tensors, leaving the caller's module as it was.
                linear_paths = {name: _is_conv1d(m) for name, m in layer.named_modules() if is_linear(m)}
                state = {name: t.detach() for name, t in layer.state_dict().items()}
                layer = quantizer.quantize_state_dict(state, linear_paths)
        return self.put(model_id, layer_index, config, layer)

    def get_layer(self, model_id: str, layer_index: Union[int, str],
                  quantization_config: Optional[ConfigLike] = None) -> Optional[CachedLayer]:
        """The cached layer, or None.

        With no config, the only entry cached for that layer; raises ``ValueError`` naming
        the fingerprints when several configs are cached for it.
        """
        if quantization_config is not None:
            return self.get(model_id, layer_index, quantization_config)
        keys = self._layer_keys(model_id, layer_index)
        if not keys:
            return None
        if len(keys) > 1:
            raise ValueError(f"layer {layer_index} of {model_id} is cached under {len(keys)} configs "
                             f"(fingerprints {', '.join(k.rsplit(chr(0), 1)[1] for k in keys)}); "
                             "pass quantization_config")
        return self._get(keys[0], memory=True)

    # -- internals --------------------------------------------------------------------
    def _get(self, key: str, memory: bool, mapped: bool = False) -> Optional[CachedLayer]:
        with self._lock:
            entry = self._memory.get(key)
            if entry is not None:
                self._memory.move_to_end(key)
                self._stats.memory_hits += 1
                return entry
            self._stats.memory_misses += 1
        entry = self._read(key, mapped=mapped)  # outside the lock: a prefetch thread's disk read blocks no one
        with self._lock:
            if entry is None:
                self._stats.disk_misses += 1
                return None
            self._stats.disk_hits += 1
        if memory:
            self._remember(key, entry)
        return entry

    def _read(self, key: str, remove: bool = True, mapped: bool = False,
              recheck: bool = False) -> Optional[CachedLayer]:
        """Read, check and parse one disk entry: one read() into a private buffer the tensors
        view, or with ``mapped`` a copy-on-write map of the file (see :meth:`get`).
        ``recheck`` hashes the bytes even if this process checked the unchanged file before."""
        try:
            handle, tag = self._disk.get(key, read=True, tag=True)
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            logger.warning("layer cache read of %r failed: %s", key, exc)
            return None
        if handle is None:  # not there, or evicted by another process between lookup and open
            return None
        with handle:
            path = handle.name
            try:
                stat = os.fstat(handle.fileno())
                size = stat.st_size
                if mapped and size:
                    # No MAP_POPULATE: on a writable private map it copies every page (134 ms
                    # for 203 MB). The bytes are read into the page cache here instead, so
                    # whoever touches the mapping later finds them there.
                    _page_in(handle.fileno(), size)
                    buffer = mmap.mmap(handle.fileno(), size, flags=mmap.MAP_PRIVATE,
                                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
                    read = size
                else:
                    buffer = bytearray(size)
                    read = handle.readinto(buffer)
            except (OSError, ValueError) as exc:
                logger.warning("cannot read %s: %s", path, exc)
                return None
        identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        try:
            if read != size:
                raise ValueError("checksum mismatch (truncated file)")
            if recheck or self._verified.get((key, tag)) != identity:
                if checksum(buffer) != tag:
                    raise ValueError("checksum mismatch (truncated or altered file)")
                if time.time() - stat.st_mtime_ns / 1e9 >= RACY_MTIME_S:
                    self._verified[(key, tag)] = identity
            entry, metadata = deserialize(buffer)
            if metadata.get("format") != str(FORMAT_VERSION):
                raise ValueError(f"format {metadata.get('format')} is not {FORMAT_VERSION}")
        except (ValueError, KeyError, TypeError, json.JSONDecodeError, RuntimeError) as exc:
            logger.warning("corrupt layer cache entry %s (%s): removed, treated as a miss", path, exc)
            self._verified.pop((key, tag), None)
            with self._lock:
                self._stats.corrupt += 1
            if remove:
                self._remove_if_unchanged(key, tag)
            return None
        return entry

    def _remove_if_unchanged(self, key: str, tag: str) -> None:
        # Another process may have rewritten the key since we read it: delete only the row
        # whose checksum we found wrong.
        self._delete_rows("SELECT rowid, filename FROM Cache WHERE key = ? AND tag = ?", (key, tag))

    def _delete_rows(self, select: str, params: tuple, until_fits: bool = False) -> int:
        """Delete the index rows ``select`` finds, then, after the commit, their files.

        diskcache's own ``delete`` inside an outer ``transact()`` removes the file before the
        outer transaction commits: a process killed in between leaves a row without its file.
        Here the rows go in one transaction (diskcache's triggers keep count and size) and
        the files only once it has committed. With ``until_fits``, rows go one at a time,
        in the order ``select`` gives, until the volume fits the size limit.
        """
        sql = self._disk._sql  # private but stable diskcache API
        filenames = []
        with self._disk.transact():
            while not until_fits or self._disk.volume() > self.size_limit:
                rows = sql(select + (" LIMIT 1" if until_fits else ""), params).fetchall()
                if not rows:
                    break
                for rowid, filename in rows:
                    sql("DELETE FROM Cache WHERE rowid = ?", (rowid,))
                    filenames.append(filename)
                if not until_fits:
                    break
        for filename in filenames:
            if filename is not None:
                self._disk._disk.remove(filename)  # relative to the cache directory, as diskcache does
        return len(filenames)

    def _evict_to_limit(self, keep: str) -> None:
        """Evict least recently used entries (never ``keep``) until the volume fits the limit.

        Runs after the write commits so the entry's file is written outside the index lock;
        several writers may overshoot briefly, each then evicts down to the limit.
        """
        if self._disk.volume() <= self.size_limit:
            return
        # The LRU order is the access_time column that eviction_policy="least-recently-used"
        # maintains on every get.
        evicted = self._delete_rows("SELECT rowid, filename FROM Cache WHERE key != ? ORDER BY access_time",
                                    (keep,), until_fits=True)
        with self._lock:
            self._stats.disk_evictions += evicted

    def _sweep_temporaries(self, max_age_s: float = TEMPORARY_MAX_AGE_S) -> None:
        """Delete temporary files that writers killed mid-write left behind.

        They were never in the index (never served) but take space the size limit does not
        see. Only old ones go: a young one may be another process's write in progress.
        """
        cutoff = time.time() - max_age_s
        # glob.glob, not Path.glob: it skips sub-directories that vanish mid-walk (another
        # process's diskcache prunes empty ones), where Path.glob raises FileNotFoundError.
        for name in glob.glob(os.path.join(glob.escape(str(self.cache_dir)), "*", "*", "*.tmp")):
            try:
                if os.stat(name).st_mtime < cutoff:
                    os.remove(name)
            except OSError:  # tolerated race: another process swept it first
                pass

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

    def _forget(self, key: str) -> bool:
        old = self._memory.pop(key, None)
        if old is not None:
            self._memory_bytes -= old.nbytes
        return old is not None

    def close(self) -> None:
        """Close the index connection; the files stay for the next process."""
        self._disk.close()

    def __enter__(self) -> "LayerCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LayerCache({str(self.cache_dir)!r}, max_cache_size_gb={self.size_limit / GB:g})"


_devnull: Optional[int] = None


def _page_in(fd: int, size: int) -> None:
    """Read a file into the page cache without copying it into this process.

    ``sendfile`` to /dev/null reads the file in large sequential requests (a cold 200 MB
    entry at the disk's full rate, ~30 ms CPU; ~4 ms if already cached) and the pages
    count in no one's RSS. Page faults on a cold mapping would read it a readahead window
    at a time, several times slower; ``MADV_WILLNEED`` reads only the first window
    (Linux caps it at the readahead size). Where sendfile cannot do this, faults do.
    """
    global _devnull
    try:
        if _devnull is None:
            _devnull = os.open(os.devnull, os.O_WRONLY)
        offset = 0
        while offset < size:
            sent = os.sendfile(_devnull, fd, offset, size - offset)
            if sent <= 0:
                return
            offset += sent
    except (OSError, AttributeError) as exc:  # AttributeError: no os.sendfile on this platform
        logger.debug("page-in by sendfile failed (%s); pages will fault in", exc)


def _free_space(path: Path) -> str:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return "free space unknown"
    return f"{usage.free / GB:.2f} GiB free on {probe}"
