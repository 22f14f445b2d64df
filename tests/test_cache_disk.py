"""The diskcache adapter: durable writes, exact LRU order, the supported version range."""
import io
import os
import time
from unittest import mock

import pytest
import torch

from sli import cache_disk
from sli.errors import CacheError
from sli.layer_store import LayerStore
from sli.quantization import CachedLayer
from test_page_cache import cached_pages  # mincore over a map of the file


def entry(value: float) -> CachedLayer:
    return CachedLayer({"w": torch.full((1024,), value)})


def test_a_put_writes_a_temporary_file_fsyncs_it_then_renames_it(tmp_path):
    # The override of diskcache's Disk.store must still be the path every entry takes.
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    with mock.patch("sli.cache_disk.os.fsync", side_effect=lambda fd: calls.append("fsync") or real_fsync(fd)), \
            mock.patch("sli.cache_disk.os.replace",
                       side_effect=lambda a, b: calls.append(("rename", a.endswith(".tmp"), b.endswith(".val")))
                       or real_replace(a, b)):
        with LayerStore(tmp_path, max_cache_size_gb=0.01, max_memory_cache_size_gb=0) as store:
            store.put("m", 0, "none", entry(1.0))
            assert torch.equal(store.get("m", 0, "none").tensors["w"], entry(1.0).tensors["w"])
    assert calls == ["fsync", ("rename", True, True)]
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_write_survives_another_process_pruning_its_directory_mid_makedirs(tmp_path):
    # Another process's eviction may remove an empty sub-directory between makedirs's own
    # two mkdirs (seen in CI with four processes on one cache): the write tries again.
    real_makedirs, calls = os.makedirs, []

    def pruned_once(path, exist_ok=False):
        calls.append(path)
        if len(calls) == 1:
            raise FileNotFoundError(2, "No such file or directory", path)
        return real_makedirs(path, exist_ok=exist_ok)

    target = tmp_path / "39" / "01" / "entry.val"
    with mock.patch("sli.cache_disk.os.makedirs", side_effect=pruned_once):
        written = cache_disk.write_durably(str(target), io.BytesIO(b"payload"))
    assert written == 7 and target.read_bytes() == b"payload"
    assert calls.count(str(target.parent)) == 2  # refused once, then made


def test_least_recently_used_follows_access_not_insertion(tmp_path):
    with LayerStore(tmp_path, max_cache_size_gb=0.01, max_memory_cache_size_gb=0) as store:
        for layer in range(3):
            store.put("m", layer, "none", entry(layer))
            time.sleep(0.01)
        store.get("m", 0, "none")  # 0 becomes the most recently used
        oldest = cache_disk.least_recently_used(tmp_path, exclude="")
        assert oldest == store.key("m", 1, "none")
        assert cache_disk.least_recently_used(tmp_path, exclude=oldest) == store.key("m", 2, "none")


@pytest.mark.parametrize("version, ok", [("5.6.3", True), ("5.9.0", True), ("5.5.0", False), ("6.0.0", False)])
def test_diskcache_outside_the_supported_range_is_one_line_naming_it(version, ok):
    if ok:
        cache_disk.check_diskcache_version(version)
        return
    with pytest.raises(CacheError, match=r"diskcache>=5\.6,<6"):
        cache_disk.check_diskcache_version(version)



@pytest.mark.parametrize("size", [1, 4096, (8 << 20) - 1, (33 << 20) + 5])
def test_page_in_reads_every_byte_once_in_page_aligned_parts(tmp_path, size):
    ranges = []
    with mock.patch("sli.cache_disk.send_to_null", side_effect=lambda fd, a, b: ranges.append((a, b))):
        cache_disk.page_in(-1, size)
    ranges.sort()
    assert ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, no overlap
    assert all(start % 4096 == 0 for start, _ in ranges)
    assert len(ranges) == max(1, min(cache_disk.PAGE_IN_STREAMS, size // cache_disk.PAGE_IN_MIN_PART))


def test_page_in_leaves_the_whole_file_in_the_page_cache(tmp_path):
    path = tmp_path / "entry.val"
    path.write_bytes(os.urandom(33 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        pages = -(-(33 << 20) // 4096)
        assert cached_pages(path) < pages  # dropped (a page or two may stay)
        cache_disk.page_in(fd, 33 << 20)
    finally:
        os.close(fd)
    assert cached_pages(path) == pages
