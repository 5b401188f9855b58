"""`nadoo.ChunkedConvTranspose`: ONNX ConvTranspose whose weight is stored as chunks of output channels.

ONNX lays the weight out [Cin, Cout/group, *kernel]: its first axis is the *input* channel, so a chunk
of its rows would be a set of inputs every output reads. The container stores rows first (one row per
output unit, format spec §4.1), so the compiler stores it [Cout, Cin/group, *kernel] — the layout of a
Conv weight — with row g·Cout/g + m, column (c, k) = W[g·Cin/g + c, m, k]. A chunk is then a set of
output channels, and the quantizer's input-channel-major columns read the same input as a Conv's.
Inputs: x, optional bias; attributes: `weight` and the ConvTranspose's own. Every chunk is read (one
cached block); the saving is the tier.
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelError
from .base import WholeWeightOp, register


def rows_first(w: np.ndarray, group: int) -> np.ndarray:
    """ONNX [Cin, Cout/g, *k] → stored [Cout, Cin/g, *k] (output channels first)."""
    cin, mg, k = w.shape[0], w.shape[1], w.shape[2:]
    return np.ascontiguousarray(w.reshape((group, cin // group, mg) + k).swapaxes(1, 2).reshape((group * mg, cin // group) + k))


def onnx_layout(w: np.ndarray, group: int) -> np.ndarray:
    """Stored [Cout, Cin/g, *k] → ONNX [Cin, Cout/g, *k] (the inverse of rows_first)."""
    cout, cg, k = w.shape[0], w.shape[1], w.shape[2:]
    return np.ascontiguousarray(w.reshape((group, cout // group, cg) + k).swapaxes(1, 2).reshape((group * cg, cout // group) + k))


def _attrs(attrs: dict) -> dict:
    return {k: v for k, v in attrs.items() if k != "weight"}


def conv_transpose_fn(attrs: dict):
    """ONNX ConvTranspose taking its weight rows first as an argument, built once per node (shared
    with the compiler's calibration)."""
    from ..engine import build_node

    node = {"op": "ConvTranspose", "domain": "", "name": "conv_transpose", "inputs": ["x", "w", "b"],
            "outputs": ["y"], "attrs": _attrs(attrs)}
    f = build_node(node, [None, None, None], {"": 18})
    group = int(attrs.get("group", 1))

    def run(x, w_rows, bias=None):
        w = onnx_layout(w_rows, group)
        return f(x, w, bias) if bias is not None else f(x, w)
    return run


@register
class ChunkedConvTranspose(WholeWeightOp):
    op_type = "ChunkedConvTranspose"

    def check(self, e):
        group, node = self.node["attrs"].get("group", 1), self.node
        if type(group) is not int or group < 1 or e.rows % group or len(e.shape) < 3:
            raise ModelError(f"node {node.get('name')} (ChunkedConvTranspose): {e.name} {list(e.shape)} with group "
                             f"{group!r} is not a kernel [Cout, Cin/group, *kernel] whose group divides Cout")

    def kernel(self, node):
        return conv_transpose_fn(node["attrs"])

    def macs_for(self, x_shape, y_shape) -> int:
        # every input value meets Cout/g · kernel weights: N·P_in·Cin·(Cout/g)·kk = N·P_in·Cout·K
        return int(x_shape[0] * np.prod(x_shape[2:], dtype=np.int64)) * self.entry.rows * self.entry.row_len

    @classmethod
    def export(cls, node, ex):
        name, ins, attrs = node["attrs"]["weight"], node["inputs"], node["attrs"]
        w = ex.weight(name).reshape(ex.bundle.tensors[name].shape)
        ex.initializer(name, onnx_layout(w, int(attrs.get("group", 1))))
        ex.add_node("ConvTranspose", [ins[0], name] + ins[1:2], node["outputs"], _attrs(attrs))
