"""`nadoo.ChunkedGather`: rows of an embedding table [N, ...] stored as chunks of rows.

Input: integer indices of any shape (negative ones count from the end, as in ONNX Gather). Only the
chunks holding a looked-up row are read: exact, whatever the policy.
"""

from __future__ import annotations

import numpy as np

from .. import callstats
from ..errors import InputError
from .base import WeightOp, register


def row_indices(idx, n: int, what: str) -> np.ndarray:
    """Indices into a table of n rows, checked and made non-negative."""
    idx = np.asarray(idx)
    if idx.dtype.kind not in "iu":
        raise InputError(f"{what}: indices must be integers, got {idx.dtype}")
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise InputError(f"{what}: index out of range for {n} rows")
    return np.where(idx < 0, idx + n, idx)


def gather_rows(table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """table[idx] with ONNX Gather's index rules (the compiler's calibration, float tables in memory)."""
    return table[row_indices(idx, table.shape[0], "Gather")]


@register
class ChunkedGather(WeightOp):
    op_type = "ChunkedGather"

    def __init__(self, node, ctx, env):
        super().__init__(node, ctx, env)
        e = self.tensor()
        self.start(e, env.policy.plan(e, env.layer_profile(e.name), can_route=False))

    def __call__(self, idx):
        e, bounds = self.entry, self.entry.bounds
        before = callstats.bytes_read()
        flat = row_indices(idx, e.rows, self.node["name"]).reshape(-1)
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
        name = node["attrs"]["weight"]
        ex.initializer(name, ex.weight(name))
        ex.add("Gather", [name, node["inputs"][0]], node["outputs"], axis=0)
