"""Chunk cache with a hard byte budget.

Entries are *decoded* float32 weight blocks (decode happens once per cache fill, never per call), so
the budget bounds the weight bytes the process actually holds. Least recently used entries go first;
an entry larger than the whole budget is handed out but never kept.
"""

from __future__ import annotations

from collections import OrderedDict


class ChunkCache:
    def __init__(self, budget_bytes: int | None = None):
        self.budget = budget_bytes  # None = unbounded
        self._items: OrderedDict = OrderedDict()
        self.bytes = 0
        self.peak_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key):
        a = self._items.get(key)
        if a is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return a

    def put(self, key, array) -> None:
        n = array.nbytes
        if self.budget is not None and n > self.budget:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
        if self.budget is not None:
            while self._items and self.bytes + n > self.budget:
                _, ev = self._items.popitem(last=False)
                self.bytes -= ev.nbytes
                self.evictions += 1
        self._items[key] = array
        self.bytes += n
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def __contains__(self, key) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0
