"""Decoded weight blocks on demand: the cache first, then one pass of merged positioned reads.

Every chunked op fetches through `WeightStore`, and every cache key is made by `WeightStore.key`, so
two ops (or two calls) asking for the same block at the same tier share one entry.

What the cache holds: decoded float32 blocks while the model's decoded weights fit the memory budget
(or there is none). When they do not, the store is *encoded*: the cache holds each chunk's stored
payloads (an 8-bit chunk is a quarter of its float32 block) and a block is decoded on every use. A
budget below the decoded model thrashes a decoded cache anyway (a layer-by-layer pass is LRU's worst
case: every block is evicted before its next use, so each call re-read and re-decoded everything);
encoded, 4× as many weights stay held, so such a call decodes as before but reads much less, and the
process holds the tier's bytes, not float32. Decoded blocks then live only while an op uses them:
`slices` keeps them to a few MiB at a time.
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
# An encoded store (below) decodes its blocks on every use, so its slices are larger: the per-slice cost
# counts on every call (Gemma's head under 64 MB: 1.2 tok/s in 1 MiB slices, 1.5 in 4 MiB).
ENCODED_BLOCK_SHARE = 16


class Payloads:
    """A chunk's stored payloads as the cache holds them in an encoded store ({payload id: bytes})."""

    __slots__ = ("data", "nbytes")

    def __init__(self, data: dict):
        self.data = data
        self.nbytes = sum(len(b) for b in data.values())


class WeightStore:
    def __init__(self, bundle: Bundle, cache: ChunkCache, tau: float = 0.0):
        self.b = bundle
        self.cache = cache
        self.tau = tau  # run-time pruning changes the decoded values, so it is part of every key
        decoded = bundle.index.get("stats", {}).get("dense_fp32_weight_bytes")
        if not isinstance(decoded, int) or isinstance(decoded, bool):
            decoded = sum(4 * e.rows * e.row_len for e in bundle.tensors.values())
        self.encoded = cache.budget is not None and decoded > cache.budget
        self._holdable_memo: dict = {}

    def key(self, name: str, tier, part) -> tuple:
        """The cache key of one block: `part` is a chunk index, "full" (a whole tensor, `tier` then the
        tuple of its chunks' tiers) or ("expert", e)."""
        return (name, tier, part, self.tau)

    def fetch(self, keys: Sequence, pids_of: Callable[[int], list], decode: Callable[[int, dict], np.ndarray],
              peek: bool = False, cache: bool = True, keep: bool = True) -> tuple[list[np.ndarray], list[int]]:
        """The blocks under `keys`, and the positions that were not cached. Those are read in one pass
        (payload ids `pids_of(j)`), decoded (`decode(j, payloads)`) and cached unless not `keep`. `peek`:
        look up without counting a lookup (prefetching is not a use). `cache=False`: no lookup either:
        read them all and keep none (for a caller that holds blocks itself, such as a neuron window)."""
        keep = keep and cache
        look = (self.cache.peek if peek else self.cache.get) if cache else (lambda k: None)
        out = [look(k) for k in keys]
        missing = [j for j, a in enumerate(out) if a is None]
        if missing:
            data = self.b.read_payloads([p for j in missing for p in pids_of(j)])
            for j in missing:
                if not keep:
                    out[j] = decode(j, data)
                elif self.encoded:
                    out[j] = Payloads({p: data[p] for p in pids_of(j)})
                    self.cache.put(keys[j], out[j])
                else:
                    a = out[j] = decode(j, data)
                    self.cache.put(keys[j], a)
        if self.encoded:
            out = [decode(j, a.data) if isinstance(a, Payloads) else a for j, a in enumerate(out)]
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
                            lambda j, data: self._decode(e, ids[j], tiers[ids[j]], data),
                            cache=cache, keep=self._holdable(e, tiers))
        return out

    def _holdable(self, e: TensorEntry, tiers: list[str]) -> bool:
        """Whether the cache may keep chunks of `e`: not when even its held form (payloads in an encoded
        store, else decoded blocks) exceeds the budget. Such a tensor (a language model's 262144-row
        head) is read whole on every use, so keeping its chunks would only evict everything else."""
        if self.cache.budget is None:
            return True
        key = (e.name, tuple(tiers))
        if key not in self._holdable_memo:
            if self.encoded:
                held = sum(int(self.b.table["stored"][p]) for i in range(e.n_chunks) for p in e.chunk_pids(tiers[i], i))
            else:
                held = 4 * e.rows * e.row_len
            self._holdable_memo[key] = held <= self.cache.budget
        return self._holdable_memo[key]

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
        share = ENCODED_BLOCK_SHARE if self.encoded else BLOCK_SHARE
        return min(room, max(room // share, MIN_BLOCK))

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
        """Whether the whole decoded tensor is worth one cache entry: always when unbounded, never in an
        encoded store (it holds payloads, not decoded tensors), else up to `block_room`."""
        if self.encoded:
            return False
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
