"""`nadoo.ChunkedRecurrent`: ONNX LSTM / GRU / RNN whose input weight W and recurrent weight R are
chunked tensors, each stored rows first as [directions · gates · H, K] (the ONNX [directions, gates·H, K]
with its first two axes merged: a row is one gate unit of one direction), so a chunk is a set of gate
rows. Inputs: X, then the op's own optional B, sequence_lens, initial_h, initial_c, P; attributes:
`cell` (LSTM | GRU | RNN), `weight` (W), `recurrence` (R) and the op's own. Every step multiplies by
all of R, so every chunk is read (one cached block each); the saving is the tier.
"""

from __future__ import annotations

import numpy as np

from .. import callstats
from ..errors import ModelError
from .base import WeightOp, register

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_OWN = ("cell", "weight", "recurrence")


def cell_attrs(attrs: dict) -> dict:
    """The ONNX op's own attributes (without the nadoo ones)."""
    return {k: v for k, v in attrs.items() if k not in _OWN}


def cell_fn(attrs: dict, outputs: list):
    """The ONNX cell taking W and R as [directions, gates·H, K] arguments, built once per node (shared
    with the compiler's calibration); `outputs`: the node's output names ("" for one it omits)."""
    from ..engine import build_node

    node = {"op": attrs["cell"], "domain": "", "name": attrs["cell"].lower(),
            "inputs": ["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"],
            "outputs": [f"y{i}" if o else "" for i, o in enumerate(outputs)], "attrs": cell_attrs(attrs)}
    return build_node(node, [None] * 8, {"": 18})


def stacked(w: np.ndarray, gates: int, hidden: int) -> np.ndarray:
    """Stored [D·G·H, K] → the ONNX [D, G·H, K]."""
    return w.reshape(-1, gates * hidden, w.shape[-1])


@register
class ChunkedRecurrent(WeightOp):
    op_type = "ChunkedRecurrent"
    exports_whole = True

    def __init__(self, node, ctx, env):
        super().__init__(node, ctx, env)
        W, R = self.tensor("weight"), self.tensor("recurrence")
        cell = node["attrs"]["cell"]
        G = GATES.get(cell)
        if G is None or len(W.shape) != 2 or len(R.shape) != 2 or W.rows != R.rows or R.rows % (G * R.row_len):
            raise ModelError(f"node {node.get('name')} (ChunkedRecurrent): cell {cell!r} with W {list(W.shape)} and "
                             f"R {list(R.shape)} is not a recurrent layer (W, R: [directions·gates·H, K], R's K = H)")
        plan = env.policy.plan(W, env.layer_profile(W.name), can_route=False)
        act_r = env.layer_profile(R.name).get("chunk_activity")
        tiers_r = env.policy.tiers_for(R, set(R.tiers), None if act_r is None else np.asarray(act_r))
        self.start(W, plan, [(W, plan.tiers), (R, tiers_r)])  # the layer is W; R is read with it
        self.R, self.tiers_r, self.G = R, tiers_r, G
        self.cell = cell_fn(node["attrs"], node["outputs"])

    def __call__(self, x, *rest):
        W, R, store, H = self.entry, self.R, self.env.store, self.R.row_len
        before = callstats.bytes_read()
        w = stacked(store.full(W, self.plan.tiers), self.G, H)
        r = stacked(store.full(R, self.tiers_r), self.G, H)
        y = self.cell(x, w, r, *rest)
        macs = self.macs_for(x.shape, None)
        self.count(before, W.n_chunks, macs, macs)  # a chunk: the same gate rows of W and R
        return y

    def macs_for(self, x_shape, y_shape) -> int:
        # every time step of every sequence: one input row against W's rows, one state against R's
        steps = int(np.prod(x_shape[:2], dtype=np.int64))
        return steps * self.entry.rows * (self.entry.row_len + self.R.row_len)

    @classmethod
    def export(cls, node, ex):
        a, ins = node["attrs"], node["inputs"]
        G, H = GATES[a["cell"]], ex.bundle.tensors[a["recurrence"]].row_len
        for name in (a["weight"], a["recurrence"]):
            ex.initializer(name, stacked(ex.weight(name), G, H))
        ex.add_node(a["cell"], [ins[0], a["weight"], a["recurrence"]] + ins[1:], node["outputs"], cell_attrs(a))
