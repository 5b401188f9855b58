"""`nadoo.ChunkedLinear`: y = x·Wᵀ (+ bias), W [R, K] stored as chunks of output rows.

Inputs: x [..., K], optional bias [R]. Attribute `weight`: the chunked tensor's name. Only the chunks
the policy's plan keeps are read and computed; a skipped chunk's outputs are its bias alone (exact
for pruned, all-zero chunks).
"""

from __future__ import annotations

import numpy as np

from .. import callstats
from .base import WeightOp, register, unique_ids


def linear(x: np.ndarray, wt: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """x[..., K] @ wt[K, R] (+ bias[R]); wt is the transposed weight (a view is fine). Shared with the
    compiler's calibration (float weights in memory). As one 2-D product: NumPy's stacked matmul of a
    [B, S, K] input is ~2.5x slower than the same rows in one GEMM (measured, MiniLM shapes)."""
    if x.ndim > 2 and x.flags.c_contiguous:
        y = np.matmul(x.reshape(-1, x.shape[-1]), wt).reshape(x.shape[:-1] + (wt.shape[-1],))
    else:
        y = np.matmul(x, wt)
    if bias is not None:
        y += bias
    return y


def bias_only(x: np.ndarray, R: int, bias: np.ndarray | None) -> np.ndarray:
    """The output of a layer none of whose chunks is computed: its bias (or zeros) per position."""
    y = np.zeros(x.shape[:-1] + (R,), np.float32)
    if bias is not None:
        y += bias
    return y


@register
class ChunkedLinear(WeightOp):
    """Computes the chunks of output rows its plan keeps (dense, a routed subset, the oracle, or none)."""
    op_type = "ChunkedLinear"
    exports_whole = True

    def bind(self, node, ctx, env):
        e = self.tensor()
        self.start(e, env.policy.plan(e, env.layer_profile(e.name)))
        self.fits = env.store.fits(e)
        self.run = {"dense": self._dense, "subset": self._subset, "oracle": self._oracle, "empty": self._empty,
                    }[self.plan.mode]

    def __call__(self, x, bias=None):
        return self.run(x, bias)

    def _macs(self, x, rows: int) -> int:
        return (x.size // self.entry.row_len) * rows * self.entry.row_len

    def output_dim(self) -> int:
        return self.entry.rows

    def macs_for(self, x_shape, y_shape) -> int:
        return int(np.prod(x_shape, dtype=np.int64)) // self.entry.row_len * self.entry.rows * self.entry.row_len

    def _dense(self, x, bias):
        e, store = self.entry, self.env.store
        before = callstats.bytes_read()
        if not self.fits:  # larger than the budget: stream it, a budget-sized slice of chunks at a time
            return self._partial(x, np.arange(e.n_chunks), bias, before)
        y = linear(x, store.full(e, self.plan.tiers).T, bias)
        self.count(before, e.n_chunks, self._macs(x, e.rows), self._macs(x, e.rows))
        return y

    def _subset(self, x, bias):
        return self._partial(x, self.plan.keep, bias, callstats.bytes_read())

    def _partial(self, x, ids, bias, before):
        # Each kept block writes its own output columns (no per-call concatenation of weights).
        e, store, bounds = self.entry, self.env.store, self.entry.bounds
        y = bias_only(x, e.rows, bias)
        for part in store.slices(e, ids):
            for i, w in zip(part, store.chunks(e, part, self.plan.tiers)):
                y[..., bounds[i] : bounds[i + 1]] += np.matmul(x, w.T)
        rows = int(sum(bounds[i + 1] - bounds[i] for i in ids))
        self.count(before, len(ids), self._macs(x, rows), self._macs(x, e.rows))
        return y

    def _oracle(self, x, bias):
        """The exact product, then only the k chunks with most output energy kept (reads everything:
        it measures the other predictors' recall)."""
        e, bounds, R = self.entry, self.entry.bounds, self.entry.rows
        before = callstats.bytes_read()
        full = linear(x, self.env.store.full(e, self.plan.tiers).T, bias)
        fb = full.reshape(full.shape[0] if full.ndim > 1 else 1, -1, R)
        energy = np.add.reduceat(np.einsum("bpr,bpr->br", fb, fb), bounds[:-1], axis=1)
        keep = unique_ids(np.argsort(-energy, axis=1, kind="stable")[:, : self.plan.k])
        y = np.zeros_like(full) if bias is None else np.broadcast_to(bias, full.shape).copy()
        rows = np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i in keep])
        y[..., rows] = full[..., rows]
        self.chose(keep)
        self.count(before, e.n_chunks, self._macs(x, R), self._macs(x, R))
        return y

    def _empty(self, x, bias):
        self.count(callstats.bytes_read(), 0, 0, self._macs(x, self.entry.rows))
        return bias_only(x, self.entry.rows, bias)

    @classmethod
    def export(cls, node, ex):
        ins, name = node["inputs"], node["attrs"]["weight"]
        ex.linear(ins[0], name, ins[1] if len(ins) > 1 else "", node["outputs"][0])
