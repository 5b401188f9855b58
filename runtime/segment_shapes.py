"""Every value's shape in an ORT segment, for one signature (input shapes and small integer input
values), without onnx: node by node, the rules of runtime/shape_rules.py for the standard operators and
each nadoo op's `output_shapes`, with the small values shape arithmetic computes (Shape, then Gather /
Unsqueeze / Concat / Where / Cast ... over it) propagated, since the output size of Reshape, Expand,
Range, ConstantOfShape, Slice, ... is such a value. A value is computed by the plan's own kernel
(`evaluate`) once every input of its node is a known small value.

Why: onnx's shape inference is the only reason a cold `nadoo run` / `generate` would import onnx
(~0.75 s of CPU, mostly ml_dtypes). Shapes here only size the run-cap checks before ORT allocates; ORT
computes the values. A segment with an operator no rule covers settles with onnx (runtime/ort_engine.py).
"""
from __future__ import annotations

import math

import numpy as np

from .shape_rules import RULES, Open

__all__ = ["covers", "segment_shapes"]

_KEEP = 64  # values up to this many elements are propagated: shapes, axes, bounds (never activations)
SHAPE_READERS = {"Shape", "Size"}  # their output is a function of their input's shape alone


def covers(n: dict, op=None) -> bool:
    """Whether a node has a rule here (a nadoo node: its ChunkedOp `op` has `output_shapes`)."""
    dom = n.get("domain") or ""
    if dom == "nadoo":
        return op is not None and op.has_output_shapes()
    return dom in ("", "ai.onnx") and n["op"] in RULES


def segment_shapes(nodes: list[dict], ops: list, shapes: dict, values: dict, evaluate,
                   partial: bool = False) -> tuple[dict, dict] | None:
    """(`shapes`, `values`) extended by every node's outputs. `shapes`: the segment's inputs and
    constants; `values`: its constants and small integer inputs; `ops`: the ChunkedOp of each nadoo
    node, in order; `evaluate(k, input values)`: node k's outputs by the plan's kernel. None when a
    node's shape is not settled, or with `partial` that node is passed over (its outputs stay unknown,
    for onnx's inference to settle). Raises ValueError for shapes the kernels would refuse."""
    shapes, values, ops = dict(shapes), dict(values), iter(ops)
    for k, n in enumerate(nodes):
        nadoo = (n.get("domain") or "") == "nadoo"
        op = next(ops) if nadoo else None
        ins, outs = n["inputs"], n["outputs"]
        in_shapes = [shapes.get(i) if i else None for i in ins]
        in_values = [values.get(i) if i else None for i in ins]
        got = None
        if not nadoo and ins and all(not i or (v is not None and np.size(v) <= _KEEP) for i, v in zip(ins, in_values)):
            got = _computed(evaluate, k, in_values, outs, values)
        if got is None and not any(i and s is None for i, s in zip(ins, in_shapes)):
            try:
                got = op.output_shapes(in_shapes[0]) if nadoo else _by_rule(n, in_shapes, in_values, len(outs))
            except Open:
                got = None
            except (IndexError, KeyError, TypeError) as e:  # attributes that do not fit: the kernel says why
                raise ValueError(str(e)) from None
        if got is None:
            if partial:
                continue
            return None
        for o, s in zip(outs, got):
            if o and not (partial and o in shapes):  # (a shape onnx settled stays)
                shapes[o] = tuple(int(d) for d in s)
        if not nadoo and n["op"] in SHAPE_READERS and outs[0]:
            values[outs[0]] = _read_shape(n, shapes[ins[0]])
    return shapes, values


def _computed(evaluate, k: int, in_values: list, outs: list, values: dict) -> list | None:
    """The output shapes of node k computed from its inputs' values (kept in `values` when small), or
    None when its kernel does not compute them (the shape rules then settle it)."""
    try:
        got = [np.asarray(v) for v in evaluate(k, in_values)]
    except Exception:
        return None
    for o, v in zip(outs, got):
        if o and v.size <= _KEEP:
            values[o] = v
    return [v.shape for v in got]


def _read_shape(n: dict, x: tuple) -> np.ndarray:
    if n["op"] == "Size":
        return np.array(math.prod(x), np.int64)
    attrs = n.get("attrs") or {}
    return np.array(x[slice(attrs.get("start", 0), attrs.get("end"))], np.int64)


def _by_rule(n: dict, shapes: list, values: list, n_out: int) -> list | None:
    fn = RULES.get(n["op"]) if (n.get("domain") or "") in ("", "ai.onnx") else None
    return None if fn is None else fn(n.get("attrs") or {}, shapes, values, n_out)
