"""Every value's shape in an ORT segment, for one set of input shapes, without onnx: the rules of the
common operators (elementwise and broadcasting, normalizations, MatMul, Slice with known bounds) and of
the nadoo ops ORT computes whole (their output is the input with its last axis replaced). A segment
with any other operator gets None and the engine asks onnx's shape inference (runtime/ort_engine.py).

Why: onnx's inference is the only reason a cold `nadoo run` / `generate` imports onnx (~0.75 s of CPU,
mostly ml_dtypes). Shapes here only size the run-cap checks before ORT allocates; ORT computes the values.
"""
from __future__ import annotations

import numpy as np

__all__ = ["covers", "segment_shapes"]

_SAME = {"Abs", "Ceil", "Cos", "Erf", "Exp", "Floor", "Gelu", "Identity", "LeakyRelu", "Log", "Neg", "Not",
         "Reciprocal", "Relu", "Round", "Sigmoid", "Sign", "Sin", "Softplus", "Sqrt", "Tanh", "Cast", "Softmax",
         "LogSoftmax", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Mish", "Clip", "IsNaN", "IsInf"}
_ONE_OUTPUT_NORMS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"}
_BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Mod", "PRelu", "Where", "Equal",
              "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor"}


def _matmul(a: tuple, b: tuple) -> tuple:
    if len(a) == 0 or len(b) == 0:
        raise ValueError("MatMul of a scalar")
    a2, b2 = (1,) + a if len(a) == 1 else a, b + (1,) if len(b) == 1 else b
    if a2[-1] != b2[-2]:
        raise ValueError("MatMul inner dimensions differ")
    out = tuple(np.broadcast_shapes(a2[:-2], b2[:-2])) + (a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return out


def _slice(x: tuple, values: list) -> tuple | None:
    starts, ends = values[1], values[2]
    axes = values[3] if len(values) > 3 and values[3] is not None else np.arange(len(starts))
    steps = values[4] if len(values) > 4 and values[4] is not None else np.ones(len(starts), np.int64)
    if starts is None or ends is None:
        return None
    view = np.broadcast_to(np.zeros((), np.int8), x)  # zero strides: slicing it allocates nothing
    idx = [slice(None)] * len(x)
    for s, e, a, st in zip(starts.tolist(), ends.tolist(), axes.tolist(), steps.tolist()):
        idx[int(a) % len(x)] = slice(int(s), int(e), int(st))
    return view[tuple(idx)].shape


def covers(n: dict) -> bool:
    """Whether a standard node has a rule here (nadoo nodes: their op's `output_dim`)."""
    kind = n["op"]
    if (n.get("domain") or "") not in ("", "ai.onnx"):
        return False
    if kind in _ONE_OUTPUT_NORMS:
        return sum(1 for o in n["outputs"] if o) == 1
    return kind in _SAME or kind in _BROADCAST or kind in ("MatMul", "Slice")


def _node(n: dict, op, shapes: list, values: list) -> list | None:
    """Output shapes of one node, or None when no rule covers it."""
    kind, x = n["op"], shapes[0] if shapes else None
    if (n.get("domain") or "") == "nadoo":
        out_dim = getattr(op, "output_dim", lambda: None)()
        return None if out_dim is None or x is None else [tuple(x[:-1]) + (out_dim,)]
    if (n.get("domain") or "") not in ("", "ai.onnx") or any(s is None for i, s in zip(n["inputs"], shapes) if i):
        return None
    if kind in _SAME:
        return [x]
    if kind in _ONE_OUTPUT_NORMS:
        return [x] if sum(1 for o in n["outputs"] if o) == 1 else None
    if kind in _BROADCAST:
        return [tuple(np.broadcast_shapes(*[s for i, s in zip(n["inputs"], shapes) if i]))]
    if kind == "MatMul":
        return [_matmul(shapes[0], shapes[1])]
    if kind == "Slice":
        s = _slice(x, values)
        return None if s is None else [s]
    return None


def segment_shapes(nodes: list[dict], ops: list, shapes: dict, values: dict) -> dict | None:
    """`shapes` (the segment's inputs and constants) extended by every node output, or None. `ops`: the
    ChunkedOp of each nadoo node, in order; `values`: constant and folded values by name."""
    shapes, ops = dict(shapes), iter(ops)
    for n in nodes:
        op = next(ops) if (n.get("domain") or "") == "nadoo" else None
        try:
            outs = _node(n, op, [shapes.get(i) if i else None for i in n["inputs"]],
                         [values.get(i) if i else None for i in n["inputs"]])
        except ValueError:  # shapes the kernel would refuse: the plan's own steps report it
            return None
        if outs is None:
            return None
        for o, s in zip([o for o in n["outputs"] if o], outs):
            shapes[o] = tuple(int(d) for d in s)
    return shapes
