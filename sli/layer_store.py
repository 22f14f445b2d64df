"""The layer store: quantized layers on disk (safetensors files, diskcache index) plus an LRU
memory tier, keyed by (model id, layer, config fingerprint).

Serialization and policy are split as in diskcache itself: :mod:`sli.cache_format` is the
file format and checksum, :mod:`sli.cache_disk` how bytes reach a file (temporary name,
fsync, rename); ``diskcache.Cache`` owns the SQLite index, the size limit and the locking
that make one directory safe for several processes. :mod:`sli.memory_tier` is the LRU memory
tier, :mod:`sli.cache_recovery` what keeps the directory sound under crashes and other writers.
The store knows entries and fingerprints: anything with ``fingerprint()`` and ``describe()``
names a config.
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import sqlite3
import threading
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Protocol, Tuple, Union

import diskcache

from .cache_disk import (DurableDisk, check_diskcache_version, free_space, least_recently_used, page_in,
                         read_direct)
from .cache_format import FORMAT_VERSION, SerializedEntry, checksum, deserialize
from .cache_recovery import HashedFiles, remove_if_unchanged, sweep_temporaries
from . import page_cache
from .errors import CacheError
from .memory_tier import MemoryTier
from .quantization.config import QuantizationConfig, QuantizationMode
from .quantization.formats import CachedLayer
from .settings import DEFAULT_SETTINGS, GB

logger = logging.getLogger(__name__)


class ConfigKey(Protocol):
    """What names a config to the store: a fingerprint for the key, a description for the header."""

    def fingerprint(self) -> str: ...

    def describe(self) -> str: ...


ConfigLike = Union[ConfigKey, QuantizationMode, str]


def as_config(config: ConfigLike) -> ConfigKey:
    """``config`` itself, or a mode name / :class:`QuantizationMode` as its plain config."""
    if isinstance(config, (str, QuantizationMode)):
        return QuantizationConfig(mode=config)
    return config


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


def owned_buffer(size: int):
    """``size`` bytes of this process's memory to read an entry into: an anonymous map, page-aligned
    as a map of the file would be (a bytearray's bytes start 16 bytes past a page, so every 64-byte
    SIMD load of the tensors viewing it would straddle two cache lines), asking for huge pages."""
    if not size:
        return bytearray(0)
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buffer.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return buffer


class LayerStore:
    """A size-bounded store of quantized layers: a disk tier and an LRU memory tier.

    Args:
        cache_dir: the directory (created if missing). Several processes may share it.
        max_cache_size_gb: the disk tier's size limit in GiB, index included; least
            recently used entries are evicted to keep it.
        max_memory_cache_size_gb: the memory tier's size limit in GiB (0 turns it off);
            None means 10% of the RAM psutil reports available.
        pin_memory: keep the memory tier's entries in page-locked memory (for a CUDA device:
            a hit is then copied to the GPU without staging; needs a CUDA build of torch).

    Raises:
        CacheError: the directory cannot be created or its index opened.

    Keys are (model id, layer, config fingerprint): one directory holds several models and
    modes side by side, and bytes made under one config never answer for another. Layers
    are an int index or a name ("embed", "norm", "lm_head").

    >>> import tempfile, torch
    >>> with LayerStore(tempfile.mkdtemp(), max_cache_size_gb=0.01) as cache:
    ...     written = cache.put("m", 0, "none", CachedLayer({"w": torch.ones(4)}))
    ...     cache.get("m", 0, "none").tensors["w"].tolist()
    [1.0, 1.0, 1.0, 1.0]
    """

    def __init__(self, cache_dir: Union[str, Path], max_cache_size_gb: Optional[float] = None,
                 max_memory_cache_size_gb: Optional[float] = None, pin_memory: bool = False) -> None:
        check_diskcache_version()
        self.pin_memory = pin_memory
        self.cache_dir = Path(cache_dir).expanduser()
        size_gb = DEFAULT_SETTINGS["max_cache_size_gb"] if max_cache_size_gb is None else max_cache_size_gb
        if size_gb <= 0:
            raise ValueError(f"max_cache_size_gb={size_gb} must be positive")
        self.size_limit = int(size_gb * GB)
        if max_memory_cache_size_gb is None:
            self.memory_limit = int(page_cache.memory_available() * DEFAULT_SETTINGS["memory_fraction"])
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
                             f"{free_space(self.cache_dir)}; pass a writable --cache-dir") from exc
        sweep_temporaries(self.cache_dir)
        self._memory = MemoryTier(self.memory_limit)
        self._lock = threading.RLock()  # guards the memory tier and the counters
        self._stats = CacheStats()
        self._hashed = HashedFiles()
        self._files: Dict[str, str] = {}  # key → the entry's file, as this process last read it

    # -- keys -------------------------------------------------------------------------
    @staticmethod
    def key(model_id: str, layer: Union[int, str], config: ConfigLike) -> str:
        """The index key. File names come from diskcache (random hex), never from the model
        id, so an id such as ``../../etc`` cannot leave the cache directory."""
        return f"{model_id}\x00{layer}\x00{as_config(config).fingerprint()}"

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
        config = as_config(config)
        data = SerializedEntry(entry, {"model_id": str(model_id), "layer": str(layer), "config": config.describe()})
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
                             f"{free_space(self.cache_dir)}; free space or pass another --cache-dir") from exc
        except (sqlite3.Error, diskcache.Timeout) as exc:
            raise CacheError(f"cannot update the cache index in {self.cache_dir} ({exc}); "
                             f"{free_space(self.cache_dir)}") from exc
        if memory:
            self._remember(key, entry)
        else:
            with self._lock:
                self._memory.pop(key)  # never serve an older entry from memory
        return data.size

    def get(self, model_id: str, layer: Union[int, str], config: ConfigLike,
            memory: bool = True, mapped: bool = False, drop_pages: bool = False,
            read_into: Optional[Callable[[int], mmap.mmap]] = None) -> Optional[CachedLayer]:
        """The entry, from the memory tier or else the disk, or None.

        A disk hit is promoted into the memory tier when it fits, unless ``memory=False``.
        ``mapped=True`` maps a disk hit's file instead of reading it into a private buffer:
        its tensors then view the page cache (copy-on-write), which for a file the kernel
        already holds costs a few ms instead of a copy (no page faults on fresh memory);
        the file is read into the page cache first (:func:`sli.cache_disk.page_in`). Cache
        files are never rewritten in place (eviction unlinks them, and a mapping outlives
        that). Such a hit is not promoted into the memory tier. ``drop_pages=True`` drops a disk
        hit's file from the page cache once read, or, mapped, once its map is gone (see
        :mod:`sli.page_cache`: a streamed layer the page cache cannot keep).
        A truncated or altered file is logged, removed and counted as a miss, never returned:
        the checksum is checked on a file's first read by this process and again whenever
        its size or mtime changes (see ``DEFAULT_SETTINGS["racy_mtime_s"]``), so a layer streamed every
        token is hashed once, not once per token.
        ``read_into(size)`` gives a buffer (page-aligned, at least ``size`` rounded up to 4096 bytes; one
        the caller reuses): a disk hit is read into it past the page cache
        (:func:`sli.cache_disk.read_direct`) and its tensors view it, for a layer read from the
        disk every pass anyway; such a hit is not promoted into the memory tier either.
        """
        key = self.key(model_id, layer, config)
        return self._get(key, memory and not mapped and read_into is None, mapped, drop_pages, read_into)

    def page_in(self, model_id: str, layer: Union[int, str], config: ConfigLike) -> int:
        """Read a disk entry into the page cache, ahead of its :meth:`get` (no parsing, no
        check); the bytes read, 0 where the entry is not on disk. A streamer calls it to keep
        the disk busy while layers that need no read run. The entry's file is the one this
        process last read it from, else the index's (one lookup, remembered: a pass right after
        loading reads ahead too)."""
        key = self.key(model_id, layer, config)
        path = self._entry_file(key, model_id, layer, config)
        if path is None:
            return 0
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # evicted since: get() finds out
            self._files.pop(key, None)
            return 0
        try:
            size = os.fstat(fd).st_size
            page_in(fd, size)
            return size
        finally:
            os.close(fd)

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
                in_memory = self._memory.pop(key)
            removed += bool(self._disk.delete(key)) or in_memory
        return removed

    def clear(self) -> None:
        """Remove every entry of both tiers (other processes' entries too)."""
        with self._lock:
            self._memory.clear()
        self._disk.clear()

    def stats(self) -> CacheStats:
        """Counters of this process, entry count and bytes of both tiers."""
        with self._lock:
            stats = CacheStats(**self._stats.to_dict())
            stats.memory_bytes, stats.memory_entries = self._memory.nbytes, len(self._memory)
        stats.entries = len(self._disk)
        stats.disk_bytes = self._disk.volume()
        return stats

    def cached_share(self, model_id: str, layer: Union[int, str], config: ConfigLike) -> Optional[float]:
        """The share of a disk entry's file in the page cache (:func:`sli.page_cache.cached_fraction`;
        its file found as :meth:`page_in` finds it), or None where it is not on disk."""
        key = self.key(model_id, layer, config)
        path = self._entry_file(key, model_id, layer, config)
        share = page_cache.cached_fraction(path) if path is not None else None
        if path is not None and share is None:  # evicted since: the next lookup asks the index
            self._files.pop(key, None)
        return share

    def _entry_file(self, key: str, model_id: str, layer: Union[int, str], config: ConfigLike) -> Optional[str]:
        """The file of a disk entry: the one this process last read it from, else the index's (one
        lookup, remembered), or None where it is not on disk."""
        path = self._files.get(key)
        if path is None:
            found = self.entry_path(model_id, layer, config)
            if found is None:
                return None
            path = self._files[key] = str(found)
        return path

    def entry_path(self, model_id: str, layer: Union[int, str], config: ConfigLike) -> Optional[Path]:
        """The file holding the entry on disk, or None."""
        try:
            handle = self._disk.get(self.key(model_id, layer, config), read=True)
        except (OSError, sqlite3.Error, diskcache.Timeout):
            return None
        if handle is None:
            return None
        with handle:
            return Path(handle.name)

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

    # -- internals --------------------------------------------------------------------
    def _get(self, key: str, memory: bool, mapped: bool = False, drop_pages: bool = False,
             read_into: Optional[Callable[[int], mmap.mmap]] = None) -> Optional[CachedLayer]:
        with self._lock:
            entry = self._memory.get(key)
            if entry is not None:
                self._stats.memory_hits += 1
                return entry
            self._stats.memory_misses += 1
        # outside the lock: a prefetch thread's disk read blocks no one
        entry = self._read(key, mapped=mapped, drop_pages=drop_pages, read_into=read_into)
        with self._lock:
            if entry is None:
                self._stats.disk_misses += 1
                return None
            self._stats.disk_hits += 1
        if memory:
            entry = self._remember(key, entry)
        return entry

    def _read(self, key: str, remove: bool = True, mapped: bool = False, recheck: bool = False,
              drop_pages: bool = False, read_into: Optional[Callable[[int], mmap.mmap]] = None) -> Optional[CachedLayer]:
        """Read, check and parse one disk entry: one read() into a private buffer the tensors
        view, or with ``mapped`` a copy-on-write map of the file, or with ``read_into`` a read past
        the page cache into the buffer it gives (see :meth:`get`); with
        ``drop_pages`` the file's pages leave the page cache once read (once unmapped).
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
            self._files[key] = path
            try:
                stat = os.fstat(handle.fileno())
                size = stat.st_size
                if read_into is not None and size:
                    target = read_into(size)
                    read = read_direct(path, target, size)
                    buffer = memoryview(target)[:size]
                elif mapped and size:
                    # No MAP_POPULATE: on a writable private map it copies every page (134 ms
                    # for 203 MB). The bytes are read into the page cache here instead, so
                    # whoever touches the mapping later finds them there.
                    page_in(handle.fileno(), size)
                    buffer = mmap.mmap(handle.fileno(), size, flags=mmap.MAP_PRIVATE,
                                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
                    read = size
                    if drop_pages:  # once the last tensor viewing the map is gone and it is unmapped
                        weakref.finalize(buffer, page_cache.drop_pages, os.dup(handle.fileno()))
                else:
                    buffer = owned_buffer(size)
                    read = handle.readinto(buffer)
                    if drop_pages:
                        page_cache.drop_pages(os.dup(handle.fileno()))
            except (OSError, ValueError) as exc:
                logger.warning("cannot read %s: %s", path, exc)
                return None
        try:
            if read != size:
                raise ValueError("checksum mismatch (truncated file)")
            if recheck or self._hashed.needs_hash(key, tag, stat):
                if checksum(buffer) != tag:
                    raise ValueError("checksum mismatch (truncated or altered file)")
                self._hashed.hashed(key, tag, stat)
            entry, metadata = deserialize(buffer)
            if metadata.get("format") != str(FORMAT_VERSION):
                raise ValueError(f"format {metadata.get('format')} is not {FORMAT_VERSION}")
        except (ValueError, KeyError, TypeError, json.JSONDecodeError, RuntimeError) as exc:
            logger.warning("corrupt layer cache entry %s (%s): %s", path, exc,
                           "removed, treated as a miss" if remove else "left in place (not removed)")
            self._hashed.forget(key, tag)
            with self._lock:
                self._stats.corrupt += 1
            if remove:
                remove_if_unchanged(self._disk, key, tag)
            return None
        return entry

    def _evict_to_limit(self, keep: str) -> None:
        """Evict least recently used entries (never ``keep``), one at a time, until the volume
        fits the limit: exactly as many as needed, oldest access first.

        Runs after the write commits so the entry's file is written outside the index lock;
        several writers may overshoot briefly, each then evicts down to the limit.
        """
        evicted = 0
        while self._disk.volume() > self.size_limit:
            key = least_recently_used(self.cache_dir, exclude=keep)
            if key is None:
                break
            with self._lock:
                self._memory.pop(key)
            evicted += bool(self._disk.delete(key))
        with self._lock:
            self._stats.disk_evictions += evicted

    def _remember(self, key: str, entry: CachedLayer) -> CachedLayer:
        """Keep ``entry`` in the memory tier (pinned first with ``pin_memory``, when it fits);
        returns the entry as kept."""
        if self.pin_memory and entry.nbytes <= self._memory.limit:
            try:
                entry = entry.pinned()
            except RuntimeError as exc:  # the driver refused page-locked memory: keep it pageable
                logger.warning("cannot pin a layer cache entry in host memory (%s); it stays pageable", exc)
                self.pin_memory = False
        with self._lock:
            self._stats.evictions += self._memory.put(key, entry)
        return entry

    def close(self) -> None:
        """Close the index connection; the files stay for the next process."""
        self._disk.close()

    def __enter__(self) -> "LayerStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.cache_dir)!r}, max_cache_size_gb={self.size_limit / GB:g})"

