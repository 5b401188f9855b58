"""Chunk cache with a hard byte budget and a pluggable choice of what to evict.

Entries are *decoded* float32 weight blocks (decode happens once per cache fill, never per call), so
the budget bounds the weight bytes the process actually holds. An entry larger than the whole budget
is handed out but never kept. Pinned entries (the hottest chunks of the calibration profile, loaded at
open) count against the same budget but are never evicted. Which entry goes first when room is needed
is the victim strategy's choice: `LRU` (the default) or `FrequencyAware` (for blocks reused unevenly,
such as MoE experts; an op family asks for it through `ChunkedOp.cache_victim`).

Safe to share between threads (one Session run from several): every method holds `lock`, so
`bytes` always equals the bytes of the entries held and never exceeds the budget. Entries are never
modified once stored, so an array handed out stays valid after its eviction. Hits and misses are
counted here in total and for the current call (callstats).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from typing import Iterator

from . import callstats


class LRU:
    """Evict the least recently used entry."""

    def touch(self, key) -> None:
        """A lookup of `key` (hit or miss); recency itself is kept by the cache."""

    def choose(self, keys: Iterator):
        """The key to evict, given the held keys least recently used first."""
        return next(keys)


class FrequencyAware(LRU):
    """Among the `window` least recently used entries, the least frequently used goes first (ties: the
    older). Frequencies survive eviction and halve every `decay` lookups, so a once-hot block does not
    stay forever."""

    def __init__(self, window: int = 8, decay: int = 4096):
        self.window = window
        self.decay = decay
        self.freq: dict = {}
        self._ticks = 0

    def touch(self, key) -> None:
        self.freq[key] = self.freq.get(key, 0.0) + 1.0
        self._ticks += 1
        if self._ticks >= self.decay:
            self._ticks = 0
            self.freq = {k: v / 2 for k, v in self.freq.items() if v >= 0.5}

    def choose(self, keys: Iterator):
        oldest = list(itertools.islice(keys, self.window))
        return min(oldest, key=lambda k: self.freq.get(k, 0.0))  # min keeps the first (oldest) on ties


class ChunkCache:
    def __init__(self, budget_bytes: int | None = None, victim: LRU | None = None):
        self.budget = budget_bytes  # None = unbounded
        self.victim = victim if victim is not None else LRU()  # called with the lock held
        self.lock = threading.RLock()  # re-entrant: a caller holding it (to check invariants) may call methods
        self._items: OrderedDict = OrderedDict()  # least recently used first
        self._pinned: dict = {}
        self.bytes = 0
        self.pinned_bytes = 0
        self.peak_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key):
        with self.lock:
            self.victim.touch(key)
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

    def _make_room(self, key, n: int) -> None:
        """Drop the entry held under `key` (two calls may have read the same chunk at once), then evict
        until `n` more bytes fit, and count them in. Called with the lock held."""
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
        while self.budget is not None and self._items and self.bytes + n > self.budget:
            self.bytes -= self._items.pop(self.victim.choose(iter(self._items))).nbytes
            self.evictions += 1
        self.bytes += n
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def put(self, key, array) -> None:
        n = array.nbytes
        with self.lock:
            if key in self._pinned or (self.budget is not None and n > self.budget - self.pinned_bytes):
                return
            self._make_room(key, n)
            self._items[key] = array

    def pin(self, key, array) -> bool:
        """Keep `array` for good if it fits beside what is already pinned; False when it does not."""
        n = array.nbytes
        with self.lock:
            if key in self._pinned:
                return True
            if self.budget is not None and self.pinned_bytes + n > self.budget:
                return False
            self._make_room(key, n)
            self._pinned[key] = array
            self.pinned_bytes += n
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
