"""Chunk cache with a hard byte budget.

Entries are *decoded* float32 weight blocks (decode happens once per cache fill, never per call), so
the budget bounds the weight bytes the process actually holds. Least recently used entries go first;
an entry larger than the whole budget is handed out but never kept. Pinned entries (the hottest
chunks of the calibration profile, loaded at open) count against the same budget but are never
evicted.

Safe to share between threads (one Session run from several): every method holds `lock`, so
`bytes` always equals the bytes of the entries held and never exceeds the budget. Entries are never
modified once stored, so an array handed out stays valid after its eviction. Hits and misses are
counted here in total and for the current call (callstats).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from . import callstats


class ChunkCache:
    def __init__(self, budget_bytes: int | None = None):
        self.budget = budget_bytes  # None = unbounded
        self.lock = threading.RLock()  # re-entrant: subclasses call back into locked methods
        self._items: OrderedDict = OrderedDict()
        self._pinned: dict = {}
        self.bytes = 0
        self.pinned_bytes = 0
        self.peak_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key):
        with self.lock:
            a = self._pinned.get(key)
            if a is None:
                a = self._items.get(key)
                if a is None:
                    self.misses += 1
                    callstats.count_lookup(False)
                    return None
                self._items.move_to_end(key)
            self.hits += 1
            callstats.count_lookup(True)
            return a

    def peek(self, key):
        """The entry for `key` or None, without counting a lookup or refreshing its recency."""
        with self.lock:
            a = self._pinned.get(key)
            return self._items.get(key) if a is None else a

    def _victim(self):
        """The key to evict next (called with the lock held): the least recently used (subclasses
        weigh other evidence)."""
        return next(iter(self._items))

    def _evict_for(self, n: int) -> None:
        while self.budget is not None and self._items and self.bytes + n > self.budget:
            self.bytes -= self._items.pop(self._victim()).nbytes
            self.evictions += 1

    def put(self, key, array) -> None:
        n = array.nbytes
        with self.lock:
            if key in self._pinned or (self.budget is not None and n > self.budget - self.pinned_bytes):
                return
            old = self._items.pop(key, None)  # two calls may have read the same chunk at once
            if old is not None:
                self.bytes -= old.nbytes
            self._evict_for(n)
            self._items[key] = array
            self.bytes += n
            self.peak_bytes = max(self.peak_bytes, self.bytes)

    def pin(self, key, array) -> bool:
        """Keep `array` for good if it fits beside what is already pinned; False when it does not."""
        n = array.nbytes
        with self.lock:
            if self.budget is not None and self.pinned_bytes + n > self.budget:
                return False
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            self._evict_for(n)
            self._pinned[key] = array
            self.pinned_bytes += n
            self.bytes += n
            self.peak_bytes = max(self.peak_bytes, self.bytes)
            return True

    def held_bytes(self) -> int:
        """Sum of the entries held, counted afresh (equals `bytes`; for checks)."""
        with self.lock:
            return sum(a.nbytes for a in self._items.values()) + sum(a.nbytes for a in self._pinned.values())

    def __contains__(self, key) -> bool:
        with self.lock:
            return key in self._items or key in self._pinned

    def __len__(self) -> int:
        with self.lock:
            return len(self._items) + len(self._pinned)

    def clear(self) -> None:
        """Drop everything, pinned entries included."""
        with self.lock:
            self._items.clear()
            self._pinned.clear()
            self.bytes = 0
            self.pinned_bytes = 0
