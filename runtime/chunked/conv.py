"""`nadoo.ChunkedConv`: ONNX Conv whose weight [Cout, Cin/group, *kernel] is stored as chunks of output
channels. Inputs: x, optional bias; attributes: `weight` and the Conv's own. Every chunk is read
(one cached block); the saving is the tier."""

from __future__ import annotations

import numpy as np

from .base import WholeWeightOp, register


def conv_fn(attrs: dict):
    """ONNX Conv taking its weight as an argument (the engine's implementation), built once per node."""
    from ..engine import build_node

    node = {"op": "Conv", "domain": "", "name": "conv", "inputs": ["x", "w", "b"], "outputs": ["y"],
            "attrs": _conv_attrs(attrs)}
    f = build_node(node, [None, None, None], {"": 18})
    return lambda x, w, bias=None: f(x, w, bias) if bias is not None else f(x, w)


def _conv_attrs(attrs: dict) -> dict:
    return {k: v for k, v in attrs.items() if k != "weight"}


@register
class ChunkedConv(WholeWeightOp):
    op_type = "ChunkedConv"

    def kernel(self, node):
        return conv_fn(node["attrs"])

    def output_shapes(self, x_shape: tuple) -> list[tuple]:
        from ..shape_rules import RULES

        return RULES["Conv"](_conv_attrs(self.node["attrs"]), [tuple(x_shape), tuple(self.entry.shape)], [], 1)

    def macs_for(self, x_shape, y_shape) -> int:
        return int(np.prod(y_shape, dtype=np.int64)) * self.entry.row_len  # N·P·Cout outputs, each a K-long dot product

    @classmethod
    def export(cls, node, ex):
        name, ins = node["attrs"]["weight"], node["inputs"]
        ex.initializer(name, ex.weight(name).reshape(ex.bundle.tensors[name].shape))
        ex.add_node("Conv", [ins[0], name] + ins[1:2], node["outputs"], _conv_attrs(node["attrs"]))
