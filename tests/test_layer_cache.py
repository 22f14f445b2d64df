"""LayerCache: the store between the quantizer and the streaming processor.

Entries here are small CachedLayer objects with known contents, so every test can say
exactly which bytes must come back. Tests that need several processes run short worker
scripts with ``python -c`` (no fork of a process that holds torch threads).
"""
import errno
import functools
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from unittest import mock

import diskcache
import pytest
import torch
from torch import nn

from sli.errors import CacheError, SLIError
import sqlite3

import sli.layer_store as layer_store
from sli.layer_cache import LayerCache
from sli.settings import DEFAULT_SETTINGS, GB
from sli.quantization import CachedLayer, LayerQuantizer, QuantizationConfig

KB = 1024
REPO = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)  # the same object for the same arguments: tests only compare them
def make_entry(seed: int, nbytes: int = 16 * KB) -> CachedLayer:
    """A layer of ``nbytes`` uint8 values derived from ``seed``, plus a small float norm."""
    values = torch.arange(256, dtype=torch.uint8).repeat(nbytes // 256 + 1)[:nbytes] + (seed * 7) % 256
    return CachedLayer({"mlp.weight": values, "norm.weight": torch.full((8,), float(seed))},
                       {"mlp": {"codec": "none", "shape": [nbytes], "dtype": "uint8", "seed": seed}})


def same(a: CachedLayer, b: CachedLayer) -> bool:
    return a.linears == b.linears and a.tensors.keys() == b.tensors.keys() and all(
        torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def entry_path(cache: LayerCache, model_id, layer, config) -> Path:
    """The file diskcache keeps an entry in (random name inside the cache directory)."""
    handle = cache._disk.get(cache.key(model_id, layer, config), read=True)
    handle.close()
    return Path(handle.name)


@pytest.fixture
def cache(tmp_path):
    """A 4 MiB disk tier with a 64 KiB memory tier (four 16 KiB entries)."""
    with LayerCache(tmp_path / "cache", max_cache_size_gb=4 * 1024 * KB / GB,
                    max_memory_cache_size_gb=64 * KB / GB) as layer_cache:
        yield layer_cache


@pytest.fixture
def disk_only(tmp_path):
    """Memory tier off: every get() reads the disk."""
    with LayerCache(tmp_path / "cache", max_cache_size_gb=4 * 1024 * KB / GB,
                    max_memory_cache_size_gb=0) as layer_cache:
        yield layer_cache


# -- hits and misses per tier --------------------------------------------------------------

def test_miss_then_disk_hit_then_memory_hit(tmp_path):
    entry = make_entry(1)
    with LayerCache(tmp_path, max_cache_size_gb=0.01, max_memory_cache_size_gb=0.01) as writer:
        assert writer.get("m", 0, "none") is None  # miss in both tiers
        assert writer.put("m", 0, "none", entry) > entry.nbytes  # bytes written, header included
    with LayerCache(tmp_path, max_cache_size_gb=0.01, max_memory_cache_size_gb=0.01) as cache:
        assert cache.contains("m", 0, "none") and not cache.contains("m", 1, "none")
        assert same(cache.get("m", 0, "none"), entry)  # disk hit, promoted
        assert same(cache.get("m", 0, "none"), entry)  # memory hit
        stats = cache.stats()
        assert (stats.memory_hits, stats.memory_misses, stats.disk_hits, stats.disk_misses) == (1, 1, 1, 0)
        assert stats.entries == 1 and stats.memory_bytes == entry.nbytes
        assert json.loads(json.dumps(stats.to_dict()))["disk_hits"] == 1


def test_get_with_memory_false_does_not_promote(disk_only, tmp_path):
    disk_only.put("m", 0, "none", make_entry(1))
    with LayerCache(tmp_path / "cache", max_cache_size_gb=0.01, max_memory_cache_size_gb=0.01) as cache:
        assert cache.get("m", 0, "none", memory=False) is not None
        assert cache.get("m", 0, "none", memory=False) is not None
        stats = cache.stats()
        assert (stats.disk_hits, stats.memory_hits, stats.memory_bytes) == (2, 0, 0)


def test_a_mapped_hit_views_the_file_and_stays_out_of_the_memory_tier(tmp_path):
    entry = make_entry(3)
    with LayerCache(tmp_path, max_cache_size_gb=0.01, max_memory_cache_size_gb=0.01) as cache:
        cache.put("m", 0, "none", entry)
    with LayerCache(tmp_path, max_cache_size_gb=0.01, max_memory_cache_size_gb=0.01) as cache:
        mapped = cache.get("m", 0, "none", mapped=True)
        assert same(mapped, entry)
        path = entry_path(cache, "m", 0, "none")
        cache.delete("m", 0, "none")  # eviction unlinks the file; the mapping stays valid
        assert not path.exists() and same(mapped, entry)
        stats = cache.stats()
        assert (stats.disk_hits, stats.memory_bytes) == (1, 0)


def test_memory_hit_does_not_read_the_disk(cache):
    cache.put("m", 0, "none", make_entry(1))
    with mock.patch.object(cache, "_read", side_effect=AssertionError("disk read on a memory hit")):
        assert same(cache.get("m", 0, "none"), make_entry(1))


def test_a_pinning_store_keeps_and_serves_its_memory_tier_pinned(tmp_path):
    # Pinning needs CUDA (tests/test_cuda.py pins for real); here a stand-in marks the copy.
    pinned_copies = []

    def pinned(entry):
        copy = CachedLayer({k: t.clone() for k, t in entry.tensors.items()}, entry.linears)
        pinned_copies.append(copy)
        return copy

    with mock.patch.object(CachedLayer, "pinned", pinned):
        with LayerCache(tmp_path, max_cache_size_gb=0.01, max_memory_cache_size_gb=0.01, pin_memory=True) as cache:
            cache.put("m", 0, "none", make_entry(1))  # kept pinned on the way in
            cache.put("m", 1, "none", make_entry(2), memory=False)
            assert cache.get("m", 0, "none") is pinned_copies[0]
            from_disk = cache.get("m", 1, "none")  # promoted: pinned, and that copy is served
            assert from_disk is pinned_copies[1] and same(from_disk, make_entry(2))
            assert cache.get("m", 1, "none") is pinned_copies[1] and len(pinned_copies) == 2
        with LayerCache(tmp_path, max_cache_size_gb=0.01, max_memory_cache_size_gb=0.01) as cache:
            assert same(cache.get("m", 0, "none"), make_entry(1)) and len(pinned_copies) == 2  # off by default


def test_an_entry_the_driver_will_not_pin_stays_in_the_memory_tier_pageable(tmp_path, caplog):
    def refuse(entry):
        raise RuntimeError("cudaHostAlloc: out of memory")

    with mock.patch.object(CachedLayer, "pinned", refuse):
        with LayerCache(tmp_path, max_cache_size_gb=0.01, max_memory_cache_size_gb=0.01, pin_memory=True) as cache:
            with caplog.at_level(logging.WARNING, logger="sli.layer_store"):
                cache.put("m", 0, "none", make_entry(1))
                cache.put("m", 1, "none", make_entry(2))
            assert same(cache.get("m", 0, "none"), make_entry(1)) and cache.stats().memory_entries == 2
    assert len([r for r in caplog.records if "cannot pin" in r.getMessage()]) == 1  # said once, then not tried


# -- LRU order and byte limits ------------------------------------------------------------

def test_memory_tier_evicts_least_recently_used(cache):
    # 64 KiB memory tier: four 16 KiB entries (plus the 32-byte norm) fit, not five... minus one
    # for the norm bytes, so three stay resident.
    for layer in range(3):
        cache.put("m", layer, "none", make_entry(layer))
    cache.get("m", 0, "none")  # 0 is now the most recently used
    cache.put("m", 3, "none", make_entry(3))  # evicts 1, the least recently used
    hits = cache.stats().memory_hits
    assert cache.get("m", 0, "none") is not None and cache.stats().memory_hits == hits + 1
    assert cache.get("m", 1, "none") is not None and cache.stats().disk_hits == 1  # from disk now
    stats = cache.stats()
    assert stats.evictions >= 1 and stats.memory_bytes <= 64 * KB


def test_memory_tier_skips_an_entry_larger_than_itself(cache):
    cache.put("m", 0, "none", make_entry(0, nbytes=128 * KB))
    assert cache.stats().memory_bytes == 0
    assert cache.get("m", 0, "none") is not None  # still served, from disk


def test_disk_tier_evicts_least_recently_used(disk_only):
    size = 512 * KB  # eight of these would pass the 4 MiB limit once the index is counted
    for layer in range(7):
        disk_only.put("m", layer, "none", make_entry(layer, size))
        time.sleep(0.01)  # access times must differ
    disk_only.get("m", 0, "none")  # touch 0: it becomes the most recently used
    disk_only.put("m", 7, "none", make_entry(7, size))
    assert disk_only.contains("m", 0, "none")
    assert not disk_only.contains("m", 1, "none")  # the least recently used went first
    assert all(disk_only.contains("m", layer, "none") for layer in range(2, 8))
    assert disk_only.stats().disk_evictions == 1  # exactly as many as needed, not a batch


def test_disk_bytes_stay_within_the_limit_after_many_inserts(disk_only):
    for i in range(60):
        disk_only.put("m", i, "none", make_entry(i, 100 * KB + 997 * (i % 7)))  # sizes vary
        stats = disk_only.stats()
        assert stats.disk_bytes <= disk_only.size_limit
    assert stats.entries > 20 and stats.disk_evictions > 0
    # Files on disk agree with the index: nothing evicted is left behind.
    files = [p for p in Path(disk_only.cache_dir).rglob("*.val")]
    assert len(files) == stats.entries


def test_entry_larger_than_the_whole_limit_raises(disk_only):
    with pytest.raises(CacheError, match="more than the whole cache limit"):
        disk_only.put("m", 0, "none", make_entry(0, nbytes=5 * 1024 * KB))
    assert disk_only.stats().entries == 0
    assert issubclass(CacheError, SLIError)


# -- keys: configs, models, names ------------------------------------------------------------

def test_configs_are_isolated(cache):
    nf4, nf4_blocks = QuantizationConfig(mode="nf4"), QuantizationConfig(mode="nf4", block_size=128)
    cases = [  # same model and layer under three configs: three entries, never crossed
        ("none", make_entry(10)),
        (nf4, make_entry(11)),
        (nf4_blocks, make_entry(12)),
    ]
    for config, entry in cases:
        cache.put("m", 5, config, entry)
    cache._memory.clear()  # read every one back from disk, not from the writer's memory
    cache._memory_bytes = 0
    for config, entry in cases:
        assert same(cache.get("m", 5, config), entry)
    assert cache.get("m", 5, "int8") is None
    assert cache.get("other-model", 5, "none") is None
    assert cache.stats().entries == 3
    # compute_dtype does not change the stored bytes, so it shares the entry.
    assert same(cache.get("m", 5, QuantizationConfig(mode="nf4", compute_dtype="bfloat16")), cases[1][1])


def test_named_layers_and_delete(cache):
    for layer in ("embed", "norm", "lm_head", 0):
        cache.put("m", layer, "none", make_entry(hash(str(layer)) % 100))
    cache.put("m", 0, "nf4", make_entry(1))
    assert cache.delete("m", "embed", "none") == 1
    assert cache.get("m", "embed", "none") is None
    assert cache.delete("m", 0) == 2  # config=None: every config of that layer
    assert not cache.contains("m", 0, "nf4") and cache.get("m", 0, "none") is None
    assert cache.delete("m", 0) == 0
    cache.clear()
    assert cache.stats().entries == 0 and cache.stats().memory_bytes == 0


def test_model_id_cannot_escape_the_cache_directory(tmp_path):
    cache_dir = tmp_path / "a" / "b" / "cache"
    with LayerCache(cache_dir, max_cache_size_gb=0.01) as cache:
        for model_id in ("../../etc", "/etc/passwd", "..\\..\\x", "m/../../../y"):
            cache.put(model_id, 0, "none", make_entry(3))
            assert same(cache.get(model_id, 0, "none", memory=False), make_entry(3))
        assert {e["model_id"] for e in cache.entries()} >= {"../../etc", "/etc/passwd"}  # readable ids kept
    outside = [p for p in tmp_path.rglob("*") if cache_dir not in p.parents and p != cache_dir]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in outside) == ["a", "a/b"]
    assert all(p.name.endswith(".val") or p.is_dir() or p.name.startswith("cache.db")
               for p in cache_dir.rglob("*"))


def test_file_header_carries_readable_metadata(cache):
    from safetensors import safe_open

    config = QuantizationConfig(mode="nf4")
    cache.put("org/model", "lm_head", config, make_entry(4))
    with safe_open(entry_path(cache, "org/model", "lm_head", config), "pt") as f:
        meta = f.metadata()
    assert (meta["model_id"], meta["layer"], meta["format"]) == ("org/model", "lm_head", "1")
    assert json.loads(meta["config"])["mode"] == "nf4"
    assert json.loads(meta["linears"])["mlp"]["seed"] == 4


def test_reopening_keeps_entries(tmp_path):
    with LayerCache(tmp_path, max_cache_size_gb=0.01) as cache:
        for layer in range(3):
            cache.put("m", layer, "int8", make_entry(layer))
    with LayerCache(tmp_path, max_cache_size_gb=0.01) as cache:
        assert cache.stats().entries == 3
        assert all(same(cache.get("m", layer, "int8"), make_entry(layer)) for layer in range(3))
        assert cache.stats().disk_hits == 3


# -- the reference API ---------------------------------------------------------------------

def test_cache_layer_and_get_layer(cache):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64))
    before = module[0].weight.detach().clone()
    cache.cache_layer("m", 0, module, "int8")  # plain module: quantized from its tensors
    assert type(module[0]) is nn.Linear and torch.equal(module[0].weight, before)  # caller's module untouched
    entry = cache.get_layer("m", 0)
    assert entry.linears["0"]["codec"] == "int8" and entry.tensors["0.weight"].dtype == torch.int8

    quantized = LayerQuantizer(QuantizationConfig(mode="fp8")).quantize_layer(nn.Sequential(nn.Linear(64, 64)))
    cache.cache_layer("m", 1, quantized, QuantizationConfig(mode="fp8"))  # already quantized: stored as is
    assert cache.get_layer("m", 1, "fp8").linears["0"]["codec"] == "fp8"

    cache.cache_layer("m", 1, make_entry(2), "none")  # a CachedLayer is stored as it is
    with pytest.raises(ValueError, match="2 configs"):
        cache.get_layer("m", 1)
    assert same(cache.get_layer("m", 1, "none"), make_entry(2))
    assert cache.get_layer("m", 9) is None


# -- durability and corruption --------------------------------------------------------------

@pytest.mark.parametrize("damage", [
    "truncate",  # a file cut short (e.g. a copy interrupted by a full disk)
    "flip",  # one flipped bit in the tensor data
    "header",  # the safetensors header altered
])
@pytest.mark.parametrize("mapped", [False, True], ids=["read", "mapped"])
def test_corrupt_file_is_caught_removed_and_counted(disk_only, damage, mapped, caplog):
    disk_only.put("m", 0, "none", make_entry(0))
    path = entry_path(disk_only, "m", 0, "none")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-100] ^= 0x04
    else:
        data[20] = ord(" ") if data[20] != ord(" ") else ord("x")
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="sli.layer_store"):
        assert disk_only.get("m", 0, "none", mapped=mapped) is None
    assert "corrupt layer cache entry" in caplog.text
    stats = disk_only.stats()
    assert (stats.corrupt, stats.disk_misses, stats.entries) == (1, 1, 0)
    assert not path.exists() and not disk_only.contains("m", 0, "none")


@pytest.mark.parametrize("mapped", [False, True], ids=["read", "mapped"])
def test_an_unchanged_file_is_hashed_once_and_an_altered_one_again(disk_only, mapped, monkeypatch):
    # A layer streamed every token would otherwise be hashed every token.
    disk_only.put("m", 0, "none", make_entry(0))
    path = entry_path(disk_only, "m", 0, "none")
    old = time.time() - 10 * DEFAULT_SETTINGS["racy_mtime_s"]
    os.utime(path, (old, old))
    hashed = []
    real_checksum = layer_store.checksum
    monkeypatch.setattr(layer_store, "checksum", lambda data: hashed.append(1) or real_checksum(data))
    for _ in range(3):
        assert same(disk_only.get("m", 0, "none", mapped=mapped), make_entry(0))
    assert len(hashed) == 1
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x04  # altered in place: same inode and size, a new mtime
    path.write_bytes(bytes(data))
    assert disk_only.get("m", 0, "none", mapped=mapped) is None
    assert disk_only.stats().corrupt == 1 and len(hashed) == 2


def test_a_file_written_moments_before_its_check_is_hashed_every_time(disk_only, monkeypatch):
    # Its mtime could survive an in-place change made within the clock's granularity.
    disk_only.put("m", 0, "none", make_entry(0))
    hashed = []
    real_checksum = layer_store.checksum
    monkeypatch.setattr(layer_store, "checksum", lambda data: hashed.append(1) or real_checksum(data))
    for _ in range(2):
        assert disk_only.get("m", 0, "none") is not None
    assert len(hashed) == 2


def test_verify_hashes_every_entry_even_when_checked_before(disk_only):
    disk_only.put("m", 0, "none", make_entry(0))
    path = entry_path(disk_only, "m", 0, "none")
    old = time.time() - 10 * DEFAULT_SETTINGS["racy_mtime_s"]
    os.utime(path, (old, old))
    assert disk_only.get("m", 0, "none") is not None  # checked, remembered
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x04
    path.write_bytes(bytes(data))
    os.utime(path, (old, old))  # even with the old mtime put back
    assert disk_only.verify() == [f"m:0:{QuantizationConfig().fingerprint()}"]


def test_verify_reports_and_removes_bad_entries(disk_only):
    for layer in range(3):
        disk_only.put("m", layer, "none", make_entry(layer))
    path = entry_path(disk_only, "m", 1, "none")
    path.write_bytes(path.read_bytes()[:-1])
    bad = [f"m:1:{QuantizationConfig().fingerprint()}"]
    assert disk_only.verify() == bad and disk_only.stats().entries == 3  # reported, kept
    assert disk_only.verify(remove=True) == bad and disk_only.stats().entries == 2
    assert disk_only.verify() == []


def test_disk_full_raises_cache_error_and_leaves_the_cache_consistent(disk_only):
    disk_only.put("m", 0, "none", make_entry(0))
    full = OSError(errno.ENOSPC, "No space left on device")
    with mock.patch("sli.cache_disk.os.fsync", side_effect=full):
        with pytest.raises(CacheError, match=r"No space left on device.*GiB free on"):
            disk_only.put("m", 1, "none", make_entry(1))
        with pytest.raises(CacheError, match=str(disk_only.cache_dir)):
            disk_only.put("m", 0, "none", make_entry(5))  # a failed replace keeps the old entry
    assert not list(Path(disk_only.cache_dir).rglob("*.tmp"))  # no temporary files left
    assert disk_only.stats().entries == 1 and disk_only.verify() == []
    assert same(disk_only.get("m", 0, "none"), make_entry(0)) and disk_only.get("m", 1, "none") is None
    disk_only.put("m", 1, "none", make_entry(1))  # space back: writes work again
    assert same(disk_only.get("m", 1, "none"), make_entry(1))


def test_unwritable_directory_raises_cache_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CacheError, match=r"cannot open the layer cache at .*file.*free"):
        LayerCache(blocker / "cache")


def test_values_are_raw_files_never_pickles(disk_only):
    with mock.patch("pickle.dumps", side_effect=AssertionError("pickled")), \
            mock.patch("pickle.loads", side_effect=AssertionError("unpickled")), \
            mock.patch("pickle.load", side_effect=AssertionError("unpickled")), \
            mock.patch("torch.load", side_effect=AssertionError("torch.load")):
        disk_only.put("m", 0, "none", make_entry(0))
        assert same(disk_only.get("m", 0, "none"), make_entry(0))
    rows = sqlite3.connect(disk_only.cache_dir / "cache.db").execute("SELECT mode, value, tag FROM Cache").fetchall()
    assert rows == [(diskcache.core.MODE_BINARY, None, rows[0][2])]  # a file, no BLOB, a str checksum
    data = entry_path(disk_only, "m", 0, "none").read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    assert json.loads(data[8:8 + header_len])["__metadata__"]["model_id"] == "m"  # safetensors


# -- several processes -----------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_layer_cache import make_entry, same
    from sli.layer_cache import LayerCache
    from sli.settings import GB
    cache_dir, role, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cache = LayerCache(cache_dir, max_cache_size_gb={limit} / GB, max_memory_cache_size_gb=0)
    if role == "writer":  # writes until killed
        i = 0
        while True:
            cache.put("m", i % 400, "none", make_entry(i % 400, 256 * 1024))
            if i == 2:
                print("ready", flush=True)
            i += 1
    bad = 0
    for i in range(45):  # hammer: overlapping keys, same bytes for a key in every process
        layer = (seed * 7 + i * 3) % 24
        if i % 3:
            cache.put("m", layer, "none", make_entry(layer, 96 * 1024))
        got = cache.get("m", (layer + seed) % 24, "none")
        bad += got is not None and not same(got, make_entry((layer + seed) % 24, 96 * 1024))
    print("bad", bad, "corrupt", cache.stats().corrupt, flush=True)
    sys.exit(1 if bad or cache.stats().corrupt else 0)
""")


def worker(cache_dir, role, seed, limit):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    source = WORKER.format(tests=str(REPO / "tests"), limit=limit)
    return subprocess.Popen([sys.executable, "-c", source, str(cache_dir), role, str(seed)],
                            stdout=subprocess.PIPE, text=True, env=env)


def test_writer_killed_mid_write_leaves_nothing_corrupt(tmp_path):
    limit = 8 * 1024 * KB
    proc = worker(tmp_path, "writer", 0, limit)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.4)  # in the middle of some write of a 256 KiB entry
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with LayerCache(tmp_path, max_cache_size_gb=limit / GB, max_memory_cache_size_gb=0) as cache:
        entries = cache.entries()
        assert len(entries) >= 3
        assert cache.verify() == []
        for e in entries:  # everything served is exactly what was written
            layer = int(e["layer"])
            assert same(cache.get("m", layer, "none"), make_entry(layer, 256 * KB))
        assert cache.stats().corrupt == 0
        cache.put("m", 999, "none", make_entry(9))  # the directory still takes writes


def test_old_temporary_files_are_swept_on_open(tmp_path):
    LayerCache(tmp_path, max_cache_size_gb=0.01).close()
    (tmp_path / "ab" / "cd").mkdir(parents=True)
    old, young = tmp_path / "ab" / "cd" / "x.val.1.2.tmp", tmp_path / "ab" / "cd" / "y.val.1.2.tmp"
    old.write_bytes(b"left by a killed writer")
    young.write_bytes(b"another process writing now")
    os.utime(old, (time.time() - 2 * 3600,) * 2)
    LayerCache(tmp_path, max_cache_size_gb=0.01).close()
    assert not old.exists() and young.exists()


def test_four_processes_share_one_directory(tmp_path):
    limit = 1536 * KB  # ~15 of the 24 keys fit: evictions race with reads and writes
    procs = [worker(tmp_path, "hammer", seed, limit) for seed in range(4)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
    with LayerCache(tmp_path, max_cache_size_gb=limit / GB, max_memory_cache_size_gb=0) as cache:
        stats = cache.stats()
        assert 0 < stats.entries < 24 and stats.disk_bytes <= limit
        assert cache.verify() == []
        for e in cache.entries():
            layer = int(e["layer"])
            assert same(cache.get("m", layer, "none"), make_entry(layer, 96 * KB))
        assert len(list(Path(tmp_path).rglob("*.val"))) == stats.entries  # evicted files deleted
