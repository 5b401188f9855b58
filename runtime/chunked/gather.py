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
from .base import WeightOp, register


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
    op_type = "ChunkedGather"

    def bind(self, node, ctx, env):
        e = self.tensor()
        self.start(e, env.policy.plan(e, env.layer_profile(e.name), can_route=False))
        self._map = self._map_seen = None

    def __call__(self, idx, row_map=None):
        e, bounds = self.entry, self.entry.bounds
        before = callstats.bytes_read()
        flat = row_indices(idx, e.rows, self.node["name"]).reshape(-1)
        if row_map is not None:
            if row_map is not self._map_seen:  # a constant: checked once, not on every call
                self._map, self._map_seen = checked_row_map(row_map, e.rows, self.node["name"]), row_map
            flat = self._map[flat]
        shape = np.shape(idx) + e.shape[1:]
        if flat.size == 0:
            self.count(before, 0, 0, 0)
            return np.empty(shape, np.float32)
        chunk_of = np.searchsorted(bounds, flat, side="right") - 1
        ids = np.unique(chunk_of)
        blocks = self.env.store.chunks(e, ids, self.plan.tiers)
        table = np.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0]
        base = np.zeros(e.n_chunks, np.int64)  # where each fetched chunk starts in `table`
        base[ids] = np.concatenate([[0], np.cumsum(np.diff(bounds)[ids])[:-1]])
        out = table[flat - bounds[chunk_of] + base[chunk_of]]
        self.count(before, len(ids), 0, 0)
        return out.reshape(shape)

    @classmethod
    def export(cls, node, ex):
        name, ins = node["attrs"]["weight"], node["inputs"]
        ex.initializer(name, ex.weight(name))
        idx = ins[0]
        if len(ins) > 1:  # the row map first: index -> stored row
            idx = ex.fresh("rows")
            ex.add("Gather", [ins[1], ins[0]], [idx], axis=0)
        ex.add("Gather", [name, idx], node["outputs"], axis=0)
