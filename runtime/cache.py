"""Chunk cache with a hard byte budget.

Entries are *decoded* float32 weight blocks (decode happens once per cache fill, never per call), so
the budget bounds the weight bytes the process actually holds. Least recently used entries go first;
an entry larger than the whole budget is handed out but never kept. Pinned entries (the hottest
chunks of the calibration profile, loaded at open) count against the same budget but are never
evicted.
"""

from __future__ import annotations

from collections import OrderedDict


class ChunkCache:
    def __init__(self, budget_bytes: int | None = None):
        self.budget = budget_bytes  # None = unbounded
        self._items: OrderedDict = OrderedDict()
        self._pinned: dict = {}
        self.bytes = 0
        self.pinned_bytes = 0
        self.peak_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key):
        a = self._pinned.get(key)
        if a is None:
            a = self._items.get(key)
            if a is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
        self.hits += 1
        return a

    def _victim(self):
        """The key to evict next: the least recently used (subclasses weigh other evidence)."""
        return next(iter(self._items))

    def put(self, key, array) -> None:
        n = array.nbytes
        if key in self._pinned or (self.budget is not None and n > self.budget - self.pinned_bytes):
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
        if self.budget is not None:
            while self._items and self.bytes + n > self.budget:
                self.bytes -= self._items.pop(self._victim()).nbytes
                self.evictions += 1
        self._items[key] = array
        self.bytes += n
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def pin(self, key, array) -> bool:
        """Keep `array` for good if it fits beside what is already pinned; False when it does not."""
        n = array.nbytes
        if self.budget is not None and self.pinned_bytes + n > self.budget:
            return False
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
        while self.budget is not None and self._items and self.bytes + n > self.budget:
            self.bytes -= self._items.pop(self._victim()).nbytes
            self.evictions += 1
        self._pinned[key] = array
        self.pinned_bytes += n
        self.bytes += n
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        return True

    def __contains__(self, key) -> bool:
        return key in self._items or key in self._pinned

    def __len__(self) -> int:
        return len(self._items) + len(self._pinned)

    def clear(self) -> None:
        """Drop everything, pinned entries included."""
        self._items.clear()
        self._pinned.clear()
        self.bytes = 0
        self.pinned_bytes = 0
