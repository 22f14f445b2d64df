"""How the layer cache's files reach the disk and the page cache; the one module that knows
anything of diskcache beyond its public API.

diskcache owns the SQLite index, the size accounting and the locking that make one directory
safe for several processes. Two things sli needs are not in its public API, and both live
here, pinned by tests (tests/test_cache_disk.py):

- durable writes: :class:`DurableDisk` overrides the public ``Disk.store`` for file-like
  values (temporary name, fsync, rename) and hands every other value to diskcache;
- exact least-recently-used eviction: :func:`least_recently_used` reads the index's
  ``access_time`` column (diskcache maintains it for ``eviction_policy="least-recently-used"``)
  through a read-only connection of its own; the deletions go through ``Cache.delete``;
- each entry's size and last use for ``sli cache info`` (:func:`index_rows`), read the same way.
"""
from __future__ import annotations

import logging
import mmap
import os
import shutil
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

import diskcache
from diskcache.core import MODE_BINARY

from .errors import CacheError
from .settings import GB

logger = logging.getLogger(__name__)

SUPPORTED_DISKCACHE = ((5, 6), (6, 0))  # [lowest, first unsupported)
INDEX_FILE = "cache.db"  # diskcache's index inside the cache directory


def check_diskcache_version(version: str = diskcache.__version__) -> None:
    """Raise a one-line :class:`CacheError` when the installed diskcache is outside the range
    sli was tested with."""
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    low, high = SUPPORTED_DISKCACHE
    if not low <= parts < high:
        raise CacheError(f"diskcache {version} is installed; sli supports diskcache >={low[0]}.{low[1]},<{high[0]}: "
                         f"pip install 'diskcache>={low[0]}.{low[1]},<{high[0]}'")


class DurableDisk(diskcache.Disk):
    """diskcache's Disk, writing each file-like value under a temporary name, fsynced, then
    renamed into place.

    diskcache inserts the index row only after ``store`` returns, so a process killed in the
    middle of a write leaves at most a stray temporary file, never a served entry; and the
    file is whole on disk before its name exists (diskcache's own writer neither syncs nor
    renames, so a crash could leave a committed row naming a short file).
    """

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        if not read:
            return super().store(value, read, key)
        filename, full_path = self.filename(key, value)
        return write_durably(full_path, value), MODE_BINARY, filename, None


def write_durably(full_path: str, reader) -> int:
    """Write what ``reader.read()`` hands out (until ``b""``) to ``full_path`` through a
    temporary file, fsync, rename; returns the bytes written."""
    directory = os.path.dirname(full_path)
    tmp_path = f"{full_path}.{os.getpid()}.{threading.get_ident()}.tmp"
    for attempt in range(10):
        try:
            os.makedirs(directory, exist_ok=True)
            writer = open(tmp_path, "wb")
            break
        except FileNotFoundError:
            # Tolerated race, as in diskcache's own writer: another process's Disk.remove
            # pruned an (empty) sub-directory between makedirs's two mkdirs, or between
            # makedirs and open.
            if attempt == 9:
                raise
    try:
        with writer:
            size = 0
            for chunk in iter(reader.read, b""):
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


def least_recently_used(cache_dir: Path, exclude: str) -> Optional[str]:
    """The key whose entry was used longest ago (never ``exclude``), or None."""
    uri = f"file:{Path(cache_dir) / INDEX_FILE}?mode=ro"
    connection = sqlite3.connect(uri, uri=True, timeout=60)
    try:
        row = connection.execute("SELECT key FROM Cache WHERE key != ? ORDER BY access_time LIMIT 1",
                                 (exclude,)).fetchone()
    finally:
        connection.close()
    return row[0] if row else None


def is_layer_cache(cache_dir: Path) -> bool:
    """True when ``cache_dir`` holds a layer cache's index."""
    return (Path(cache_dir) / INDEX_FILE).is_file()


def index_rows(cache_dir: Path) -> Dict[str, Tuple[Optional[int], Optional[float]]]:
    """key -> (bytes, last access time in seconds since the epoch) from the index, read-only;
    {} when it cannot be read (``size`` and ``access_time`` columns of diskcache's table)."""
    uri = f"file:{Path(cache_dir) / INDEX_FILE}?mode=ro"
    try:
        connection = sqlite3.connect(uri, uri=True, timeout=10)
    except sqlite3.Error:
        return {}
    try:
        rows = connection.execute("SELECT key, size, access_time FROM Cache").fetchall()
    except sqlite3.Error:
        return {}
    finally:
        connection.close()
    return {key: (size, access) for key, size, access in rows if isinstance(key, str)}


T = TypeVar("T")
_devnull: Optional[int] = None
_page_in_pool: Optional[ThreadPoolExecutor] = None
_page_in_lock = threading.Lock()
PAGE_IN_STREAMS = 4  # a single stream reads 1.65-1.85 GB/s on these VMs' disks, four 1.95-2.0 (docs/benchmarks.md)
PAGE_IN_MIN_PART = 8 << 20  # smaller parts gain nothing from a stream of their own


def page_in(fd: int, size: int, streams: int = PAGE_IN_STREAMS) -> None:
    """Read a file into the page cache without copying it into this process.

    ``sendfile`` to /dev/null reads the file in large sequential requests and the pages count
    in no one's RSS. Page faults on a cold mapping would read it a readahead window at a time,
    several times slower; ``MADV_WILLNEED`` reads only the first window (Linux caps it at the
    readahead size). A large file is read as ``streams`` parts at once, which keeps more
    requests in flight than one stream does. Where sendfile cannot do this, faults do.
    """
    _in_parts(size, streams, lambda start, end: send_to_null(fd, start, end))


def _in_parts(length: int, streams: int, read: Callable[[int, int], T]) -> List[T]:
    """``read(start, end)`` over bytes ``0..length`` as up to ``streams`` page-aligned parts at
    once (parts of at least :data:`PAGE_IN_MIN_PART`); what the calls return."""
    parts = max(1, min(streams, length // PAGE_IN_MIN_PART))
    if parts == 1:
        return [read(0, length)]
    step = -(-length // parts)
    step += -step % mmap.PAGESIZE
    return list(_pool().map(lambda start: read(start, min(length, start + step)), range(0, length, step)))


DIRECT_ALIGN = 4096  # O_DIRECT's offsets, lengths and addresses: a multiple of the disk's logical block
# (the parts' bounds are page-aligned: a multiple of it)


def read_direct(path: str, buffer: mmap.mmap, size: int, streams: int = PAGE_IN_STREAMS) -> int:
    """Read the first ``size`` bytes of the file at ``path`` into ``buffer`` (page-aligned, at
    least ``size`` rounded up to :data:`DIRECT_ALIGN`) past the page cache (``O_DIRECT``), as
    ``streams`` parts at once; the bytes read.

    For a file read whole every pass and never kept (a streamed layer the page cache has no
    room for) the page cache is pure cost: each page is allocated, charged to the memory
    cgroup, mapped, faulted in and dropped again. Read straight into a buffer the process
    reuses, 2.8 GB of a 7B NF4 model's layers under a 2 GB cap took 0.017 CPU-s a GB against
    0.095-0.146 through ``sendfile`` and a map, and read faster (docs/benchmarks.md). Where the
    file system refuses ``O_DIRECT`` (tmpfs), the bytes are read through the page cache and
    its pages dropped."""
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return _read_parts(path, direct, buffer, size, streams)
        except OSError as exc:  # EINVAL: no O_DIRECT here
            logger.debug("O_DIRECT read of %s failed (%s); reading through the page cache", path, exc)
    return _read_parts(path, 0, buffer, size, streams)


def _read_parts(path: str, direct: int, buffer: mmap.mmap, size: int, streams: int) -> int:
    fd = os.open(path, os.O_RDONLY | direct)
    try:
        with memoryview(buffer) as view:
            def part(start: int, end: int) -> int:
                done = start
                while done < end:
                    got = os.preadv(fd, [view[done:end]], done)
                    done += max(0, got)
                    if got <= 0 or got % DIRECT_ALIGN:  # the end of the file
                        break
                return done - start

            read = sum(_in_parts(min(len(view), -(-size // DIRECT_ALIGN) * DIRECT_ALIGN), streams, part))
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return min(read, size)
    finally:
        os.close(fd)


def _pool() -> ThreadPoolExecutor:
    global _page_in_pool
    with _page_in_lock:
        if _page_in_pool is None:
            # two files at once: a read ahead (LayerStore.page_in) and the layer being fetched,
            # whose parts (often already cached) must not queue behind the other file's
            _page_in_pool = ThreadPoolExecutor(max_workers=2 * PAGE_IN_STREAMS, thread_name_prefix="sli-page-in")
        return _page_in_pool


def _null_fd() -> int:
    global _devnull
    with _page_in_lock:
        if _devnull is None:
            _devnull = os.open(os.devnull, os.O_WRONLY)
        return _devnull


def send_to_null(fd: int, start: int, end: int) -> int:
    """Read bytes ``start..end`` of file ``fd`` into the page cache (``sendfile`` to /dev/null);
    the bytes read, fewer where sendfile fails (logged: pages will fault in instead)."""
    done = start
    try:
        null = _null_fd()
        while done < end:
            sent = os.sendfile(null, fd, done, end - done)
            if sent <= 0:
                break
            done += sent
    except (OSError, AttributeError) as exc:  # AttributeError: no os.sendfile on this platform
        logger.debug("page-in by sendfile failed (%s); pages will fault in", exc)
    return done - start


def free_space(path: Path) -> str:
    """"N GiB free on DIR" for the nearest existing folder of ``path``."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return "free space unknown"
    return f"{usage.free / GB:.2f} GiB free on {probe}"
