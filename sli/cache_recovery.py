"""What keeps a shared layer-cache directory sound when files change underneath it: which
files this process has already hashed, removing a bad entry only while it is still the one
read, and sweeping the temporaries that writers killed mid-write left behind.

The checksum itself is :func:`sli.cache_format.checksum`; :class:`sli.layer_store.LayerStore`
decides when to call it (:meth:`HashedFiles.needs_hash`).
"""
from __future__ import annotations

import glob
import os
import time
from pathlib import Path
from typing import Dict, Tuple

import diskcache

from .settings import DEFAULT_SETTINGS

# (st_dev, st_ino, st_size, st_mtime_ns): a file is re-hashed when any of them changes
FileIdentity = Tuple[int, int, int, int]


def file_identity(stat: os.stat_result) -> FileIdentity:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


class HashedFiles:
    """The entry files whose checksum this process has checked, by (key, tag) → file identity.

    A file is hashed on its first read and again whenever its identity changes, so a layer
    streamed every token is hashed once, not once per token. A file modified within
    ``DEFAULT_SETTINGS["racy_mtime_s"]`` of its check is not remembered: a write in the same
    mtime tick would leave its identity unchanged (git's "racy" files).
    """

    def __init__(self) -> None:
        self._checked: Dict[Tuple[str, str], FileIdentity] = {}

    def needs_hash(self, key: str, tag: str, stat: os.stat_result) -> bool:
        return self._checked.get((key, tag)) != file_identity(stat)

    def hashed(self, key: str, tag: str, stat: os.stat_result) -> None:
        """``key``'s file, as ``stat`` describes it, matched its checksum ``tag``."""
        if time.time() - stat.st_mtime_ns / 1e9 >= DEFAULT_SETTINGS["racy_mtime_s"]:
            self._checked[(key, tag)] = file_identity(stat)

    def forget(self, key: str, tag: str) -> None:
        self._checked.pop((key, tag), None)


def remove_if_unchanged(disk: diskcache.Cache, key: str, tag: str) -> None:
    """Delete ``key`` only while its checksum is still ``tag``: another process may have
    rewritten it since we read it. (Inside a transaction diskcache unlinks the file before
    the commit; a crash in between leaves a row without a file, which reads as a miss and is
    overwritten by the next put.)"""
    with disk.transact():
        handle, current = disk.get(key, read=True, tag=True)
        if handle is not None:
            handle.close()
        if current == tag:
            disk.delete(key)


def sweep_temporaries(cache_dir: Path, max_age_s: float = DEFAULT_SETTINGS["temporary_max_age_s"]) -> None:
    """Delete temporary files that writers killed mid-write left behind.

    They were never in the index (never served) but take space the size limit does not see.
    Only old ones go: a young one may be another process's write in progress.
    """
    cutoff = time.time() - max_age_s
    # glob.glob, not Path.glob: it skips sub-directories that vanish mid-walk (another
    # process's diskcache prunes empty ones), where Path.glob raises FileNotFoundError.
    for name in glob.glob(os.path.join(glob.escape(str(cache_dir)), "*", "*", "*.tmp")):
        try:
            if os.stat(name).st_mtime < cutoff:
                os.remove(name)
        except OSError:  # tolerated race: another process swept it first
            pass
