"""LayerCache: tiers, LRU order, size limits, config isolation, durability, corruption, concurrency."""
import errno
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

from sli import CacheError, CachedLayer, LayerCache, QuantizationConfig
from sli.layer_cache import serialize

NF4 = QuantizationConfig(mode="nf4")
INT8 = QuantizationConfig(mode="int8")
KB = 1024


def entry(seed: int, numel: int = 16 * KB) -> CachedLayer:
    """A CachedLayer of about ``numel`` float32 values (4 bytes each)."""
    g = torch.Generator().manual_seed(seed)
    return CachedLayer({"mlp.weight": torch.randn(numel, generator=g),
                        "mlp.codes": torch.randint(0, 255, (64,), dtype=torch.uint8, generator=g)},
                       {"mlp": {"codec": "none", "shape": [numel, 1], "dtype": "float32"}})


def assert_same(a: CachedLayer, b: CachedLayer) -> None:
    assert a.linears == b.linears and a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name]), name


@pytest.fixture
def cache(tmp_path):
    with LayerCache(tmp_path / "cache", max_cache_size_gb=1.0, max_memory_cache_size_gb=1.0) as c:
        yield c


def entry_file(cache: LayerCache, model_id, layer, config) -> Path:
    handle = cache._disk.get(cache.key(model_id, layer, config), read=True)
    with handle:
        return Path(handle.name)


# -- tiers ------------------------------------------------------------------------

def test_a_put_entry_comes_back_equal_from_memory_then_from_disk(cache, tmp_path):
    cache.put("m", 0, NF4, entry(0))
    assert_same(cache.get("m", 0, NF4), entry(0))
    assert cache.stats().memory_hits == 1
    with LayerCache(tmp_path / "cache", max_memory_cache_size_gb=1.0) as reopened:  # a restart: empty memory tier
        assert_same(reopened.get("m", 0, NF4), entry(0))
        stats = reopened.stats()
        assert (stats.memory_misses, stats.disk_hits) == (1, 1)
        reopened.get("m", 0, NF4)  # promoted: now a memory hit
        assert reopened.stats().memory_hits == 1


def test_a_miss_is_counted_in_both_tiers(cache):
    assert cache.get("m", 7, NF4) is None
    stats = cache.stats()
    assert (stats.memory_misses, stats.disk_misses) == (1, 1)
    assert not cache.contains("m", 7, NF4)


def test_layers_may_be_named(cache):
    for name in ("embed", "norm", "lm_head"):
        cache.put("m", name, NF4, entry(1))
        assert cache.contains("m", name, NF4)


# -- LRU --------------------------------------------------------------------------

def test_memory_tier_evicts_least_recently_used_within_its_byte_limit(tmp_path):
    one = entry(0).nbytes
    with LayerCache(tmp_path / "c", max_memory_cache_size_gb=2.5 * one / 2**30) as cache:
        cache.put("m", 0, NF4, entry(0))
        cache.put("m", 1, NF4, entry(1))
        cache.get("m", 0, NF4)            # 0 is now the most recent
        cache.put("m", 2, NF4, entry(2))  # evicts 1
        stats = cache.stats()
        assert stats.memory_bytes <= 2.5 * one and stats.memory_entries == 2 and stats.evictions == 1
        before = cache.stats().memory_hits
        cache.get("m", 0, NF4)
        cache.get("m", 2, NF4)
        assert cache.stats().memory_hits == before + 2
        cache.get("m", 1, NF4)
        assert cache.stats().disk_hits == 1


def test_disk_tier_holds_its_byte_limit_and_evicts_least_recently_used(tmp_path):
    size = len(serialize(entry(0), {}))
    limit_gb = 12 * size / 2**30
    with LayerCache(tmp_path / "c", max_cache_size_gb=limit_gb, max_memory_cache_size_gb=0) as cache:
        for i in range(40):
            cache.put("m", i, NF4, entry(i))
            if i >= 1:
                cache.get("m", 0, NF4)  # keep layer 0 hot
            assert cache.stats().disk_bytes <= limit_gb * 2**30
        assert cache.contains("m", 0, NF4)       # used all along: kept
        assert not cache.contains("m", 1, NF4)   # oldest unused: evicted
        assert cache.contains("m", 39, NF4)
        files = [p for p in (tmp_path / "c").rglob("*.val")]
        assert len(files) == cache.stats().entries  # evicted files are gone from disk


# -- keys -------------------------------------------------------------------------

def test_configs_are_isolated(cache):
    cache.put("m", 0, NF4, entry(1))
    cache.put("m", 0, INT8, entry(2))
    assert_same(cache.get("m", 0, NF4), entry(1))
    assert_same(cache.get("m", 0, INT8), entry(2))
    assert cache.get("m", 0, QuantizationConfig(mode="fp4")) is None
    assert cache.delete("m", 0) == 2 and cache.stats().entries == 0


def test_a_model_id_cannot_escape_the_cache_dir(cache, tmp_path):
    cache.put("../../etc", 0, NF4, entry(0))
    path = entry_file(cache, "../../etc", 0, NF4).resolve()
    assert path.is_relative_to((tmp_path / "cache").resolve())
    assert_same(cache.get("../../etc", 0, NF4), entry(0))


def test_reference_api_cache_layer_and_get_layer(cache):
    from torch import nn

    from sli import LayerQuantizer

    layer = LayerQuantizer(INT8).quantize_layer(nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64)))
    assert cache.cache_layer("llama", 0, layer, INT8) > 0
    got = cache.get_layer("llama", 0)
    assert got.linears["0"]["codec"] == "int8" and "1.weight" in got.tensors
    cache.cache_layer("llama", 0, entry(3), "nf4")
    with pytest.raises(ValueError, match="pass quantization_config"):
        cache.get_layer("llama", 0)
    assert cache.get_layer("llama", 9) is None


# -- durability and bad input -----------------------------------------------------------

def test_an_entry_larger_than_the_whole_limit_is_refused(tmp_path):
    with LayerCache(tmp_path / "c", max_cache_size_gb=1e-6) as cache:
        with pytest.raises(CacheError, match="more than the whole cache limit"):
            cache.put("m", 0, NF4, entry(0, numel=64 * KB))
        assert cache.stats().entries == 0


def test_a_full_disk_gives_a_cache_error_and_keeps_the_cache_consistent(cache):
    cache.put("m", 0, NF4, entry(0))
    with mock.patch("os.fsync", side_effect=OSError(errno.ENOSPC, "No space left on device")):
        with pytest.raises(CacheError, match="No space left on device.*GiB free"):
            cache.put("m", 1, NF4, entry(1))
    assert not cache.contains("m", 1, NF4)
    assert_same(cache.get("m", 0, NF4), entry(0))
    assert cache.verify() == []
    assert not list(Path(cache.cache_dir).rglob("*.tmp"))  # the temporary file is cleaned up


def test_an_unwritable_directory_gives_a_cache_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CacheError, match="cannot open the layer cache"):
        LayerCache(blocker / "cache")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_file_is_caught_removed_and_never_served(damage, tmp_path):
    with LayerCache(tmp_path / "c", max_memory_cache_size_gb=0) as cache:
        cache.put("m", 0, NF4, entry(0))
        path = entry_file(cache, "m", 0, NF4)
        data = bytearray(path.read_bytes())
        if damage == "truncate":
            data = data[: len(data) - 100]
        else:
            data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        assert cache.verify() == ["m:0:" + NF4.fingerprint()]
        assert cache.get("m", 0, NF4) is None
        assert cache.stats().corrupt >= 1
        assert not path.exists() and not cache.contains("m", 0, NF4)


def test_cache_content_is_never_pickled(cache):
    cache.put("m", 0, NF4, entry(0))
    path = entry_file(cache, "m", 0, NF4)
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and b'"__metadata__"' in raw[8:8 + header_len]  # a plain safetensors file
    import sqlite3

    rows = sqlite3.connect(cache.cache_dir / "cache.db").execute("SELECT mode, value FROM Cache").fetchall()
    assert all(mode != 4 for mode, _ in rows)  # diskcache's MODE_PICKLE is 4


WRITER = textwrap.dedent("""
    import sys, torch
    from sli import LayerCache, CachedLayer, QuantizationConfig
    cache = LayerCache(sys.argv[1], max_memory_cache_size_gb=0)
    i = 0
    while True:
        t = torch.full((256 * 1024,), float(i))
        cache.put("m", i % 50, QuantizationConfig(mode="nf4"), CachedLayer({"w": t}, {}))
        print(i, flush=True)
        i += 1
""")


def test_a_writer_killed_mid_write_leaves_nothing_corrupt(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "c")], stdout=subprocess.PIPE, text=True)
    for _ in range(20):  # let it get going, then kill it at a random point of a write
        proc.stdout.readline()
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with LayerCache(tmp_path / "c", max_memory_cache_size_gb=0) as cache:
        assert cache.verify() == []
        served = 0
        for layer in range(50):
            got = cache.get("m", layer, NF4)
            if got is not None:
                value = got.tensors["w"][0].item()
                assert value % 50 == layer and torch.all(got.tensors["w"] == value)
                served += 1
        assert served >= 10


def _hammer(args):
    cache_dir, worker, limit_gb = args
    with LayerCache(cache_dir, max_cache_size_gb=limit_gb, max_memory_cache_size_gb=0) as cache:
        for i in range(30):
            layer = (worker * 7 + i) % 12
            cache.put(f"model-{layer % 3}", layer, NF4, entry(layer))
            got = cache.get(f"model-{(layer + 1) % 3}", (layer + 1) % 12, NF4)
            if got is not None:
                assert_same(got, entry((layer + 1) % 12))
    return True


def test_four_processes_hammering_one_directory(tmp_path):
    size = len(serialize(entry(0), {}))
    limit_gb = 8 * size / 2**30
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        assert all(pool.map(_hammer, [(str(tmp_path / "c"), w, limit_gb) for w in range(4)]))
    with LayerCache(tmp_path / "c", max_cache_size_gb=limit_gb) as cache:
        assert cache.verify() == []
        assert cache.stats().disk_bytes <= limit_gb * 2**30
        for e in cache.entries():
            assert_same(cache.get(e["model_id"], int(e["layer"]), NF4), entry(int(e["layer"])))
