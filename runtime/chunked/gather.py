"""`nadoo.ChunkedGather`: rows of an embedding table [N, ...] stored as chunks of rows.

Input: integer indices of any shape (negative ones count from the end, as in ONNX Gather), and
optionally a row map [N] (constant): index i reads stored row map[i] (a table stored in another
row order, e.g. an embedding tied to a vocabulary-routed LM head). Only the chunks holding a
looked-up row are read: exact, whatever the policy.
"""

from __future__ import annotations

import numpy as np

from .. import callstats
from ..errors import BundleError, InputError
from .base import WeightOp, register, unique_ids


def row_indices(idx, n: int, what: str) -> np.ndarray:
    """Indices into a table of n rows, checked and made non-negative."""
    idx = np.asarray(idx)
    if idx.dtype.kind not in "iu":
        raise InputError(f"{what}: indices must be integers, got {idx.dtype}")
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise InputError(f"{what}: index out of range for {n} rows")
    return np.where(idx < 0, idx + n, idx)


def checked_row_map(row_map, n: int, what: str) -> np.ndarray:
    """A row map must be a permutation of 0..n-1: anything else would read wrong rows silently."""
    m = np.asarray(row_map)
    if m.shape != (n,) or m.dtype.kind not in "iu" or not np.array_equal(np.sort(m), np.arange(n)):
        raise BundleError(f"corrupt bundle: {what}: the row map is not a permutation of the table's {n} rows")
    return m


def gather_rows(table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """table[idx] with ONNX Gather's index rules (the compiler's calibration, float tables in memory)."""
    return table[row_indices(idx, table.shape[0], "Gather")]


@register
class ChunkedGather(WeightOp):
    """Reads only the chunks that hold a looked-up row; under a dense policy ORT may hold the table whole."""
    op_type = "ChunkedGather"
    exports_whole = True

    def bind(self, node, ctx, env):
        e = self.tensor()
        self.start(e, env.policy.plan(e, env.layer_profile(e.name), can_route=False))
        self._map = self._map_seen = None

    def __call__(self, idx, row_map=None):
        e, bounds = self.entry, self.entry.bounds
        before = callstats.bytes_read()
        flat = self._rows(idx, row_map)
        shape = np.shape(idx) + e.shape[1:]
        if flat.size == 0:
            self.count(before, 0, 0, 0)
            return np.empty(shape, np.float32)
        chunk_of = np.searchsorted(bounds, flat, side="right") - 1
        ids = unique_ids(chunk_of)
        # each block's rows straight into the result: no concatenated copy of every block touched, and
        # under a budget a slice of blocks at a time (store.slices), so few decoded blocks live at once
        out = np.empty((flat.size, e.row_len), np.float32)
        which = np.searchsorted(ids, chunk_of)
        store, j = self.env.store, 0
        for part in store.slices(e, ids):
            for blk in store.chunks(e, part, self.plan.tiers):
                sel = which == j
                out[sel] = blk[flat[sel] - bounds[ids[j]]]
                j += 1
        self.count(before, len(ids), 0, 0)
        return out.reshape(shape)

    def _rows(self, idx, row_map=None) -> np.ndarray:
        """The stored rows `idx` looks up, flat, checked."""
        flat = row_indices(idx, self.entry.rows, self.node["name"]).reshape(-1)
        if row_map is not None:
            if row_map is not self._map_seen:  # a constant: checked once, not on every call
                self._map, self._map_seen = checked_row_map(row_map, self.entry.rows, self.node["name"]), row_map
            flat = self._map[flat]
        return flat

    def output_shapes(self, x_shape: tuple) -> list[tuple]:
        return [tuple(x_shape) + tuple(self.entry.shape[1:])]  # a row per index

    # Another engine's lookup is counted like this one's: the chunks holding a row looked up (from the
    # index values, which that engine hands back: `count_whole`'s x)
    counts_values = True

    def count_whole(self, x_shape: tuple, y_shape: tuple | None, macs: int | None = None, x=None) -> None:
        flat = self._rows(x)
        ids = unique_ids(np.searchsorted(self.entry.bounds, flat, side="right") - 1) if flat.size else flat
        self.counters().chunks_read += len(ids)

    def whole_tiers(self) -> dict[str, str] | None:
        """Under a dense policy the table may be held whole elsewhere (ONNX Runtime, in its stored codes:
        one lookup is then one kernel, not a fetch per chunk). Any other policy reads only the chunks
        looked up; a table read through a row map or by another node too (a tied LM head) stays here, in one
        place."""
        if self.env.policy.kind != "dense" or len(self.node["inputs"]) > 1 or any(
                op is not self and e.name == self.entry.name for op in self.env.ops for e, _ in getattr(op, "group", ())):
            return None
        return super().whole_tiers()

    def ort_types_ok(self, types: dict) -> bool:
        # ONNX Gather (and GatherBlockQuantized) index with int32/int64 only; other integers stay here
        return all(types.get(i) in (np.dtype(np.int32), np.dtype(np.int64)) for i in self.node["inputs"] if i)

    def macs_for(self, x_shape: tuple, y_shape: tuple | None) -> int:
        return 0  # a lookup multiplies nothing

    @classmethod
    def export(cls, node, ex):
        name, ins = node["attrs"]["weight"], node["inputs"]
        idx = ins[0]
        if len(ins) > 1:  # the row map first: index -> stored row
            idx = ex.fresh("rows")
            ex.add("Gather", [ins[1], ins[0]], [idx], axis=0)
        ex.gather(name, idx, node["outputs"][0])
