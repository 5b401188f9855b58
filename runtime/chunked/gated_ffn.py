"""`nadoo.GatedFFN`: a language model's gated MLP, down(act(gate·x) ⊙ up·x), in one op.

Inputs: x [..., K], then optional biases of gate, up [R] and down [N] ("" when absent). Attributes:
`gate`, `up`, `down` (chunked tensors) and `activation` (runtime/activations.py names). gate and up
are [R, K] linear tensors (rows = neurons); down is stored transposed, [R, N], chunked by neuron
groups, so a group of input neurons of down is one contiguous chunk.

Activation sparsity (runtime/ffn_sparsity.py): with `Policy.ffn_sparsity` > 0 a neuron whose |a_j| is
at or below the layer's calibrated threshold is dropped, and down reads and multiplies only the groups with
a surviving neuron. A position whose activity is spread (fewer than `Policy.ffn_fallback` of its
neurons below the threshold) computes the layer dense. With sparsity 0 the op is the dense product.

Where the groups come from: an unbounded cache keeps every tensor resident after its first use, so
the whole down tensor is read once and each run of consecutive kept groups is a view into it (no
copy); under a memory budget only the kept groups' chunks are read, and a group whose inputs are all
exactly zero at every position (a ReLU's idle neurons) is not read at all: it adds nothing, so the
output is the same. With `Policy.neuron_window` W > 0 the groups the last W tokens used are held by
the op (neuron_window.py) and a token reads only the others.
"""

from __future__ import annotations

import numpy as np

from .. import callstats
from ..activations import activation
from ..errors import BundleError, InputError
from ..ffn_sparsity import allocate, curves_of
from .base import WeightOp, register
from .linear import linear
from .neuron_window import NeuronWindow


class _Counts:
    """One call's neuron counts of one layer (per position)."""

    # zeros: neurons exactly zero (before any dropping); groups_needed / groups_read: down's groups the
    # positions used, and those of them not held by a neuron window; bytes_read: the whole MLP's
    # (gate, up, down), down_bytes_read: down's alone (the last four counted by GatedFFN only)
    __slots__ = ("neurons", "skipped", "positions", "dense_positions", "zeros", "groups_needed", "groups_read",
                 "bytes_read", "down_bytes_read")

    def __init__(self):
        for k in self.__slots__:
            setattr(self, k, 0)


@register
class GatedFFN(WeightOp):
    op_type = "GatedFFN"
    exports_whole = True  # dense (no sparsity): another engine may run gate, up and down as one whole layer

    def bind(self, node, ctx, env):
        gate, up, down = self.tensor("gate"), self.tensor("up"), self.tensor("down")
        if not (gate.rows == up.rows == down.rows and gate.row_len == up.row_len):
            raise BundleError(f"{node['name']}: gate, up and down projections disagree in shape")
        pol = env.policy
        plan = pol.plan(down, env.layer_profile(down.name), can_route=False)
        self.tiers_g = pol.tiers_for(gate, set(gate.tiers), None)
        self.tiers_u = pol.tiers_for(up, set(up.tiers), None)
        self.start(down, plan, [(gate, self.tiers_g), (up, self.tiers_u), (down, plan.tiers)])
        self.gate, self.up, self.down = gate, up, down
        self.act = activation(node["attrs"]["activation"])
        self.sparsity, self.threshold = allocation(env).get(down.name, (0.0, 0.0))
        self.fallback = pol.ffn_fallback
        self.streamed = env.store.cache.budget is not None
        # without a budget every group stays resident after first use: a window would hold nothing new
        self.window = NeuronWindow(pol.neuron_window) if pol.neuron_window > 0 and self.streamed else None

    def __call__(self, x, b_gate=None, b_up=None, b_down=None):
        before = callstats.bytes_read()
        h = self.act(self._rows(x, self.gate, self.tiers_g, b_gate))
        h *= self._rows(x, self.up, self.tiers_u, b_up)
        pos = x.size // self.gate.row_len
        K, R, N = self.gate.row_len, self.gate.rows, self.down.row_len
        dense = pos * R * (2 * K + N)
        c = new_counts(self, pos, R)
        c.zeros += h.size - np.count_nonzero(h)
        ids = np.arange(self.down.n_chunks)
        if self.sparsity > 0:
            h, ids = drop_small(h, self.threshold, self.fallback, self.down.bounds, c)
        mid = callstats.bytes_read()
        y, ids = self._down_groups(h, ids, b_down, c)
        c.down_bytes_read += callstats.bytes_read() - mid
        c.bytes_read += callstats.bytes_read() - before
        c.groups_needed += len(ids)
        bounds = self.down.bounds
        rows = int((bounds[ids + 1] - bounds[ids]).sum())
        if self.sparsity > 0 or self.streamed:
            self.chose(ids)
        self.count(before, len(ids), pos * R * 2 * K + pos * rows * N, dense)
        return y

    def whole_tiers(self):
        # activation sparsity selects neuron groups per token: that stays here
        return None if self.sparsity > 0 else super().whole_tiers()

    def output_dim(self) -> int:
        return self.down.row_len  # down is stored [neurons, outputs]

    def macs_for(self, x_shape, y_shape) -> int:
        K, R, N = self.gate.row_len, self.gate.rows, self.down.row_len
        return int(np.prod(x_shape, dtype=np.int64)) // K * R * (2 * K + N)

    @classmethod
    def export(cls, node, ex):
        """act(x·gateᵀ) ⊙ (x·upᵀ) · down, down as stored ([neurons, outputs])."""
        ins, a = node["inputs"], node["attrs"]
        bias = [ins[i] if len(ins) > i else "" for i in (1, 2, 3)]
        g, u, act, h = (ex.fresh(t) for t in ("gate", "up", "act", "h"))
        ex.linear(ins[0], a["gate"], bias[0], g)
        ex.linear(ins[0], a["up"], bias[1], u)
        ex.activation(a["activation"], g, act)
        ex.add("Mul", [act, u], [h])
        ex.linear_transposed(h, a["down"], bias[2], node["outputs"][0])

    def _rows(self, x, e, tiers, bias):
        """x·Eᵀ (+ bias) over every chunk of a linear tensor (streamed under a small budget)."""
        store = self.env.store
        if store.fits(e):
            return linear(x, store.full(e, tiers).T, bias)
        y = np.empty(x.shape[:-1] + (e.rows,), np.float32)
        for part in store.slices(e, np.arange(e.n_chunks)):
            for i, w in zip(part, store.chunks(e, part, tiers)):
                y[..., e.bounds[i]:e.bounds[i + 1]] = x @ w.T
        return y + bias if bias is not None else y

    def _down_groups(self, h, ids, bias, c: "_Counts"):
        """Σ over the groups `ids` of h[group] · downᵀ[group] (+ bias), and the groups used (under a
        budget: those of `ids` with a nonzero input)."""
        d, store, bounds, tiers = self.down, self.env.store, self.down.bounds, self.plan.tiers
        y = None

        def add(i, w):
            nonlocal y
            part = h[..., bounds[i]:bounds[i + 1]] @ w
            y = part if y is None else np.add(y, part, out=y)

        if not self.streamed:
            full = store.full(d, tiers)
            for lo, hi in runs(ids):
                part = h[..., bounds[lo]:bounds[hi]] @ full[bounds[lo]:bounds[hi]]
                y = part if y is None else np.add(y, part, out=y)
            c.groups_read += len(ids)
        else:
            # need[p, g]: position p has a nonzero input in group g; a group no position needs adds exactly 0
            need = np.logical_or.reduceat(h.reshape(-1, d.rows) != 0, bounds[:-1], axis=1)
            ids = ids[need[:, ids].any(0)]
            if self.window is not None:
                blocks, n_read = self.window.take(need, ids, lambda m: store.chunks(d, m, tiers, cache=False))
                for i, w in zip(ids, blocks):
                    add(i, w)
                c.groups_read += n_read
            else:
                for sl in store.slices(d, ids):
                    for i, w in zip(sl, store.chunks(d, sl, tiers)):
                        add(i, w)
                c.groups_read += len(ids)
        if y is None:
            y = np.zeros(h.shape[:-1] + (d.row_len,), np.float32)
        return (y + bias if bias is not None else y), ids

    @classmethod
    def check_policy(cls, policy, bundle) -> None:
        if policy.ffn_sparsity > 0 and not curves_of(bundle.read_profile() or {}):
            raise InputError("--ffn-sparsity needs a bundle with FFN sparsity thresholds (compiled by this "
                             "nadoo version, with an MLP); this one has none")

    @classmethod
    def extra_stats(cls, ops, call) -> dict | None:
        return ffn_stats(ops, call)


def drop_small(h: np.ndarray, threshold: float, fallback: float, bounds: np.ndarray, c: "_Counts"):
    """h with every |h_j| <= threshold zeroed (positions whose share below it is under `fallback`
    kept whole: their activity is spread), and the neuron groups (chunks of `bounds`) still needed
    by some position. Counts skipped neurons and dense positions in `c`."""
    R = h.shape[-1]
    keep = np.abs(h) > np.float32(threshold)
    flat = keep.reshape(-1, R)
    skipped = R - np.count_nonzero(flat, axis=1)
    spread = skipped < fallback * R
    if spread.any():
        flat[spread] = True
    c.skipped += int(skipped[~spread].sum())
    c.dense_positions += int(spread.sum())
    ids = np.flatnonzero(np.logical_or.reduceat(flat.any(0), bounds[:-1]))
    return np.where(keep, h, np.float32(0)), ids


def new_counts(op, pos: int, R: int) -> "_Counts":
    """The current call's neuron counts of `op`, `pos` positions of `R` neurons added."""
    c = callstats.state_for(op, _Counts)
    c.neurons += pos * R
    c.positions += pos
    return c


def ffn_rates(n: dict) -> dict:
    """`ffn_sparsity` (share of neurons skipped), `ffn_dense_fallback_rate` (share of positions a
    sparse layer computed dense) and `ffn_zero_share` (share of neurons exactly zero) from summed counts."""
    return {"ffn_sparsity": n["skipped"] / max(n["neurons"], 1),
            "ffn_dense_fallback_rate": n["dense_positions"] / max(n["positions"], 1),
            "ffn_zero_share": n["zeros"] / max(n["neurons"], 1)}


def ffn_stats(ops, call) -> dict:
    """The run statistics of a family of sparsity-aware FFN ops: summed counts and their rates, and the
    bytes the neuron windows hold after the call (`ffn_window_bytes`)."""
    counts = [call.states[op] for op in ops if op in call.states]
    n = {k: sum(getattr(c, k) for c in counts) for k in _Counts.__slots__}
    held = sum(op.window.nbytes for op in ops if getattr(op, "window", None) is not None)
    return {"ffn_counts": n, **ffn_rates(n), "ffn_window_bytes": held}


def runs(ids):
    """Consecutive runs [lo, hi) of sorted group ids."""
    if len(ids) == 0:
        return []
    cut = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [len(ids)]])
    return [(int(ids[s]), int(ids[e - 1]) + 1) for s, e in zip(starts, ends)]


def allocation(env) -> dict:
    """Per layer (sparsity, threshold) for the policy's target, computed once per session."""
    if "ffn_allocation" not in env.shared:
        target = env.policy.ffn_sparsity
        env.shared["ffn_allocation"] = allocate(curves_of(env.profile), target) if target > 0 else {}
    return env.shared["ffn_allocation"]
