"""Run a benchmark child inside a cgroup v1 memory cgroup: RAM and page cache limited to N MB.

``MemoryCap(mb)`` makes a child of this process's own memory cgroup (the ``memory`` line of
``/proc/self/cgroup``, under the v1 ``memory`` hierarchy's mount, usually
``/sys/fs/cgroup/memory``), sets ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes``
where swap accounting exists, so swap cannot stand in for RAM) and removes it on ``close()``.
``cap.wrap(cmd)`` prefixes a command with ``/bin/sh -c 'echo $$ > .../cgroup.procs && exec
"$@"'``: the shell moves itself into the cgroup and then becomes the command (same pid), so
the whole process, from its first page, is charged there. The limit covers the process's
anonymous memory and every page-cache page it brings in, as on a machine with N MB.

Page-cache pages are charged to the cgroup that first read them: a file already cached by
another process is free for the capped child. The benchmark therefore evicts its model files
from the page cache before each capped run (``evict``, ``posix_fadvise(DONTNEED)``).

``cap.stats()`` reads ``memory.max_usage_in_bytes`` (peak of RAM + page cache),
``memory.failcnt`` (how often the usage hit the limit and the kernel reclaimed; the 6.18 kernel of
the benchmark VMs left it at 0 even when the cgroup was OOM-killed at its limit, so ``hit_limit``
is also set when the peak is within 2 MiB of the limit), the OOM killer's count (``oom_kill`` of
``memory.oom_control``) and ``memory.stat``.

Root only, cgroup v1 only: ``check()`` says why not in one line (``CapError``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

_seq = 0


class CapError(RuntimeError):
    """Why a memory cap cannot be set, in one line."""


def memory_mount() -> Optional[Path]:
    """Mount point of the cgroup v1 ``memory`` hierarchy, or None."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                fields, sfields = pre.split(), post.split()
                if len(sfields) >= 3 and sfields[0] == "cgroup" and "memory" in sfields[2].split(","):
                    return Path(fields[4])
    except OSError:
        pass
    p = Path("/sys/fs/cgroup/memory")
    return p if (p / "memory.limit_in_bytes").exists() else None


def cgroup_of(pid) -> Optional[str]:
    """The memory cgroup path of ``pid`` (``"self"`` or a number), or None."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                parts = line.rstrip("\n").split(":", 2)
                if len(parts) == 3 and "memory" in parts[1].split(","):
                    return parts[2]
    except OSError:
        pass
    return None


def own_memory_cgroup() -> Optional[str]:
    """This process's memory cgroup path (``/a/b``) from ``/proc/self/cgroup``, or None."""
    return cgroup_of("self")


def check() -> Path:
    """The directory of this process's memory cgroup, where a child can be made; ``CapError``
    (one line) when not root or cgroup v1's memory controller is not mounted."""
    if os.geteuid() != 0:
        raise CapError("--cap-mb needs root (it makes a memory cgroup under /sys/fs/cgroup/memory)")
    mount = memory_mount()
    rel = own_memory_cgroup()
    if mount is None or rel is None:
        raise CapError("--cap-mb needs cgroup v1 with the memory controller mounted (/sys/fs/cgroup/memory); "
                       "this machine has none (cgroup v2 only?)")
    parent = mount / rel.lstrip("/")
    if not (parent / "memory.limit_in_bytes").is_file():
        raise CapError(f"--cap-mb: no memory.limit_in_bytes in {parent} (this process's memory cgroup)")
    if not os.access(parent, os.W_OK):
        raise CapError(f"--cap-mb: cannot make a cgroup in {parent} (read-only)")
    return parent


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _int(path: Path) -> Optional[int]:
    s = _read(path).strip()
    return int(s) if s.lstrip("-").isdigit() else None


class MemoryCap:
    """A fresh memory cgroup limited to ``mb`` MB (10^6 bytes), child of this process's own."""

    def __init__(self, mb: float, name: Optional[str] = None):
        global _seq
        parent = check()
        _seq += 1
        self.mb = mb
        self.limit = int(mb * 1e6)
        self.path = parent / (name or f"sli-bench-{os.getpid()}-{_seq}")
        if self.path.exists():
            self._rmdir()
        self.path.mkdir()
        try:
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
            memsw = self.path / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                memsw.write_text(str(self.limit))
        except OSError as exc:
            self._rmdir()
            raise CapError(f"--cap-mb: cannot set the limit in {self.path}: {exc}") from exc
        got = _int(self.path / "memory.limit_in_bytes")
        self.limit_set = got  # the kernel rounds down to whole pages
        # the cgroup path as /proc/<pid>/cgroup shows it, to check the child is inside
        self.rel = "/" + str(self.path.relative_to(memory_mount())).lstrip("/")

    def wrap(self, cmd: List[str]) -> List[str]:
        """``cmd`` started so that it lives in this cgroup from its first instruction."""
        procs = str(self.path / "cgroup.procs")
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs] + [str(c) for c in cmd]

    def stats(self) -> Dict[str, object]:
        oom = {}
        for line in _read(self.path / "memory.oom_control").splitlines():
            k, _, v = line.partition(" ")
            if v.strip().isdigit():
                oom[k] = int(v)
        stat = {}
        for line in _read(self.path / "memory.stat").splitlines():
            k, _, v = line.partition(" ")
            if k in ("cache", "rss", "mapped_file", "pgmajfault", "total_cache", "total_rss", "total_mapped_file",
                     "total_pgmajfault", "total_inactive_file", "total_active_file"):
                stat[k] = int(v)
        max_usage = _int(self.path / "memory.max_usage_in_bytes")
        failcnt = _int(self.path / "memory.failcnt")
        # reached the limit: failcnt > 0, or a peak within 2 MiB of it (some kernels leave failcnt at 0
        # even when the cgroup is reclaimed or OOM-killed at its limit)
        hit = bool(failcnt) or (max_usage is not None and self.limit_set is not None
                                and max_usage >= self.limit_set - 2 * 1024 * 1024)
        return {"cap_mb": self.mb, "limit_bytes": self.limit_set, "cgroup": self.rel,
                "max_usage_bytes": max_usage, "max_usage_mb": None if max_usage is None else max_usage / 1e6,
                "hit_limit": hit, "failcnt": failcnt,
                "oom_kills": oom.get("oom_kill"), "under_oom": oom.get("under_oom"), "stat": stat}

    def _rmdir(self, tries: int = 50) -> bool:
        for _ in range(tries):
            try:
                self.path.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError:  # a process still exiting; its charges are moved to the parent on rmdir
                left = _read(self.path / "cgroup.procs").split()
                if left:
                    time.sleep(0.1)
                    continue
                time.sleep(0.1)
        return False

    def close(self) -> bool:
        """Remove the cgroup (its page-cache charges go to the parent); False if it would not go."""
        return self._rmdir()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def evict(paths: Iterable) -> int:
    """Drop the clean, unmapped page-cache pages of every file under ``paths`` (``posix_fadvise
    DONTNEED``), so that a capped child that reads them is charged for them; returns the files."""
    n = 0
    for p in paths:
        if not p:
            continue
        p = Path(p)
        files = [p] if p.is_file() else [Path(r) / f for r, _, fs in os.walk(p) for f in fs] if p.is_dir() else []
        for f in files:
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            except OSError:
                pass
            finally:
                os.close(fd)
    return n


def main(argv=None) -> int:
    """``python benchmarks/memory_cap.py MB -- CMD ...``: run CMD capped, print the cgroup's stats."""
    import json
    import subprocess
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[1] != "--":
        print("usage: memory_cap.py MB -- CMD [ARGS...]", file=sys.stderr)
        return 2
    try:
        cap = MemoryCap(float(argv[0]))
    except CapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        rc = subprocess.call(cap.wrap(argv[2:]))
        print(json.dumps(cap.stats()), file=sys.stderr)
    finally:
        cap.close()
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
