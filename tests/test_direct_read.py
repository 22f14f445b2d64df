"""Streamed layers the page cache has no room for are read past it (O_DIRECT) into buffers the
process reuses: the same values as the mapped path, no page cache left behind, no more buffers
than layers in flight, and a damaged entry never served."""
import os

import pytest
import torch

from sli import UniversalSLIProcessor, cache_disk, page_cache
from sli import layer_store as layer_store_module
from sli.layer_store import LayerStore
from sli.quantization import CachedLayer
from sli.streaming import BuffersTaken, ReadBuffers

from test_page_cache import cached_pages


@pytest.mark.parametrize("size", [1, 4096, 12345, (8 << 20) * 3 + 777])  # the last one read as 3 parts at once
@pytest.mark.parametrize("direct", [True, False])  # False: a file system that refuses O_DIRECT
def test_read_direct_reads_the_whole_file_and_leaves_no_page_cache(tmp_path, monkeypatch, size, direct):
    path = tmp_path / "entry.bin"
    data = os.urandom(size)
    path.write_bytes(data)
    os.sync()  # dirty pages are not dropped
    page_cache.drop_pages(os.open(path, os.O_RDONLY))
    if not direct:
        real = cache_disk._read_parts

        def refuse(path, direct, *args):
            if direct:
                raise OSError(22, "Invalid argument")
            return real(path, direct, *args)

        monkeypatch.setattr(cache_disk, "_read_parts", refuse)
    buffer = layer_store_module.owned_buffer(-(-size // 4096) * 4096)
    assert cache_disk.read_direct(str(path), buffer, size) == size
    assert buffer[:size] == data
    assert cached_pages(path) == 0


def test_read_buffers_are_reused_and_never_more_than_the_layers_in_flight():
    buffers = ReadBuffers(2)
    first, second = buffers.take(100), buffers.take(100)
    assert len(first) == 4096 and buffers.made == 2  # a page; whole huge pages from 2 MiB on
    assert ReadBuffers.rounded(ReadBuffers.ROUND + 1) == 2 * ReadBuffers.ROUND
    with pytest.raises(BuffersTaken):  # both held: that layer is read through the page cache
        buffers.take(100)
    buffers.give(first)
    assert buffers.take(100) is first and buffers.made == 2  # the same buffer, reused
    buffers.give(first)
    larger = buffers.take(3 * ReadBuffers.ROUND)  # the free one is too small: replaced
    assert len(larger) == 3 * ReadBuffers.ROUND and buffers.made == 2


def test_a_read_ahead_that_finds_every_buffer_held_leaves_its_layer_to_the_page_cache(model_factory, tmp_path,
                                                                                     monkeypatch):
    ids = torch.arange(1, 9)
    proc, layer_bytes, expected, paths = _warmed_disk_layers(model_factory, tmp_path, monkeypatch, ids)
    with proc:
        held = [proc.streamer.read_buffers.take(layer_bytes) for _ in range(2)]  # a pass that did not come
        fetched, fetch = [], proc.streamer.fetch_cached
        proc.streamer.fetch_cached = lambda index, owned: fetched.append(index) or fetch(index, owned)
        logits = proc.forward(ids)
        assert set(DISK) <= set(fetched)  # mapped, as before reads past the page cache
        for buffer in held:
            proc.streamer.read_buffers.give(buffer)
        assert torch.equal(proc.forward(ids), logits)  # (its first disk layer was read ahead before)
        fetched.clear()
        assert torch.equal(proc.forward(ids), logits)
        assert not set(DISK) & set(fetched)  # read into the buffers again
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)


def _warmed(model_dir, cache_dir, ids):
    """The model's cache warmed with every layer resident: (one layer's and the fixed bytes of its
    plan, its logits for ``ids``, each layer's cache file)."""
    with UniversalSLIProcessor(model_dir, "nf4", cache_dir=cache_dir, device="cpu") as probe:
        probe.prewarm(progress=False)
        paths = [probe.cache.entry_path(probe.model_id, i, probe.quantizer) for i in range(probe.layout.num_layers)]
        return probe.plan.layer_bytes, probe.plan.fixed_bytes, probe.forward(ids), paths


def _read_buffer_bytes(paths):
    """What the two read buffers (the layers in flight) take for these cache files."""
    return 2 * ReadBuffers.rounded(max(path.stat().st_size for path in paths))


# _disk_layers_processor's plan: one layer resident, two kept in the page cache, three read from
# the disk every pass, the layers that need no read spread among those that do
RESIDENT, KEPT, DISK = [1], [3, 5], [0, 2, 4]


def _disk_layers_processor(model_dir, cache_dir, layer_bytes, fixed_bytes, monkeypatch, read_buffers=0):
    # RESIDENT, KEPT and DISK above; the budget holds the read buffers too (read_buffers: their
    # bytes; 0 for the mapped path)
    monkeypatch.setattr(page_cache, "room", lambda planned, margin=0.02, proc="/proc/self": 2 * layer_bytes + 1)
    return UniversalSLIProcessor(model_dir, "nf4", cache_dir=cache_dir, device="cpu", prefetch_depth=1,
                                 memory_budget_gb=(fixed_bytes + read_buffers + layer_bytes + 1) / 2**30)


def _warmed_disk_layers(model_factory, tmp_path, monkeypatch, ids):
    """A 6-layer model's cache warmed and a processor over it planned as RESIDENT, KEPT and DISK,
    its read buffers in the budget: (processor, one layer's bytes, the logits for ``ids``, each
    layer's cache file)."""
    model_dir = model_factory("llama", num_layers=6)
    layer_bytes, fixed, expected, paths = _warmed(model_dir, tmp_path / "cache", ids)
    proc = _disk_layers_processor(model_dir, tmp_path / "cache", layer_bytes, fixed, monkeypatch,
                                  _read_buffer_bytes(paths))
    return proc, layer_bytes, expected, paths


def test_disk_layers_are_read_past_the_page_cache_into_reused_buffers(model_factory, tmp_path, monkeypatch):
    model_dir = model_factory("llama", num_layers=6)
    ids = torch.arange(1, 9)
    layer_bytes, fixed, _, entries = _warmed(model_dir, tmp_path / "cache", ids)
    monkeypatch.setenv("SLI_NO_DIRECT_READ", "1")
    with _disk_layers_processor(model_dir, tmp_path / "cache", layer_bytes, fixed, monkeypatch) as mapped:
        assert mapped.streamer.read_into is None
        expected_logits = mapped.forward(ids)
        expected = mapped.generate(ids, max_new_tokens=4, eos_token_id=[])
    monkeypatch.delenv("SLI_NO_DIRECT_READ")
    reads = []
    real = layer_store_module.read_direct
    monkeypatch.setattr(layer_store_module, "read_direct", lambda path, *a: reads.append(path) or real(path, *a))
    with _disk_layers_processor(model_dir, tmp_path / "cache", layer_bytes, fixed, monkeypatch,
                                _read_buffer_bytes(entries)) as proc:
        assert (proc.plan.resident_layers, proc.plan.page_dropped_layers) == (RESIDENT, DISK)
        paths = {i: str(proc.cache.entry_path(proc.model_id, i, proc.quantizer)) for i in range(6)}
        for path in paths.values():
            page_cache.drop_pages(os.open(path, os.O_RDONLY))
        fetched, fetch = [], proc.streamer.fetch_cached
        proc.streamer.fetch_cached = lambda index, owned: fetched.append(index) or fetch(index, owned)
        logits = proc.forward(ids)
        got = proc.generate(ids, max_new_tokens=4, eos_token_id=[])
        proc.streamer.cancel()  # what the last pass read ahead for the next one
        made = proc.streamer.read_buffers.made
    assert torch.equal(logits, expected_logits)  # the same bytes through the same kernels
    assert got.tolist() == expected.tolist()
    # the disk layers, and only they, were read past the page cache, once a pass (a forward, then
    # a prompt and three tokens), plus what the last pass read ahead for a next one
    assert {p for p in reads} == {paths[i] for i in DISK}
    assert set(fetched) - set(RESIDENT) == set(KEPT)  # (made resident) the disk layers came from their direct reads
    assert 3 * 5 <= len(reads) <= 3 * 5 + 2
    assert [cached_pages(paths[i]) for i in DISK] == [0, 0, 0]
    assert all(cached_pages(paths[i]) > 0 for i in KEPT)  # the page cache keeps the layers it has room for
    assert made <= 2  # the running layer and the one read ahead: the plan's layers in flight


def test_the_plan_counts_the_read_buffers_held_beside_the_kept_layers_in_flight(model_factory, tmp_path,
                                                                                  monkeypatch):
    # While a kept layer runs (mapped), both buffers already hold the disk layers read ahead:
    # three layers' bytes where the mapped path holds two (the kept layers are spread, so the
    # next layer is a disk layer, never a second kept one). At the budget that makes a layer
    # resident on the mapped path, the buffers take its place.
    model_dir = model_factory("llama", num_layers=6)
    layer_bytes, fixed, _, paths = _warmed(model_dir, tmp_path / "cache", torch.arange(1, 9))
    buffers = _read_buffer_bytes(paths)
    monkeypatch.setenv("SLI_NO_DIRECT_READ", "1")
    with _disk_layers_processor(model_dir, tmp_path / "cache", layer_bytes, fixed, monkeypatch) as mapped:
        mapped_plan = mapped.plan
    monkeypatch.delenv("SLI_NO_DIRECT_READ")
    with _disk_layers_processor(model_dir, tmp_path / "cache", layer_bytes, fixed, monkeypatch) as proc:
        plan = proc.plan
    assert (mapped_plan.resident_layers, mapped_plan.read_buffer_bytes) == (RESIDENT, 0)
    assert plan.read_buffer_bytes == buffers - layer_bytes  # one kept layer in flight beside both buffers
    assert plan.streaming_bytes == mapped_plan.streaming_bytes + buffers - layer_bytes
    assert plan.resident_layers == []  # the budget no longer holds a layer beside them
    assert plan.page_dropped_layers == [0, 2, 3, 5]  # two kept (the page cache's room is the same), spread
    assert "read buffers" in plan.describe()
    # no kept layer: the buffers hold the layers in flight the plan counts; only what a file holds
    # beyond its layer's tensors (its header, the last page) is added
    monkeypatch.setattr(page_cache, "room", lambda planned, margin=0.02, proc="/proc/self": 0)
    with UniversalSLIProcessor(model_dir, "nf4", cache_dir=tmp_path / "cache", device="cpu", prefetch_depth=1,
                               memory_budget_gb=(fixed + 2 * layer_bytes + 1) / 2**30) as proc:
        assert (proc.plan.resident_layers, proc.plan.page_dropped_layers) == ([3], [0, 1, 2, 4, 5])
        assert 0 < proc.plan.read_buffer_bytes == buffers - 2 * layer_bytes < layer_bytes


def test_a_kept_layer_whose_pages_were_reclaimed_is_read_from_the_disk_from_then_on(model_factory, tmp_path,
                                                                                   monkeypatch):
    # The room the plan measured can go (another reader under the same memory limit, the page
    # cache dropped): a kept layer's pages are then gone every pass. Such a layer is read past the
    # page cache from then on, so the other kept layers stay.
    ids = torch.arange(1, 9)
    proc, _, expected, paths = _warmed_disk_layers(model_factory, tmp_path, monkeypatch, ids)
    with proc:
        logits = proc.forward(ids)  # the kept layers' first read: into the page cache
        assert torch.equal(proc.forward(ids), logits)
        assert proc.plan.page_dropped_layers == DISK  # found there again: nothing changes
        page_cache.drop_pages(os.open(paths[3], os.O_RDONLY))  # the kernel reclaims layer 3's pages
        assert torch.equal(proc.forward(ids), logits)
        assert proc.plan.page_dropped_layers == sorted(DISK + [3]) and 3 in proc.runner.disk_layers
        assert torch.equal(proc.forward(ids), logits)
        proc.streamer.cancel()
    assert cached_pages(paths[3]) == 0 and cached_pages(paths[5]) > 0  # read past the page cache; 5 stays
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)


def test_cached_fraction_tells_how_much_of_a_file_the_page_cache_holds(tmp_path):
    path = tmp_path / "entry.bin"
    path.write_bytes(os.urandom(512 * 4096))
    os.sync()
    page_cache.drop_pages(os.open(path, os.O_RDONLY))
    assert page_cache.cached_fraction(path) == 0.0
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read ahead: only the pages read
    os.pread(fd, 16 * 4096, 0)
    os.close(fd)
    assert 16 / 512 <= page_cache.cached_fraction(path) < 0.5
    path.read_bytes()
    assert page_cache.cached_fraction(path) == 1.0
    assert page_cache.cached_fraction(tmp_path / "missing") is None


def test_a_disk_layer_altered_on_disk_is_never_served_from_its_buffer(model_factory, tmp_path, monkeypatch):
    model_dir = model_factory("llama", num_layers=6)
    ids = torch.arange(1, 9)
    layer_bytes, fixed, expected, paths = _warmed(model_dir, tmp_path / "cache", ids)
    path = paths[4]
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # a flipped byte in a tensor: only the checksum sees it
    path.write_bytes(bytes(data))
    with _disk_layers_processor(model_dir, tmp_path / "cache", layer_bytes, fixed, monkeypatch,
                                _read_buffer_bytes(paths)) as proc:
        logits = proc.forward(ids)
        assert proc.cache.stats().corrupt == 1
        # removed, quantized again from the checkpoint, cached again
        fresh = proc.cache.entry_path(proc.model_id, 4, proc.quantizer)
        assert fresh is not None and fresh.read_bytes() != bytes(data)
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)


def test_the_store_reads_an_entry_into_the_buffer_it_is_given(tmp_path):
    with LayerStore(tmp_path / "cache", max_memory_cache_size_gb=0) as store:
        store.put("m", 0, "none", CachedLayer({"w": torch.arange(300_000, dtype=torch.float32)}))
    with LayerStore(tmp_path / "cache") as store:
        given = []
        entry = store.get("m", 0, "none", read_into=lambda size: given.append(ReadBuffers(1).take(size)) or given[-1])
        assert len(given) == 1 and torch.equal(entry.tensors["w"], torch.arange(300_000, dtype=torch.float32))
        # the tensor views the given buffer, and the entry is not kept in the memory tier
        address = torch.frombuffer(given[0], dtype=torch.uint8).data_ptr()
        assert address <= entry.tensors["w"].data_ptr() < address + len(given[0])
        assert store.stats().memory_hits == 0 and store.get("m", 0, "none", memory=False) is not None
        assert store.stats().memory_hits == 0
