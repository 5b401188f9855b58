"""Per-layer key/value cache for decoding, as explicit state outside the model.

A layer's cache is two preallocated [kv_heads, capacity, head_dim] buffers (float32, or float16 to
halve the bytes) that grow by doubling up to the model's position limit, so a short chat does not
reserve a 32k context and a long one does not reallocate per token. A sliding-window layer only
ever needs the last `window` keys, so its buffer stops at `window` slots and is reused as a ring —
exact, because attention masks by each key's stored position, not by its slot.
"""
from __future__ import annotations

import threading

import numpy as np

from .errors import InputError

__all__ = ["KVCache", "LayerKVCache", "SequenceState"]

_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
_FIRST_CAPACITY = 16


class LayerKVCache:
    def __init__(self, kv_heads: int, head_dim: int, max_positions: int, window: int | None = None,
                 dtype=np.float32):
        dt = np.dtype(dtype)
        if dt not in _DTYPES:
            raise InputError(f"KV cache dtype must be float32 or float16, got {dt}")
        for name, val in (("kv_heads", kv_heads), ("head_dim", head_dim), ("max_positions", max_positions)):
            if int(val) <= 0:
                raise InputError(f"KV cache {name} must be positive, got {val}")
        if window is not None and int(window) <= 0:
            raise InputError(f"sliding window must be positive, got {window}")
        self.kv_heads, self.head_dim, self.max_positions = int(kv_heads), int(head_dim), int(max_positions)
        self.window = None if window is None else int(window)
        self.dtype = dt
        # A window at least as long as the context never evicts anything: keep it linear.
        self.ring = self.window is not None and self.window < self.max_positions
        self.limit = self.window if self.ring else self.max_positions
        self.reset()

    def reset(self) -> None:
        """Forget every position (keeps nothing allocated)."""
        self.length = 0  # positions appended so far = the next token's position
        self._k = np.empty((self.kv_heads, 0, self.head_dim), self.dtype)
        self._v = np.empty_like(self._k)
        self._pos = np.empty(0, np.int64)  # absolute position held by each slot

    @property
    def capacity(self) -> int:
        return self._k.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values."""
        return self._k.nbytes + self._v.nbytes

    def _reserve(self, slots: int) -> None:
        if slots <= self.capacity:
            return
        cap = min(self.limit, max(slots, 2 * self.capacity, _FIRST_CAPACITY))
        old = self.capacity
        k = np.empty((self.kv_heads, cap, self.head_dim), self.dtype)
        v = np.empty_like(k)
        k[:, :old] = self._k
        v[:, :old] = self._v
        pos = np.full(cap, -1, np.int64)
        pos[:old] = self._pos
        self._k, self._v, self._pos = k, v, pos

    def _write(self, k: np.ndarray, v: np.ndarray, start: int) -> None:
        # Only the last `limit` of the new positions can survive; a ring slot is position % window,
        # which before the first wrap is just the position (capacity grows to `window` before wrapping).
        n = k.shape[1]
        keep = min(n, self.limit)
        positions = np.arange(start + n - keep, start + n)
        slots = positions % self.limit if self.ring else positions
        self._k[:, slots] = k[:, n - keep:]
        self._v[:, slots] = v[:, n - keep:]
        self._pos[slots] = positions

    def append(self, k: np.ndarray, v: np.ndarray):
        """Add keys/values [kv_heads, n, head_dim] for the next n positions. Returns (keys, values,
        positions): every key the new queries may attend to, with its absolute position (any order;
        the caller masks by position)."""
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
            self._reserve(start + n)
            self._write(k, v, start)
            self.length = start + n
            return self._k[:, :self.length], self._v[:, :self.length], self._pos[:self.length]

        self._reserve(min(start + n, self.limit))
        if n == 1:
            # The one new query needs (p - window, p]: exactly what the ring holds after the write.
            self._write(k, v, start)
            self.length = start + 1
            filled = min(self.length, self.limit)
            return self._k[:, :filled], self._v[:, :filled], self._pos[:filled]
        # Several new queries: the first one still needs old keys the write would overwrite, so hand
        # back old-but-needed keys followed by the new ones, then store.
        lo = max(0, start - (self.window - 1))
        old_pos = np.arange(lo, start)
        old_slots = old_pos % self.limit
        keys = np.concatenate([self._k[:, old_slots], k.astype(self.dtype, copy=False)], axis=1)
        values = np.concatenate([self._v[:, old_slots], v.astype(self.dtype, copy=False)], axis=1)
        positions = np.concatenate([old_pos, np.arange(start, start + n)])
        self._write(k, v, start)
        self.length = start + n
        return keys, values, positions


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
    run or each new prompt is a fresh sequence without extra calls."""

    def __init__(self, dtype=np.float32):
        self.dtype = np.dtype(dtype)
        self.layers: dict[str, LayerKVCache] = {}
        # One sequence at a time: a generation holds `lock` for each step, and `restarts` (counted by
        # the attention ops at each position 0) tells it whether another sequence began meanwhile,
        # so such a step is refused instead of computing garbage.
        self.lock = threading.RLock()
        self.restarts = 0

    def layer(self, key: str, kv_heads: int, head_dim: int, max_positions: int, window: int | None) -> LayerKVCache:
        c = self.layers.get(key)
        if c is None:
            c = self.layers[key] = LayerKVCache(kv_heads, head_dim, max_positions, window, self.dtype)
        return c

    @property
    def length(self) -> int:
        """Positions held (the next token's position); 0 before the first call."""
        return max((c.length for c in self.layers.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers.values())

    def reset(self) -> None:
        for c in self.layers.values():
            c.reset()
