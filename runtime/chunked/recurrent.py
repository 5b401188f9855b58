"""`nadoo.ChunkedRecurrent`: ONNX LSTM / GRU / RNN whose input weight W and recurrent weight R are
chunked tensors, each stored rows first as [directions · gates · H, K] (the ONNX [directions, gates·H, K]
with its first two axes merged: a row is one gate unit of one direction), so a chunk is a set of gate
rows. Inputs: X, then the op's own optional B, sequence_lens, initial_h, initial_c, P; attributes:
`cell` (LSTM | GRU | RNN), `weight` (W), `recurrence` (R) and the op's own. Every step multiplies by
all of R, so every chunk is read (one cached block each); the saving is the tier.
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelError
from .base import WholeWeightOp, register

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
class ChunkedRecurrent(WholeWeightOp):
    op_type = "ChunkedRecurrent"
    tensors = ("weight", "recurrence")  # the layer is W; R is read with it, a chunk the same gate rows of both

    def check(self, W, R):
        cell, node = self.node["attrs"]["cell"], self.node
        G = GATES.get(cell)
        if G is None or len(W.shape) != 2 or len(R.shape) != 2 or W.rows != R.rows or R.rows % (G * R.row_len):
            raise ModelError(f"node {node.get('name')} (ChunkedRecurrent): cell {cell!r} with W {list(W.shape)} and "
                             f"R {list(R.shape)} is not a recurrent layer (W, R: [directions·gates·H, K], R's K = H)")

    @property
    def R(self):
        return self.group[1][0]

    def kernel(self, node):
        cell, G, H = cell_fn(node["attrs"], node["outputs"]), GATES[node["attrs"]["cell"]], self.R.row_len
        return lambda x, w, r, *rest: cell(x, stacked(w, G, H), stacked(r, G, H), *rest)

    def output_shapes(self, x_shape: tuple) -> list[tuple]:
        from ..shape_rules import RULES

        a = self.node["attrs"]
        G, H = GATES[a["cell"]], self.R.row_len
        return RULES[a["cell"]](cell_attrs(a), [tuple(x_shape), (self.entry.rows // (G * H), G * H, self.entry.row_len)],
                                [], len(self.node["outputs"]))

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
