"""The page cache under a streamed model: the room a cgroup or the machine leaves it, streamed
layers past that room dropped from it after use, resident layers in the process's own memory."""
import mmap
import os
import time

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from sli import UniversalSLIProcessor, page_cache
from sli.layer_store import LayerStore
from sli.quantization import CachedLayer
from sli.streaming import ReadBuffers


def cached_pages(path) -> int:
    """How many of the file's pages are in the page cache (:func:`sli.page_cache.cached_fraction`)."""
    share = page_cache.cached_fraction(path)
    assert share is not None, f"mincore could not tell {path}'s pages"
    return round(share * -(-os.path.getsize(path) // mmap.PAGESIZE))


def fake_proc(tmp_path, cgroup_lines, mount_lines):
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text("\n".join(cgroup_lines) + "\n")
    (proc / "mountinfo").write_text("\n".join(mount_lines) + "\n")
    return str(proc)


def test_the_memory_limit_is_the_smallest_on_the_cgroup_s_path_cgroup_v1(tmp_path):
    root = tmp_path / "memory"
    own = root / "jobs" / "bench"
    own.mkdir(parents=True)
    (root / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # the root: no limit
    (root / "jobs" / "memory.limit_in_bytes").write_text(f"{3 << 30}\n")
    (own / "memory.limit_in_bytes").write_text(f"{2 << 30}\n")
    proc = fake_proc(tmp_path, ["5:devices:/", "4:memory:/jobs/bench", "0::/"],
                     [f"35 31 0:32 / {root} rw,relatime - cgroup cgroup rw,memory"])
    assert page_cache.memory_limit(proc) == 2 << 30
    (own / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert page_cache.memory_limit(proc) == 3 << 30  # the parent's, when its own is unlimited
    (root / "jobs" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert page_cache.memory_limit(proc) is None


def test_the_memory_limit_under_cgroup_v2_and_a_mount_rooted_at_the_own_group(tmp_path):
    mount = tmp_path / "unified"
    mount.mkdir()
    (mount / "memory.max").write_text("max\n")
    proc = fake_proc(tmp_path, ["0::/user.slice/app"], [f"41 31 0:38 /user.slice/app {mount} rw - cgroup2 cgroup2 rw"])
    assert page_cache.memory_limit(proc) is None
    (mount / "memory.max").write_text(f"{1 << 30}\n")
    assert page_cache.memory_limit(proc) == 1 << 30


def own_memory():
    info = psutil.Process().memory_info()
    return info.rss, info.rss - info.shared  # resident, of which anonymous


def cgroup_v1(tmp_path, limit, anonymous=None):
    """A fake /proc whose process sits in a cgroup v1 group of ``limit`` bytes, its memory.stat
    counting ``anonymous`` bytes of anonymous memory in the group (default: this process's)."""
    group = tmp_path / "memory" / "job"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text(f"{limit}\n")
    anonymous = own_memory()[1] if anonymous is None else anonymous
    (group / "memory.stat").write_text(f"cache 123\nrss {anonymous}\ntotal_cache 123\ntotal_rss {anonymous}\n")
    return fake_proc(tmp_path, ["4:memory:/job"], [f"35 31 0:32 / {tmp_path / 'memory'} rw - cgroup cgroup rw,memory"])


def test_the_room_is_what_the_limit_leaves_beside_the_process_and_its_plan(tmp_path):
    proc = cgroup_v1(tmp_path, 4 << 30)
    room = page_cache.room(1 << 30, margin=0.0, proc=proc)
    assert abs(room - ((4 << 30) - (1 << 30) - own_memory()[0])) < 64 << 20  # RSS moves a little between reads
    assert abs(page_cache.room(1 << 30, margin=0.02, proc=proc) - (room - int(0.02 * (4 << 30)))) < 64 << 20
    assert page_cache.room(8 << 30, proc=proc) == 0  # never negative


def test_the_memory_available_is_bounded_by_the_cgroup_s_limit(tmp_path):
    assert abs(page_cache.memory_available(fake_proc(tmp_path, ["0::/"], [])) - psutil.virtual_memory().available) \
        < 64 << 20  # no cgroup: the machine's
    # a container's limit, 1 GiB above what this process holds: psutil still reports the host's memory
    assert abs(page_cache.memory_available(cgroup_v1(tmp_path / "a", own_memory()[0] + (1 << 30))) - (1 << 30)) \
        < 64 << 20
    assert page_cache.memory_available(cgroup_v1(tmp_path / "b", 1 << 20)) == 0  # already over it


def test_other_processes_anonymous_memory_in_the_cgroup_is_not_available(tmp_path):
    limit = own_memory()[0] + (2 << 30)
    alone = page_cache.memory_available(cgroup_v1(tmp_path / "alone", limit))
    shared = page_cache.memory_available(cgroup_v1(tmp_path / "shared", limit, own_memory()[1] + (512 << 20)))
    assert abs(alone - (2 << 30)) < 64 << 20
    assert abs(alone - shared - (512 << 20)) < 64 << 20
    assert abs(page_cache.room(0, margin=0.0, proc=cgroup_v1(tmp_path / "room", limit, own_memory()[1] + (512 << 20)))
               - shared) < 64 << 20


def test_without_a_budget_the_plan_fits_the_cgroup_s_limit_not_the_host_s_memory(model_factory, tmp_path,
                                                                                  monkeypatch):
    model_dir = model_factory("llama", num_layers=5)
    with UniversalSLIProcessor(model_dir, "none", cache_dir=tmp_path / "cache", device="cpu") as probe:
        probe.prewarm(progress=False)
        assert probe.plan.budget is None and probe.plan.resident_layers == [0, 1, 2, 3, 4]  # the host holds all
        fixed, layer = probe.plan.fixed_bytes, probe.plan.layer_bytes
    # half of what the limit leaves this process is planned: room for two and a half layers
    leaves = 2 * (fixed + layer * 5 // 2)
    limited = tmp_path / "group"  # its memory.stat counts no one else
    limited.mkdir()
    (limited / "memory.stat").write_text(f"total_rss {own_memory()[1]}\n")
    monkeypatch.setattr(page_cache, "_limiting_group", lambda proc: (limited, own_memory()[0] + leaves))
    with UniversalSLIProcessor(model_dir, "none", cache_dir=tmp_path / "cache", device="cpu") as proc:
        assert proc.plan.resident_layers == [0, 1]
        assert f"budget none given, {leaves // 2 / 2**30:.2f} GB planned from the free memory" in proc.plan.describe()


def test_drop_pages_takes_a_file_out_of_the_page_cache(tmp_path):
    path = tmp_path / "data.bin"
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20))
        os.fsync(f.fileno())  # dirty pages stay until written back
    with open(path, "rb") as f:
        f.read()
    assert cached_pages(path) == 256
    page_cache.drop_pages(os.open(path, os.O_RDONLY))
    assert cached_pages(path) == 0


def read_buffer_bytes(proc) -> int:
    """What the two read buffers take for ``proc``'s layers (tests/test_direct_read.py)."""
    return 2 * ReadBuffers.rounded(proc.cache.entry_path(proc.model_id, 0, proc.quantizer).stat().st_size)


@pytest.mark.parametrize("direct", [False, True])  # True: read past the page cache (tests/test_direct_read.py)
def test_streamed_layers_past_the_page_cache_s_room_leave_it_once_used(model_factory, tmp_path, monkeypatch, direct):
    if not direct:
        monkeypatch.setenv("SLI_NO_DIRECT_READ", "1")
    model_dir = model_factory("llama", num_layers=5)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.arange(1, 9)
    with UniversalSLIProcessor(model_dir, "none", cache_dir=tmp_path / "cache", device="cpu") as probe:
        probe.prewarm(progress=False)
        layer_bytes = probe.plan.layer_bytes
        one_resident = probe.plan.fixed_bytes + layer_bytes + 1
        if direct:  # the read buffers, held beside the kept layer in flight (the other one in flight they stand for)
            one_resident += read_buffer_bytes(probe) - layer_bytes
    # the room holds one streamed layer: layer 1 resident, 3 kept in the page cache, 0, 2 and 4
    # dropped (the plan spreads the layers that need no read among those that do)
    monkeypatch.setattr(page_cache, "room", lambda planned, margin=0.02, proc="/proc/self": layer_bytes + 1)
    with UniversalSLIProcessor(model_dir, "none", cache_dir=tmp_path / "cache", device="cpu",
                               memory_budget_gb=one_resident / 2**30) as proc:
        plan = proc.plan
        assert (plan.resident_layers, plan.page_dropped_layers) == ([1], [0, 2, 4])
        assert "page cache keeps 1 of 4 streamed layers" in plan.describe()
        paths = [proc.cache.entry_path(proc.model_id, i, proc.quantizer) for i in range(5)]
        for path in paths:
            page_cache.drop_pages(os.open(path, os.O_RDONLY))
        # each read ahead slower than the layers (a busy disk): one still reading when its layer
        # is done must not bring the layer's dropped pages back
        if direct:
            read_into = proc.streamer.read_into
            proc.streamer.read_into = lambda index, take: time.sleep(0.2) or read_into(index, take)
        else:
            read_ahead = proc.streamer.page_in
            proc.streamer.page_in = lambda index: time.sleep(0.2) or read_ahead(index)
        with torch.no_grad():
            logits = proc.forward(ids)
        torch.testing.assert_close(logits, reference(ids[None]).logits, atol=1e-5, rtol=1e-5)
        proc.streamer.cancel()  # a layer prefetched for the next pass holds its map
        pages = [cached_pages(path) for path in paths]
        # layer 1 read into the process's memory, its file's pages then dropped (the page cache is
        # short); layer 3 kept there; 2 and 4 dropped once used; 0 too, then read ahead and
        # prefetched for the next pass while the pass's last layers ran (LayerRunner._read_ahead),
        # and given back by the cancel: read past the page cache, or mapped and its pages dropped
        # with the map
        whole = -(-paths[3].stat().st_size // mmap.PAGESIZE)
        assert pages[0] == pages[1] == pages[2] == pages[4] == 0 and pages[3] == whole, pages
        # the resident layer is this process's memory, not a map of its file the kernel may drop
        held = [b for b in proc.layers[1].mlp.down_proj.buffers() if b.numel() > 1]
        assert held and not any(page_cache.in_file_mapping(b.data_ptr()) for b in held)
        assert page_cache.in_file_mapping(proc.model.get_input_embeddings().weight.data_ptr())  # the checkpoint's map


def test_the_plan_counts_a_mapped_embedding_by_the_rows_its_context_can_look_up(model_factory, tmp_path):
    model_dir = model_factory("llama", tie_word_embeddings=False)
    with UniversalSLIProcessor(model_dir, "none", cache_dir=tmp_path / "cache", device="cpu",
                               memory_budget_gb=0.0, max_context_tokens=16) as proc:
        config = proc.config
        table = config.vocab_size * config.hidden_size * 2  # bfloat16, a view of the checkpoint's map
        assert proc.mapped_embedding_bytes == table
        assert proc.plan.shared_bytes == proc.shared_bytes - table + 16 * config.hidden_size * 2
    with UniversalSLIProcessor(model_dir, "none", cache_dir=tmp_path / "cache", device="cpu",
                               memory_budget_gb=0.0, max_context_tokens=100_000) as proc:
        assert proc.plan.shared_bytes == proc.shared_bytes  # never more than the table


KEPT = (3, 5)  # the layers the page cache keeps in the test below


def test_the_disk_layers_are_read_ahead_through_the_layers_that_need_no_read(model_factory, tmp_path, monkeypatch):
    # Layer 1 resident, 3 and 5 kept in the page cache, 0, 2 and 4 read from the disk every pass
    # (the plan spreads the layers that need no read among those that do). A prefetch holds one of
    # two slots, so it reaches a layer only once the one before runs; the disk layers are read
    # ahead from each layer on, two (the prefetch's slots) at a time, through the layers that need
    # no read: while kept layer 3 runs, 4 and the next pass's 0 are read. In the first pass the
    # kept layers, not read yet, are read ahead in their turn too (into the page cache).
    model_dir = model_factory("llama", num_layers=6)
    with UniversalSLIProcessor(model_dir, "none", cache_dir=tmp_path / "cache", device="cpu") as probe:
        probe.prewarm(progress=False)
        layer_bytes = probe.plan.layer_bytes
        # with the read buffers, held beside the two kept layers in flight
        one_resident = (probe.plan.fixed_bytes + read_buffer_bytes(probe) + layer_bytes + 1) / 2**30
        expected = probe.generate(torch.arange(1, 9), max_new_tokens=3, eos_token_id=[])
    monkeypatch.setattr(page_cache, "room", lambda planned, margin=0.02, proc="/proc/self": 2 * layer_bytes + 1)
    with UniversalSLIProcessor(model_dir, "none", cache_dir=tmp_path / "cache", device="cpu", prefetch_depth=1,
                               memory_budget_gb=one_resident) as proc:
        assert (proc.plan.resident_layers, proc.plan.page_dropped_layers) == ([1], [0, 2, 4])
        events, streamer = [], proc.streamer
        real_get, real_read_ahead = streamer.get, streamer.read_ahead
        streamer.get = lambda index: events.append(("get", index)) or real_get(index)
        # a read ahead started (not one asked for again before its layer's release)
        streamer.read_ahead = lambda index, **kw: (index in streamer._read_ahead
                                                   or events.append(("read_ahead", index, kw))
                                                   or real_read_ahead(index, **kw))
        real_release = streamer.release
        streamer.release = lambda loaded: events.append(("release", loaded.timing.layer)) or real_release(loaded)
        got = proc.generate(torch.arange(1, 9), max_new_tokens=3, eos_token_id=[])
        read = streamer.page_in(4)
    assert got.tolist() == expected.tolist()
    assert read == proc.cache.entry_path(proc.model_id, 4, proc.quantizer).stat().st_size
    # when each layer is fetched, the disk layers read ahead and not yet released are the next two
    # from it on, wrapping into the next pass; in the first pass the kept layers 3 and 5 among them
    first = {0: {0, 2}, 2: {2, 3}, 3: {3, 4}, 4: {4, 5}, 5: {5, 0}}
    later = {0: {0, 2}, 2: {2, 4}, 3: {4, 0}, 4: {4, 0}, 5: {0, 2}}
    ahead, passes = set(), 0
    for name, index, *how in events:
        if name == "read_ahead":
            ahead.add(index)
            assert how[0].get("into_page_cache", False) == (index in KEPT and passes <= 1), (index, events)
        elif name == "release":
            ahead.discard(index)
        else:
            passes += index == 0
            assert ahead == (first if passes == 1 else later)[index], (passes, index, events)
    assert [e for e in events if e[0] == "get"] == [("get", i) for i in (0, 2, 3, 4, 5)] * 3


def test_the_store_reads_an_entry_into_the_page_cache_and_nothing_else(tmp_path):
    with LayerStore(tmp_path / "cache", max_memory_cache_size_gb=0) as store:
        store.put("m", 0, "none", CachedLayer({"w": torch.ones(300_000)}))
        store.put("m", 1, "none", CachedLayer({"w": torch.ones(10)}))
    with LayerStore(tmp_path / "cache", max_memory_cache_size_gb=0) as store:  # a new process's store
        path, other = store.entry_path("m", 0, "none"), store.entry_path("m", 1, "none")
        for entry in (path, other):
            page_cache.drop_pages(os.open(entry, os.O_RDONLY))
        # never read by this store: found in the index, read whole, and nothing else
        assert store.page_in("m", 0, "none") == path.stat().st_size
        assert cached_pages(path) == -(-path.stat().st_size // mmap.PAGESIZE)
        assert cached_pages(other) == 0
        assert store.get("m", 0, "none", mapped=True).tensors["w"].sum() == 300_000
        page_cache.drop_pages(os.open(path, os.O_RDONLY))
        assert store.page_in("m", 0, "none") == path.stat().st_size  # read before: its file remembered
        assert cached_pages(path) == -(-path.stat().st_size // mmap.PAGESIZE)
        assert store.page_in("m", 2, "none") == 0  # no such entry: nothing to read, no error
        store.delete("m", 0)
        assert store.page_in("m", 0, "none") == 0  # gone since: nothing to read, no error
        assert store.page_in("m", 1, "none") == other.stat().st_size
