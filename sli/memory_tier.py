"""The layer store's memory tier: entries kept in RAM, least recently used first out, bounded
by their bytes.

Not locked on its own: :class:`sli.layer_store.LayerStore` calls it under the lock that also
guards its counters, so a hit and its count change together.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterator, Optional

from .quantization.formats import CachedLayer


class MemoryTier:
    """Cache entries by key, at most ``limit`` bytes of them (0 keeps none).

    >>> import torch
    >>> tier = MemoryTier(limit=48)  # one 32-byte entry
    >>> tier.put("a", CachedLayer({"w": torch.ones(8)})), tier.put("b", CachedLayer({"w": torch.ones(8)}))
    (0, 1)
    >>> list(tier), tier.nbytes
    (['b'], 32)
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: "OrderedDict[str, CachedLayer]" = OrderedDict()
        self.nbytes = 0

    def get(self, key: str) -> Optional[CachedLayer]:
        """The entry (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: CachedLayer) -> int:
        """Keep ``entry`` under ``key`` (an entry larger than the limit is not kept, and the
        key's older entry is dropped all the same); returns how many entries were evicted."""
        nbytes = entry.nbytes
        self.pop(key)
        if nbytes > self.limit:
            return 0
        self._entries[key] = entry
        self.nbytes += nbytes
        evicted = 0
        while self.nbytes > self.limit:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes
            evicted += 1
        return evicted

    def pop(self, key: str) -> bool:
        """Drop ``key``'s entry; True when there was one."""
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        return old is not None

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        """The keys, least recently used first."""
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
