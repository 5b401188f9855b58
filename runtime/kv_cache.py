"""Per-layer key/value cache for decoding, as explicit state outside the model.

A layer's cache is two preallocated [kv_heads, capacity, head_dim] buffers (float32; float16 to halve
the bytes; int8 with one float32 scale per key and head to quarter them) that grow by doubling up to
the model's position limit, so a short chat does not reserve a 32k context and a long one does not
reallocate per token. A sliding-window layer only ever needs the last `window` keys, so its buffer
stops at `window` slots and is reused as a ring — exact, because attention masks by each key's stored
position, not by its slot. An evicting attention policy (runtime/sparse_attention.py) drops slots
with `evict`; the survivors are moved into the holes, so a bounded policy keeps a bounded buffer.
"""
from __future__ import annotations

import threading

import numpy as np

from .errors import InputError

__all__ = ["KVCache", "KVView", "LayerKVCache", "SequenceState"]

_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.int8))
_FIRST_CAPACITY = 16


def _quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 rows with one scale per [head, position] (absmax / 127): [kvh, n, D] -> (q, scale [kvh, n])."""
    scale = np.abs(x).max(axis=-1) / np.float32(127)
    safe = np.where(scale > 0, scale, np.float32(1))
    return np.rint(x / safe[..., None]).astype(np.int8), scale.astype(np.float32)


class KVView:
    """The keys and values one attention step may read, in storage form, with the absolute position
    of each (any order). `take` decodes only the columns asked for, so a policy that reads few keys
    converts few."""

    def __init__(self, k, v, positions, k_scale=None, v_scale=None):
        self.k, self.v, self.positions = k, v, positions
        self.k_scale, self.v_scale = k_scale, v_scale

    def __len__(self) -> int:
        return self.positions.size

    def take(self, cols: np.ndarray | None = None, keys: bool = True, values: bool = True) -> tuple:
        """float32 keys and values [kv_heads, len(cols), D] of columns `cols` (None: all); the one not
        asked for is None."""
        out = []
        for x, s, want in ((self.k, self.k_scale, keys), (self.v, self.v_scale, values)):
            if not want:
                out.append(None)
                continue
            x = x if cols is None else x[:, cols]
            if s is not None:
                x = x.astype(np.float32) * (s if cols is None else s[:, cols])[..., None]
            out.append(x.astype(np.float32, copy=False))
        return out[0], out[1]


class LayerKVCache:
    def __init__(self, kv_heads: int, head_dim: int, max_positions: int, window: int | None = None,
                 dtype=np.float32, page: int | None = None, track_attention: bool = False):
        dt = np.dtype(dtype)
        if dt not in _DTYPES:
            raise InputError(f"KV cache dtype must be float32, float16 or int8, got {dt}")
        for name, val in (("kv_heads", kv_heads), ("head_dim", head_dim), ("max_positions", max_positions)):
            if int(val) <= 0:
                raise InputError(f"KV cache {name} must be positive, got {val}")
        if window is not None and int(window) <= 0:
            raise InputError(f"sliding window must be positive, got {window}")
        self.kv_heads, self.head_dim, self.max_positions = int(kv_heads), int(head_dim), int(max_positions)
        self.window = None if window is None else int(window)
        self.dtype = dt
        self.quantized = dt == np.int8
        # A window at least as long as the context never evicts anything: keep it linear.
        self.ring = self.window is not None and self.window < self.max_positions
        self.limit = self.window if self.ring else self.max_positions
        # Page bounds (min/max key per page of `page` positions) for query-aware page selection; kept
        # for linear caches, where a page's keys never leave. A half-precision cache keeps them in
        # float16 too, rounded outward (still bounds): every scored page reads them, so at float32 they
        # cost as much as 4 of a 16-key page's 16 float16 keys and values.
        self.page = None if page is None or self.ring else int(page)
        self.bound_dtype = np.dtype(np.float32) if dt == np.float32 else np.dtype(np.float16)
        self.track_attention = track_attention  # accumulated attention per slot, for heavy-hitter eviction
        self.bytes_read = 0  # KV bytes attention steps read from this cache (kept across sequences)
        self.reset()

    def reset(self) -> None:
        """Forget every position (keeps nothing allocated)."""
        self.length = 0  # positions appended so far = the next token's position
        self.filled = 0  # slots in use (linear caches; = length until something is evicted)
        self._k = np.empty((self.kv_heads, 0, self.head_dim), self.dtype)
        self._v = np.empty_like(self._k)
        self._ks = self._vs = None
        if self.quantized:
            self._ks = np.empty((self.kv_heads, 0), np.float32)
            self._vs = np.empty_like(self._ks)
        self._pos = np.empty(0, np.int64)  # absolute position held by each slot
        self.acc = np.empty(0, np.float32)  # attention each slot's key has received so far
        self.page_lo = self.page_hi = None
        if self.page:
            self.page_lo = np.empty((self.kv_heads, 0, self.head_dim), self.bound_dtype)
            self.page_hi = np.empty_like(self.page_lo)

    @property
    def capacity(self) -> int:
        return self._k.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values (with their scales and page bounds)."""
        extra = [a.nbytes for a in (self._ks, self._vs, self.page_lo, self.page_hi) if a is not None]
        return self._k.nbytes + self._v.nbytes + sum(extra)

    @property
    def key_bytes(self) -> int:
        """Bytes one position's key and value take per KV head."""
        return 2 * self.head_dim * self.dtype.itemsize + (8 if self.quantized else 0)

    def _resize(self, cap: int, keep: int) -> None:
        """Reallocate to `cap` slots, carrying the first `keep`."""
        k = np.empty((self.kv_heads, cap, self.head_dim), self.dtype)
        v = np.empty_like(k)
        k[:, :keep], v[:, :keep] = self._k[:, :keep], self._v[:, :keep]
        pos = np.full(cap, -1, np.int64)
        pos[:keep] = self._pos[:keep]
        acc = np.zeros(cap, np.float32)
        acc[:keep] = self.acc[:keep]
        if self.quantized:
            ks, vs = np.zeros((self.kv_heads, cap), np.float32), np.zeros((self.kv_heads, cap), np.float32)
            ks[:, :keep], vs[:, :keep] = self._ks[:, :keep], self._vs[:, :keep]
            self._ks, self._vs = ks, vs
        self._k, self._v, self._pos, self.acc = k, v, pos, acc

    def _reserve(self, slots: int) -> None:
        if slots <= self.capacity:
            return
        self._resize(min(self.limit, max(slots, 2 * self.capacity, _FIRST_CAPACITY)), self.capacity)

    def _store(self, slots, k, v) -> None:
        kq, vq, ks, vs = self._encode(k, v)
        self._k[:, slots], self._v[:, slots] = kq, vq
        if self.quantized:
            self._ks[:, slots], self._vs[:, slots] = ks, vs
        self.acc[slots] = 0

    def _write(self, k: np.ndarray, v: np.ndarray, start: int) -> None:
        # Only the last `limit` of the new positions can survive; a ring slot is position % window,
        # which before the first wrap is just the position (capacity grows to `window` before wrapping).
        n = k.shape[1]
        keep = min(n, self.limit)
        positions = np.arange(start + n - keep, start + n)
        slots = positions % self.limit if self.ring else positions - start + self.filled
        self._store(slots, k[:, n - keep:], v[:, n - keep:])
        self._pos[slots] = positions
        if self.page and n:
            self._bound_pages(k, np.arange(start, start + n))

    def _bound_pages(self, k: np.ndarray, positions: np.ndarray) -> None:
        from .sparse_attention import page_bounds, round_outward

        first, last = positions[0] // self.page, positions[-1] // self.page
        have = self.page_lo.shape[1]
        if last >= have:
            cap = max(last + 1, 2 * have, 4)
            lo = np.full((self.kv_heads, cap, self.head_dim), np.inf, self.bound_dtype)
            hi = np.full_like(lo, -np.inf)
            lo[:, :have], hi[:, :have] = self.page_lo, self.page_hi
            self.page_lo, self.page_hi = lo, hi
        lo, hi = page_bounds(k.astype(np.float32, copy=False), positions - first * self.page, self.page,
                             last - first + 1)
        lo, hi = round_outward(lo, self.bound_dtype, -np.inf), round_outward(hi, self.bound_dtype, np.inf)
        sl = slice(first, last + 1)
        np.minimum(self.page_lo[:, sl], lo, out=self.page_lo[:, sl])
        np.maximum(self.page_hi[:, sl], hi, out=self.page_hi[:, sl])

    @property
    def slot_positions(self) -> np.ndarray:
        """The position each slot in use holds (a linear cache: slots 0 .. filled-1)."""
        return self._pos[:self.filled]

    @property
    def n_pages(self) -> int:
        return 0 if not self.page or not self.length else (self.length - 1) // self.page + 1

    def _view(self, sl) -> KVView:
        s = (lambda a: None if a is None else a[:, sl])
        return KVView(self._k[:, sl], self._v[:, sl], self._pos[sl], s(self._ks), s(self._vs))

    def append(self, k: np.ndarray, v: np.ndarray) -> KVView:
        """Add keys/values [kv_heads, n, head_dim] for the next n positions. Returns the view of every
        key the new queries may attend to, with its absolute position (any order; the caller masks
        by position). For a linear cache the view's columns are its slots 0 .. filled-1."""
        for name, x in (("keys", k), ("values", v)):
            if x.ndim != 3 or x.shape[0] != self.kv_heads or x.shape[2] != self.head_dim:
                raise InputError(f"KV cache {name} shape {x.shape}, expected [{self.kv_heads}, n, {self.head_dim}]")
        n = k.shape[1]
        if v.shape[1] != n:
            raise InputError(f"KV cache got {n} keys but {v.shape[1]} values")
        start = self.length
        if start + n > self.max_positions:
            raise InputError(f"context is full: {start} + {n} tokens exceed the model's {self.max_positions} positions")
        if not self.ring:
            self._reserve(self.filled + n)
            self._write(k, v, start)
            self.length, self.filled = start + n, self.filled + n
            return self._view(slice(0, self.filled))

        self._reserve(min(start + n, self.limit))
        if n == 1:
            # The one new query needs (p - window, p]: exactly what the ring holds after the write.
            self._write(k, v, start)
            self.length = start + 1
            return self._view(slice(0, min(self.length, self.limit)))
        # Several new queries: the first one still needs old keys the write would overwrite, so hand
        # back old-but-needed keys followed by the new ones, then store.
        lo = max(0, start - (self.window - 1))
        old_pos = np.arange(lo, start)
        old = self._view(old_pos % self.limit)
        new = self._encode(k, v)
        cat = (lambda a, b: None if a is None else np.concatenate([a, b], axis=1))
        view = KVView(cat(old.k, new[0]), cat(old.v, new[1]), np.concatenate([old_pos, np.arange(start, start + n)]),
                      cat(old.k_scale, new[2]), cat(old.v_scale, new[3]))
        self._write(k, v, start)
        self.length = start + n
        return view

    def _encode(self, k, v):
        """New keys and values in storage form: (k, v, k_scale, v_scale)."""
        if self.quantized:
            (kq, ks), (vq, vs) = _quantize(k), _quantize(v)
            return kq, vq, ks, vs
        return k.astype(self.dtype, copy=False), v.astype(self.dtype, copy=False), None, None

    def evict(self, keep: np.ndarray) -> None:
        """Drop the slots of a linear cache where `keep` (one flag per slot in use) is False: the kept
        slots from the tail move into the holes (order is free: attention masks by position), and a
        buffer left more than twice as large as needed shrinks."""
        if self.ring:
            raise InputError("a sliding-window layer's ring does not evict")
        keep = np.asarray(keep, bool)
        if keep.shape != (self.filled,):
            raise InputError(f"evict needs one flag per cached slot ({self.filled}), got {keep.shape}")
        n = int(keep.sum())
        holes = np.flatnonzero(~keep[:n])
        movers = n + np.flatnonzero(keep[n:])
        if holes.size:
            self._k[:, holes], self._v[:, holes] = self._k[:, movers], self._v[:, movers]
            if self.quantized:
                self._ks[:, holes], self._vs[:, holes] = self._ks[:, movers], self._vs[:, movers]
            self._pos[holes], self.acc[holes] = self._pos[movers], self.acc[movers]
        self._pos[n:self.filled] = -1
        self.filled = n
        if self.capacity > 2 * max(n, _FIRST_CAPACITY):
            self._resize(max(2 * n, _FIRST_CAPACITY), n)


class KVCache:
    """The caches of all layers of one sequence. `windows[i]` is layer i's sliding window (None for
    a full-attention layer)."""

    def __init__(self, windows, kv_heads: int, head_dim: int, max_positions: int, dtype=np.float32):
        self.layers = [LayerKVCache(kv_heads, head_dim, max_positions, w, dtype) for w in windows]

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()


class SequenceState:
    """The per-sequence state of a plan's stateful ops (engine.Plan(state=...)): one LayerKVCache per
    attention node, keyed by node name and made on first use. Its owner resets it between sequences;
    an attention op handed position 0 starts its layer over as well, so each window of a perplexity
    run or each new prompt is a fresh sequence without extra calls. `attention` is the sparse
    attention policy (runtime/sparse_attention.py) the ops apply; it also sets the cache dtype."""

    def __init__(self, dtype=None, attention=None):
        from .sparse_attention import AttentionPolicy

        self.attention = attention if attention is not None else AttentionPolicy()
        self.dtype = np.dtype(dtype if dtype is not None else self.attention.kv_dtype)
        self.layers: dict[str, LayerKVCache] = {}
        # One sequence at a time: a generation holds `lock` for each step, and `restarts` (counted by
        # the attention ops at each position 0) tells it whether another sequence began meanwhile,
        # so such a step is refused instead of computing garbage.
        self.lock = threading.RLock()
        self.restarts = 0
        self.attention_s = 0.0  # seconds spent in the attention ops (kept across sequences)
        self.attention_cpu_s = 0.0  # their CPU time (this thread's)

    def layer(self, key: str, kv_heads: int, head_dim: int, max_positions: int, window: int | None) -> LayerKVCache:
        c = self.layers.get(key)
        if c is None:
            pol = self.attention
            governed = pol.governs(window)
            c = self.layers[key] = LayerKVCache(
                kv_heads, head_dim, max_positions, window, self.dtype,
                page=pol.page if governed and pol.kind == "pages" else None,
                track_attention=governed and pol.kind == "heavy")
        return c

    @property
    def length(self) -> int:
        """Positions held (the next token's position); 0 before the first call."""
        return max((c.length for c in self.layers.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers.values())

    def set_attention(self, policy) -> None:
        """Read the caches by another attention policy from now on; the caches start over (their
        layout depends on the policy)."""
        self.attention = policy
        self.dtype = policy.np_dtype
        self.layers.clear()

    @property
    def bytes_read(self) -> int:
        """KV bytes the attention steps have read, over every layer and sequence so far."""
        return sum(c.bytes_read for c in self.layers.values())

    def reset(self) -> None:
        for c in self.layers.values():
            c.reset()
