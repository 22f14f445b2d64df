"""How much memory and page cache a streamed model can count on (a cgroup's limit included),
dropping a file's pages, whether an address is a file's mapping, and letting go of a mapping's
pages once they are read.

A streamed layer is read into the page cache and computed from there (a mapping). Every token
reads the streamed layers in the same order, which is the worst case for the kernel's
least-recently-used page cache: when they do not all fit, each read evicts the page that will be
needed soonest, so nothing is ever found there again, and under a memory limit (a cgroup, a
small machine) the reclaim that makes room for each read lands on the reading thread. The
memory plan therefore splits the streamed layers: those that fit the room this module measures
keep their pages (read from disk once, from the page cache after), the rest have theirs dropped
as soon as they are used (``posix_fadvise(DONTNEED)``), so they push nothing else out.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np
import psutil

logger = logging.getLogger(__name__)
_LIBC = ctypes.CDLL(None, use_errno=True)

# A cgroup v1 limit at or above this is "no limit" (the kernel writes 2**63 rounded to a page)
_UNLIMITED = 1 << 62


def memory_limit(proc: str = "/proc/self") -> Optional[int]:
    """The memory limit of this process's cgroup (RAM and page cache together; the smallest along
    its path up to the hierarchy's root), cgroup v1 or v2, or None where there is none."""
    group = _limiting_group(proc)
    return group[1] if group else None


def _limiting_group(proc: str) -> Optional[Tuple[Path, int]]:
    """(folder, limit) of the cgroup with the smallest limit on this process's path, or None."""
    limits = [(path, value) for path, name in _cgroup_dirs(proc) for value in [_read_limit(path / name)] if value]
    return min(limits, key=lambda group: group[1]) if limits else None


def _anonymous_bytes(folder: Path) -> Optional[int]:
    """The anonymous memory (RAM that is no file's pages) of every process in the cgroup at
    ``folder`` and below: ``total_rss`` of cgroup v1's memory.stat, ``anon`` of v2's."""
    try:
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines() if line.count(" ") == 1)
    except (OSError, ValueError):
        return None
    value = stat.get("total_rss", stat.get("anon"))
    return int(value) if value is not None and value.isdigit() else None


def _cgroup_dirs(proc: str) -> Iterator[Tuple[Path, str]]:
    """``(folder, limit file)`` for each cgroup from this process's own up to its mount's root."""
    try:
        groups = Path(proc, "cgroup").read_text().splitlines()
        mounts = Path(proc, "mountinfo").read_text().splitlines()
    except OSError:
        return
    for line in mounts:
        pre, _, post = line.partition(" - ")
        fields, kinds = pre.split(), post.split()
        if len(fields) < 5 or len(kinds) < 3:
            continue
        root, point = fields[3], Path(fields[4])
        if kinds[0] == "cgroup" and "memory" in kinds[2].split(","):
            wanted, limit_file = (lambda ctl: "memory" in ctl.split(",")), "memory.limit_in_bytes"
        elif kinds[0] == "cgroup2":
            wanted, limit_file = (lambda ctl: ctl == ""), "memory.max"
        else:
            continue
        for group in groups:
            parts = group.split(":", 2)
            if len(parts) != 3 or not wanted(parts[1]):
                continue
            relative = os.path.relpath(parts[2], root) if parts[2].startswith(root) else None
            if relative is None or relative.startswith(".."):
                continue
            folder = (point / relative).resolve() if relative != "." else point
            while True:
                yield folder, limit_file
                if folder == point or point not in folder.parents:
                    break
                folder = folder.parent


def _read_limit(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():  # "max" (cgroup v2): no limit
        return None
    value = int(text)
    return value if 0 < value < _UNLIMITED else None


def memory_available(proc: str = "/proc/self") -> int:
    """Bytes this process can still take: the machine's available memory, and under a cgroup
    limit no more than the limit less this process's resident memory and the anonymous memory
    of the other processes in the group (``psutil`` reports the host's memory inside a
    container, not the container's)."""
    return _available(_limiting_group(proc))


def _available(group: Optional[Tuple[Path, int]]) -> int:
    available = psutil.virtual_memory().available
    if group is None:
        return available
    folder, limit = group
    own = psutil.Process().memory_info()
    in_group = _anonymous_bytes(folder)
    others = max(0, in_group - (own.rss - own.shared)) if in_group is not None else 0  # rss - shared: own anonymous
    return max(0, min(available, limit - own.rss - others))


def room(planned_bytes: int, margin: float = 0.02, proc: str = "/proc/self") -> int:
    """Bytes the page cache can hold beside this process once it holds ``planned_bytes`` more
    than now: the memory available (:func:`memory_available`) less the planned bytes and a
    ``margin`` of the limit (or, without one, of the memory available). Page cache past a
    limit is reclaimed, not a reason to kill anyone: the margin only keeps a little growth
    (the allocator, a longer KV cache) from evicting the layers meant to stay."""
    group = _limiting_group(proc)
    available = _available(group)
    return max(0, available - int(margin * (group[1] if group else available)) - planned_bytes)


def in_file_mapping(address: int) -> bool:
    """Whether ``address`` lies in a mapping of a file by this process (False where
    ``/proc/self/maps`` cannot be read)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                start, end = (int(v, 16) for v in fields[0].split("-"))
                if start <= address < end:
                    return len(fields) > 5 and fields[5].startswith("/")
    except (OSError, ValueError, IndexError):
        pass
    return False


def unmap_read_pages(address: int, nbytes: int) -> None:
    """Take the whole pages in ``[address, address + nbytes)`` of a file's mapping out of this
    process's memory (``madvise(MADV_DONTNEED)``): its RSS falls by them, the page cache keeps
    them (clean, so reclaimable), and a later read maps them in again from the file. For bytes
    this process only read: a page it wrote in a private map would read as the file's again.
    Does nothing where ``madvise`` fails (the pages stay mapped)."""
    page = mmap.PAGESIZE
    start, stop = -(-address // page) * page, (address + nbytes) // page * page
    if stop <= start:
        return
    if _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), mmap.MADV_DONTNEED) != 0:
        logger.debug("unmapping read pages failed: errno %d", ctypes.get_errno())


def drop_pages(fd: int) -> None:
    """Drop a file's clean pages from the page cache (nothing to do where they are mapped or
    dirty); closes ``fd``."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError) as exc:  # AttributeError: no posix_fadvise on this platform
        logger.debug("dropping a file's pages failed: %s", exc)
    finally:
        os.close(fd)


def cached_fraction(path) -> Optional[float]:
    """The share of the file at ``path`` whose pages are in the page cache (``mincore`` over a
    private map of it: mapping touches no page), or None where it cannot be told."""
    try:
        size = os.path.getsize(path)
        if not size:
            return None
        with open(path, "rb") as f, mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE,
                                              prot=mmap.PROT_READ | mmap.PROT_WRITE) as m:
            pages = -(-size // mmap.PAGESIZE)
            vec = np.zeros(pages, dtype=np.uint8)
            anchor = ctypes.c_char.from_buffer(m)  # the map's address (released before the map closes)
            try:
                done = _LIBC.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size),
                                     vec.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
            finally:
                del anchor
            return float((vec & 1).sum()) / pages if done == 0 else None
    except (OSError, ValueError, TypeError):
        return None
