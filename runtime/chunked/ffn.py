"""`nadoo.ChunkedFFN`: act(x·Upᵀ + b1)·Down + b2 over neuron groups.

A chunk is a neuron group: rows of Up [R, K] and the same rows of Down stored transposed [R, N],
adjacent in the file. Inputs: x, b1, b2, and (constants written by the compiler) the predictor sketch
P [K, r], Q [r, R] and each neuron's |down row|² E [R]. Attributes: `up`, `down`, `activation`.

Skipping a group skips its whole contribution. Groups are computed one by one and accumulated:
concatenating the selected blocks first would copy every selected weight on every call (measured:
most of a top-k call on a wide MLP). A layer larger than the cache budget streams, a budget-sized
slice of groups at a time.
"""

from __future__ import annotations

import numpy as np

from .. import callstats
from ..activations import activation
from ..errors import InputError
from .base import WeightOp, register, unique_ids
from .gated_ffn import allocation, drop_small, ffn_stats, new_counts, runs
from .linear import linear


@register
class ChunkedFFN(WeightOp):
    op_type = "ChunkedFFN"
    exports_whole = True

    def bind(self, node, ctx, env):
        up, down = self.tensor("up"), self.tensor("down")
        if not np.array_equal(up.bounds, down.bounds):
            raise InputError(f"{node['name']}: up and down projections are chunked differently")
        P, Q, E = ctx.const(3), ctx.const(4), ctx.const(5)
        prof = env.layer_profile(up.name)
        # A group contributes nothing only when its *down* chunk is empty: an emptied up chunk still
        # adds act(b1)·down for its neurons (its up rows decode to zeros, so computing it is exact).
        plan = env.policy.plan(up, prof, predictor_available=P is not None, skip_of=down)
        act_prof = np.asarray(prof["chunk_activity"]) if "chunk_activity" in prof else None
        tiers_d = env.policy.tiers_for(down, set(down.tiers), act_prof)  # its own tiers (e.g. --bits alloc)
        self.start(up, plan, [(up, plan.tiers), (down, tiers_d)])
        self.up, self.down, self.tiers_d = up, down, tiers_d
        self.act = activation(node["attrs"]["activation"])
        if plan.mode != "predict":  # the sketch only serves predicted top-k: not held otherwise (1.4 MiB in MiniLM)
            P = Q = None
        if P is not None:  # stored as float16; computed in float32 (converted once, here)
            P, Q = P.astype(np.float32), Q.astype(np.float32)
        self.P, self.Q = P, Q
        self.E = np.ones(up.rows, np.float32) if E is None else E
        self.fits = env.store.fits(up) and env.store.fits(down)
        # activation sparsity (gated_ffn.py): only the dense plan drops small activations per token
        self.sparsity, self.threshold = allocation(env).get(down.name, (0.0, 0.0)) if plan.mode == "dense" else (0, 0)
        self.fallback = env.policy.ffn_fallback
        self.run = {"dense": self._dense, "subset": self._subset, "empty": self._subset, "oracle": self._oracle,
                    "predict": self._predicted}[plan.mode]

    def __call__(self, x, b1=None, b2=None, *_):
        return self.run(x, b1, b2)

    def whole_tiers(self):
        # dropping small activations per token is a per-input selection: that layer runs here
        return None if self.sparsity > 0 else super().whole_tiers()

    def _dense_macs(self, x) -> int:
        return self.macs_for(x.shape, None)

    def output_dim(self) -> int:
        return self.down.row_len  # down is stored [neurons, outputs]

    def macs_for(self, x_shape, y_shape) -> int:
        pos = int(np.prod(x_shape, dtype=np.int64)) // self.up.row_len
        return pos * self.up.rows * (self.up.row_len + self.down.row_len)

    def _dense(self, x, b1, b2, before: int | None = None):
        before = callstats.bytes_read() if before is None else before
        if not self.fits:  # the layer is larger than the budget: stream it group by group
            return self._groups(x, np.arange(self.up.n_chunks), b1, b2, 0, before)
        store = self.env.store
        h = self.act(linear(x, store.full(self.up, self.plan.tiers).T, b1))
        c = new_counts(self, x.size // self.up.row_len, self.up.rows)
        c.zeros += h.size - np.count_nonzero(h)
        if self.sparsity > 0:
            return self._sparse(x, h, b2, c, before)
        y = linear(h, store.full(self.down, self.tiers_d), b2)
        self.count(before, self.up.n_chunks, self._dense_macs(x), self._dense_macs(x))
        return y

    def _sparse(self, x, h, b2, c, before):
        """down over the neuron groups a position still needs once small activations are dropped."""
        h, ids = drop_small(h, self.threshold, self.fallback, self.down.bounds, c)
        full, bounds = self.env.store.full(self.down, self.tiers_d), self.down.bounds
        y = np.zeros(h.shape[:-1] + (self.down.row_len,), np.float32)
        for lo, hi in runs(ids):
            y += h[..., bounds[lo]:bounds[hi]] @ full[bounds[lo]:bounds[hi]]
        if b2 is not None:
            y += b2
        pos = x.size // self.up.row_len
        rows = int((bounds[ids + 1] - bounds[ids]).sum())
        self.count(before, self.up.n_chunks, pos * (self.up.rows * self.up.row_len + rows * self.down.row_len),
                   self._dense_macs(x))
        return y

    @classmethod
    def extra_stats(cls, ops, call) -> dict | None:
        return ffn_stats(ops, call)

    def _subset(self, x, b1, b2):
        keep = self.plan.keep if self.plan.keep is not None else np.zeros(0, np.int64)
        return self._groups(x, keep, b1, b2, 0, callstats.bytes_read())

    def _groups(self, x, ids, b1, b2, extra_macs: int, before: int):
        """The groups `ids` (those never read dropped) computed and accumulated; `extra_macs`: what
        choosing them cost."""
        up, down, bounds, store = self.up, self.down, self.up.bounds, self.env.store
        ids = ids[~self.plan.skip[ids]]
        self.chose(ids)
        if len(ids) == 0:
            self.count(before, 0, extra_macs, self._dense_macs(x))
            y = np.zeros(x.shape[:-1] + (down.row_len,), np.float32)
            return y + b2 if b2 is not None else y
        if len(ids) == up.n_chunks and self.fits:  # every group selected (a batch's union): dense is the same, faster
            y = self._dense(x, b1, b2, before)
            self.counters().macs += extra_macs
            return y
        y = None
        for sl in store.slices(up, ids, extra=down):
            for i, wu, wd in zip(sl, store.chunks(up, sl, self.plan.tiers), store.chunks(down, sl, self.tiers_d)):
                lo, hi = bounds[i], bounds[i + 1]
                part = self.act(linear(x, wu.T, None if b1 is None else b1[lo:hi])) @ wd
                y = part if y is None else np.add(y, part, out=y)
        if b2 is not None:
            y += b2
        rows = int(sum(bounds[i + 1] - bounds[i] for i in ids))
        pos = x.size // up.row_len
        self.count(before, len(ids), pos * rows * (up.row_len + down.row_len) + extra_macs, self._dense_macs(x))
        return y

    def _top_union(self, z):
        """Per sample (leading axis) the k groups of most predicted output energy Σ act(z)²·|down row|²;
        a batch reads the union of them."""
        hz = self.act(z.reshape(z.shape[0], -1, self.up.rows))
        scores = np.add.reduceat(np.einsum("bpr,bpr->br", hz, hz) * self.E, self.up.bounds[:-1], axis=1)
        return unique_ids(np.argsort(-scores, axis=1, kind="stable")[:, : self.plan.k])

    def _oracle(self, x, b1, b2):
        """Groups chosen by the exact up product (reads every up chunk: for measuring recall)."""
        before = callstats.bytes_read()
        z = linear(x, self.env.store.full(self.up, self.plan.tiers).T, b1)
        y = self._groups(x, self._top_union(z), b1, b2, (x.size // self.up.row_len) * self.up.rows * self.up.row_len,
                         before)
        lc = self.counters()
        lc.chunks_read += self.up.n_chunks - len(lc.selected)  # deciding needed every up chunk
        return y

    def _predicted(self, x, b1, b2):
        """Groups chosen by the low-rank sketch x·P·Q ≈ x·Upᵀ."""
        before = callstats.bytes_read()
        z = (x @ self.P) @ self.Q
        if b1 is not None:
            z += b1
        extra = (x.size // self.up.row_len) * self.P.shape[1] * (self.up.row_len + self.up.rows)
        return self._groups(x, self._top_union(z), b1, b2, extra, before)

    @classmethod
    def export(cls, node, ex):
        ins, attrs = node["inputs"], node["attrs"]
        up, down = attrs["up"], attrs["down"]
        z, h = ex.fresh("z"), ex.fresh("h")
        ex.linear(ins[0], up, ins[1] if len(ins) > 1 else "", z)
        ex.activation(attrs["activation"], z, h)
        ex.linear_transposed(h, down, ins[2] if len(ins) > 2 else "", node["outputs"][0])
