"""Output shapes of the standard ONNX operators from their inputs' shapes (and, for the operators whose
output size is a value, those values), without onnx and without allocating: the rules
runtime/segment_shapes.py applies node by node. `RULES[op](attrs, shapes, values, n_out)` gives one
shape per output; it raises `Open` when a value it needs is not known and ValueError for inputs the
kernel would refuse. Shapes are tuples of ints, `shapes`/`values` are per input (None: omitted or
unknown). The semantics are ONNX's (as runtime/ops implements them: clamped slices, Reshape's 0 and -1).
"""
from __future__ import annotations

import math

import numpy as np

from .ops._common import norm_axis
from .ops.conv import _pads_for
from .ops.shape import _slice_tuple
from .ops.sizes import broadcast

__all__ = ["RULES", "Open"]


class Open(Exception):
    """A value a rule needs (a target shape, axes, bounds) is not known for this signature."""


RULES: dict[str, object] = {}


def rule(*ops):
    def put(fn):
        for op in ops:
            RULES[op] = fn
        return fn
    return put


def ints(values, k) -> list[int]:
    """Input k's value as a list of ints; Open when it is not known."""
    if k >= len(values) or values[k] is None:
        raise Open
    return [int(v) for v in np.asarray(values[k]).reshape(-1)]


def axes_of(attrs, shapes, values, k=1) -> list[int] | None:
    """Axes from input k (newer opsets) or the `axes` attribute (older); None: neither is given."""
    if k < len(shapes) and shapes[k] is not None:
        return ints(values, k)
    a = attrs.get("axes")
    return None if a is None else [int(v) for v in a]


_SAME = {"Abs", "Ceil", "Cos", "Erf", "Exp", "Floor", "Gelu", "Identity", "LeakyRelu", "Log", "Neg", "Not",
         "Reciprocal", "Relu", "Round", "Sigmoid", "Sign", "Sin", "Softplus", "Sqrt", "Tanh", "Cast", "CastLike",
         "Softmax", "LogSoftmax", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Mish", "Clip", "IsNaN", "IsInf",
         "Trilu", "CumSum", "Dropout", "BitwiseNot", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh",
         "ThresholdedRelu", "Shrink", "Hardmax"}
_BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Mod", "PRelu", "Where", "Equal",
              "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "BitShift", "BitwiseAnd",
              "BitwiseOr", "BitwiseXor"}


@rule(*_SAME)
def _same(attrs, shapes, values, n_out):
    return [shapes[0]] * n_out  # (Dropout's mask has its input's shape too)


@rule("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
def _norm(attrs, shapes, values, n_out):
    x = shapes[0]
    a = norm_axis(int(attrs.get("axis", -1)), len(x))
    return [x] + [x[:a] + (1,) * (len(x) - a)] * (n_out - 1)  # the optional mean and inverse std


@rule(*_BROADCAST)
def _broadcasting(attrs, shapes, values, n_out):
    return [broadcast(*[s for s in shapes if s is not None])]


@rule("MatMul")
def _matmul(attrs, shapes, values, n_out):
    a, b = shapes[0], shapes[1]
    if not a or not b:
        raise ValueError("MatMul of a scalar")
    a2, b2 = (1,) + a if len(a) == 1 else a, b + (1,) if len(b) == 1 else b
    if a2[-1] != b2[-2]:
        raise ValueError("MatMul inner dimensions differ")
    out = broadcast(a2[:-2], b2[:-2]) + (a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return [out]


@rule("Gemm")
def _gemm(attrs, shapes, values, n_out):
    a, b = shapes[0], shapes[1]
    m = a[1] if attrs.get("transA") else a[0]
    n = b[0] if attrs.get("transB") else b[1]
    return [(m, n)]


@rule("Shape")
def _shape(attrs, shapes, values, n_out):
    r = len(shapes[0])
    return [(len(range(r)[slice(attrs.get("start", 0), attrs.get("end"))]),)]


@rule("Size")
def _size(attrs, shapes, values, n_out):
    return [()]


@rule("Gather")
def _gather(attrs, shapes, values, n_out):
    x, i = shapes[0], shapes[1]
    a = norm_axis(int(attrs.get("axis", 0)), len(x))
    return [x[:a] + i + x[a + 1:]]


@rule("GatherElements")
def _gather_elements(attrs, shapes, values, n_out):
    return [shapes[1]]


@rule("GatherND")
def _gather_nd(attrs, shapes, values, n_out):
    x, i, b = shapes[0], shapes[1], int(attrs.get("batch_dims", 0))
    return [i[:-1] + x[b + i[-1]:]]


@rule("Unsqueeze")
def _unsqueeze(attrs, shapes, values, n_out):
    axes = axes_of(attrs, shapes, values)
    out = list(shapes[0])
    for a in sorted(norm_axis(a, len(out) + len(axes)) for a in axes):
        out.insert(a, 1)
    return [tuple(out)]


@rule("Squeeze")
def _squeeze(attrs, shapes, values, n_out):
    x, axes = shapes[0], axes_of(attrs, shapes, values)
    drop = {k for k, d in enumerate(x) if d == 1} if axes is None else {norm_axis(a, len(x)) for a in axes}
    return [tuple(d for k, d in enumerate(x) if k not in drop)]


@rule("Concat")
def _concat(attrs, shapes, values, n_out):
    xs = [s for s in shapes if s is not None]
    a = norm_axis(int(attrs["axis"]), len(xs[0]))
    return [xs[0][:a] + (sum(s[a] for s in xs),) + xs[0][a + 1:]]


@rule("Split")
def _split(attrs, shapes, values, n_out):
    x = shapes[0]
    a = norm_axis(int(attrs.get("axis", 0)), len(x))
    sizes = ints(values, 1) if len(shapes) > 1 and shapes[1] is not None else attrs.get("split")
    if sizes is None:
        chunk = -(-x[a] // n_out)
        sizes = [chunk] * (n_out - 1) + [x[a] - chunk * (n_out - 1)]
    return [x[:a] + (int(d),) + x[a + 1:] for d in sizes]


@rule("Transpose")
def _transpose(attrs, shapes, values, n_out):
    x = shapes[0]
    perm = attrs.get("perm") or list(range(len(x)))[::-1]
    return [tuple(x[int(p)] for p in perm)]


@rule("Flatten")
def _flatten(attrs, shapes, values, n_out):
    x = shapes[0]
    a = norm_axis(int(attrs.get("axis", 1)), len(x))
    return [(math.prod(x[:a]), math.prod(x[a:]))]


@rule("Reshape")
def _reshape(attrs, shapes, values, n_out):
    x, target = shapes[0], ints(values, 1)
    if not attrs.get("allowzero"):
        target = [x[k] if d == 0 else d for k, d in enumerate(target)]
    if -1 in target:
        rest = math.prod(d for d in target if d != -1)
        target[target.index(-1)] = math.prod(x) // rest if rest else 0
    if math.prod(target) != math.prod(x):
        raise ValueError("Reshape changes the element count")
    return [tuple(target)]


@rule("Expand")
def _expand(attrs, shapes, values, n_out):
    return [broadcast(shapes[0], tuple(ints(values, 1)))]


@rule("Tile")
def _tile(attrs, shapes, values, n_out):
    return [tuple(d * r for d, r in zip(shapes[0], ints(values, 1)))]


@rule("ConstantOfShape")
def _constant_of_shape(attrs, shapes, values, n_out):
    return [tuple(ints(values, 0))]


@rule("Range")
def _range(attrs, shapes, values, n_out):
    (start,), (limit,), (delta,) = (np.asarray(values[k]).reshape(-1) if values[k] is not None else (None,)
                                    for k in range(3))
    if start is None or limit is None or delta is None:
        raise Open
    if delta == 0:
        raise ValueError("Range with delta 0")
    return [(max(int(math.ceil((float(limit) - float(start)) / float(delta))), 0),)]


@rule("Slice")
def _slice(attrs, shapes, values, n_out):
    x = shapes[0]
    starts, ends = ints(values, 1), ints(values, 2)
    axes = ints(values, 3) if len(shapes) > 3 and shapes[3] is not None else None
    steps = ints(values, 4) if len(shapes) > 4 and shapes[4] is not None else None
    view = np.broadcast_to(np.zeros((), np.int8), x)  # zero strides: slicing it allocates nothing
    return [view[_slice_tuple(x, starts, ends, axes, steps)].shape]


@rule("Pad")
def _pad(attrs, shapes, values, n_out):
    x, pads = list(shapes[0]), ints(values, 1)
    axes = ints(values, 3) if len(shapes) > 3 and shapes[3] is not None else list(range(len(x)))
    for j, a in enumerate(norm_axis(a, len(x)) for a in axes):
        x[a] += pads[j] + pads[j + len(axes)]
    return [tuple(x)]


@rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSumSquare", "ReduceL1",
      "ReduceL2", "ReduceLogSum", "ReduceLogSumExp")
def _reduce(attrs, shapes, values, n_out):
    x, axes = shapes[0], axes_of(attrs, shapes, values)
    if not axes:
        if axes is not None and attrs.get("noop_with_empty_axes"):
            return [x]
        axes = range(len(x))
    drop = {norm_axis(a, len(x)) for a in axes}
    keep = attrs.get("keepdims", 1)
    return [tuple(1 if k in drop else d for k, d in enumerate(x) if keep or k not in drop)]


@rule("ArgMax", "ArgMin")
def _arg(attrs, shapes, values, n_out):
    x = shapes[0]
    a = norm_axis(int(attrs.get("axis", 0)), len(x))
    return [x[:a] + ((1,) if attrs.get("keepdims", 1) else ()) + x[a + 1:]]


# ---------------------------------------------------------------------------------------------- windows
def _window_out(attrs, x: tuple, kernel: list, ceil: bool = False) -> tuple:
    """Spatial output sizes of a convolution or pooling window over x [N, C, *spatial]."""
    nd = len(x) - 2
    strides = attrs.get("strides") or [1] * nd
    dil = attrs.get("dilations") or [1] * nd
    pads = _pads_for(attrs.get("auto_pad", "NOTSET"), x[2:], kernel, strides, dil, attrs.get("pads"))
    out = []
    for i in range(nd):
        span = x[2 + i] + pads[i] + pads[i + nd] - ((kernel[i] - 1) * dil[i] + 1)
        o = (-(-span // strides[i]) if ceil else span // strides[i]) + 1
        if ceil and (o - 1) * strides[i] >= x[2 + i] + pads[i]:  # the last window starts inside the input
            o -= 1
        out.append(o)
    return tuple(out)


@rule("Conv")
def _conv(attrs, shapes, values, n_out):
    x, w = shapes[0], shapes[1]
    return [(x[0], w[0]) + _window_out(attrs, x, attrs.get("kernel_shape") or list(w[2:]))]


@rule("MaxPool", "AveragePool", "LpPool")
def _pool(attrs, shapes, values, n_out):
    x = shapes[0]
    y = x[:2] + _window_out(attrs, x, attrs["kernel_shape"], bool(attrs.get("ceil_mode", 0)))
    return [y] * n_out  # (MaxPool's indices have the output's shape)


@rule("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def _global_pool(attrs, shapes, values, n_out):
    return [shapes[0][:2] + (1,) * (len(shapes[0]) - 2)]


@rule("BatchNormalization", "InstanceNormalization")
def _batch_norm(attrs, shapes, values, n_out):
    if n_out > 1:  # training-mode statistics: not what a compiled model runs
        raise Open
    return [shapes[0]]


@rule("LSTM", "GRU", "RNN")
def _recurrent(attrs, shapes, values, n_out):
    """Y [seq, directions, batch, hidden] (layout 1: [batch, seq, directions, hidden]), Y_h and Y_c
    [directions, batch, hidden] (layout 1: [batch, directions, hidden])."""
    x, d, h = shapes[0], shapes[1][0], int(attrs["hidden_size"])
    if attrs.get("layout"):
        return [(x[0], x[1], d, h)] + [(x[0], d, h)] * (n_out - 1)
    return [(x[0], d, x[1], h)] + [(d, x[1], h)] * (n_out - 1)
