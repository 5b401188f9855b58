"""Decoded weight blocks on demand: the cache first, then one pass of merged positioned reads.

Every chunked op fetches through `WeightStore`, and every cache key is made by `WeightStore.key`, so
two ops (or two calls) asking for the same block at the same tier share one entry.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..cache import ChunkCache
from ..reader import Bundle, TensorEntry


# Under a memory budget no cache entry (and no streamed slice) exceeds `block_room`: 1/BLOCK_SHARE of
# the budget, but at least MIN_BLOCK (and at most the budget). Gemma 3 270M, 4 bits, 64 MB (2026-12-02):
# whole layers up to the budget mixed 5 MiB entries with the head's 160 KiB chunks, and glibc's heap
# kept up to 29 MiB free between them; slices as large as the budget held ~9 MiB of payloads twice (read
# buffer and copies). In-process peak (tools/lm_memory.py, 8 tokens): 175 MiB before, 153 at 1/16, 147
# at 1/64 and 1/256; the `generate` CLI 178 -> 154 MiB at 1/64, same tokens, same CPU per token. The
# floor: under small budgets slices of a few chunks made per-read and per-fetch overhead dominate
# (MiniLM under 16 MB at 1/64 = 250 KB: 269 reads a run, +40 % CPU; with the 1 MiB floor +6 %).
BLOCK_SHARE = 64
MIN_BLOCK = 1 << 20


class WeightStore:
    def __init__(self, bundle: Bundle, cache: ChunkCache, tau: float = 0.0):
        self.b = bundle
        self.cache = cache
        self.tau = tau  # run-time pruning changes the decoded values, so it is part of every key

    def key(self, name: str, tier, part) -> tuple:
        """The cache key of one block: `part` is a chunk index, "full" (a whole tensor, `tier` then the
        tuple of its chunks' tiers) or ("expert", e)."""
        return (name, tier, part, self.tau)

    def fetch(self, keys: Sequence, pids_of: Callable[[int], list], decode: Callable[[int, dict], np.ndarray],
              peek: bool = False, cache: bool = True) -> tuple[list[np.ndarray], list[int]]:
        """The blocks under `keys`, and the positions that were not cached. Those are read in one pass
        (payload ids `pids_of(j)`), decoded (`decode(j, payloads)`) and cached. `peek`: look up without
        counting a lookup (prefetching is not a use). `cache=False`: read them all and keep none (for a
        caller that holds blocks itself, such as a neuron window)."""
        look = (self.cache.peek if peek else self.cache.get) if cache else (lambda k: None)
        out = [look(k) for k in keys]
        missing = [j for j, a in enumerate(out) if a is None]
        if missing:
            data = self.b.read_payloads([p for j in missing for p in pids_of(j)])
            for j in missing:
                a = out[j] = decode(j, data)
                if cache:
                    self.cache.put(keys[j], a)
        return out, missing

    def _prune(self, e: TensorEntry, a: np.ndarray) -> np.ndarray:
        if self.tau <= 0:
            return a
        absmax = e.meta.get("absmax")
        cut = self.tau * float(absmax if absmax is not None else np.abs(a).max())
        return np.where(np.abs(a) < cut, np.float32(0), a)

    def _decode(self, e: TensorEntry, i: int, tier: str, data: dict) -> np.ndarray:
        return self._prune(e, self.b.decode_chunk(e, i, tier, data))

    def chunk_key(self, e: TensorEntry, tiers: list[str], i) -> tuple:
        return self.key(e.name, tiers[int(i)], int(i))

    def chunks(self, e: TensorEntry, ids, tiers: list[str], cache: bool = True) -> list[np.ndarray]:
        """Decoded blocks [rows_c, K] for chunk ids, each at tiers[id]; missing ones read in one pass
        (a chunk is one payload, or a nested chunk's bit-planes). `cache=False`: all read, none kept."""
        ids = [int(i) for i in ids]
        out, _ = self.fetch([self.chunk_key(e, tiers, i) for i in ids],
                            lambda j: e.chunk_pids(tiers[ids[j]], ids[j]),
                            lambda j, data: self._decode(e, ids[j], tiers[ids[j]], data), cache=cache)
        return out

    def pin(self, e: TensorEntry, i: int, tiers: list[str], room: int) -> int:
        """Pin chunk i (at tiers[i]) if its decoded bytes fit in `room`: the bytes pinned, else 0."""
        a = self.chunks(e, [i], tiers)[0]
        if a.nbytes > room or not self.cache.pin(self.chunk_key(e, tiers, i), a):
            return 0
        return a.nbytes

    def block_room(self) -> int | None:
        """The largest decoded block worth building under the budget (None: unbounded): 1/BLOCK_SHARE
        of the room beside what is pinned, at least MIN_BLOCK, at most that room. Larger tensors stream
        by chunk, in slices of at most this."""
        if self.cache.budget is None:
            return None
        room = max(self.cache.budget - self.cache.pinned_bytes, 1)
        return min(room, max(room // BLOCK_SHARE, MIN_BLOCK))

    def slices(self, e: TensorEntry, ids, extra: TensorEntry | None = None):
        """`ids` in consecutive slices whose decoded chunks (of `e`, and of `extra` beside it) take at
        most `block_room`: all at once when unbounded, so fetching stays one merged read in the common
        case. A slice is one merged read whose payloads are held (and copied out of the read buffer)
        until its chunks are decoded, so it is kept small beside the budget."""
        ids = np.asarray(ids)
        room = self.block_room()
        if room is None:
            yield ids
            return
        per_row = 4 * (e.row_len + (extra.row_len if extra is not None else 0))
        start, used = 0, 0
        for j, i in enumerate(ids):
            n = per_row * int(e.bounds[i + 1] - e.bounds[i])
            if j > start and used + n > room:
                yield ids[start:j]
                start, used = j, 0
            used += n
        if start < len(ids):
            yield ids[start:]

    def stream(self, e: TensorEntry, tiers: list[str], per_read: int = 256):
        """(chunk id, decoded block) of every chunk, read `per_read` chunks at a time and not cached: a
        one-off pass over a whole tensor that must not fill (or evict from) the cache."""
        for lo in range(0, e.n_chunks, per_read):
            ids = range(lo, min(lo + per_read, e.n_chunks))
            data = self.b.read_payloads([p for i in ids for p in e.chunk_pids(tiers[i], i)])
            for i in ids:
                yield i, self._decode(e, i, tiers[i], data)

    def fits(self, e: TensorEntry) -> bool:
        """Whether the whole decoded tensor is worth one cache entry: always when unbounded, under a budget
        only up to `block_room`."""
        room = self.block_room()
        return room is None or 4 * e.rows * e.row_len <= room

    def full(self, e: TensorEntry, tiers: list[str]) -> np.ndarray:
        """The whole weight as one cached block in its stored shape ([R, K] for linear: use `.T` in
        products; BLAS takes the transposed view at the same speed, so no transposed copy is made)."""
        key = self.key(e.name, tuple(tiers), "full")
        a = self.cache.get(key)
        if a is None:
            data = self.b.read_payloads([p for i in range(e.n_chunks) for p in e.chunk_pids(tiers[i], i)])
            # Decode chunk by chunk straight into the result, dropping each payload once decoded:
            # the peak is the result plus one chunk, not three copies of the layer.
            a = np.empty((e.rows, e.row_len), np.float32)
            for i in range(e.n_chunks):
                a[e.bounds[i] : e.bounds[i + 1]] = self._decode(e, i, tiers[i], data)
                for p in e.chunk_pids(tiers[i], i):
                    data.pop(p, None)
            a = a.reshape(e.shape)
            self.cache.put(key, a)
        return a
