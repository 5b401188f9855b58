"""How much an operator will allocate and compute, known from its inputs before its kernel runs.

Only operators whose output can be much larger than what they read have a rule here: generators whose
output size is a *value* (Range, ConstantOfShape, Expand, Tile, Pad, OneHot, Resize, TopK, ...), broadcasting
elementwise ops ([n, 1] + [1, m]), index ops (Gather), and the ops whose work exceeds their output
(MatMul, Gemm, Conv, pooling). Every other operator produces at most about what it reads, so the
engine's check of each produced value suffices for it. A rule is a builder like the kernels':
``rule(node, ctx) -> need(*args) -> (elements of the largest array the kernel makes, multiply-adds)``.
A rule raises ValueError for inputs the kernel would reject anyway.
"""
from __future__ import annotations

import math

import numpy as np

from ._common import as_int_list, norm_axis, registrar

SIZE_RULES: dict[tuple[str, str], object] = {}
size_rule = registrar(SIZE_RULES)


def prod(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _shape(a) -> tuple:
    return a.shape if type(a) is np.ndarray else tuple(np.shape(a))


def _by_shapes(fn):
    """need(*args) = fn(*shapes of the given args), memoised per shapes: the rules of the frequent ops
    (elementwise, MatMul) then cost one dict lookup per step of a run."""
    memo: dict = {}

    def need(*args):
        key = tuple(_shape(a) for a in args if a is not None)
        r = memo.get(key)
        if r is None:
            if len(memo) >= 64:
                memo.clear()
            r = memo[key] = fn(*key)
        return r
    return need


def broadcast(*shapes) -> tuple:
    """NumPy broadcasting of shapes in Python ints (no overflow, no allocation)."""
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(rank):
        d = 1
        for s in shapes:
            k = s[i - rank + len(s)] if i - rank + len(s) >= 0 else 1
            if k < 0:
                raise ValueError(f"negative dimension {k}")
            if k != 1:
                if d != 1 and d != k:
                    raise ValueError(f"shapes {shapes} do not broadcast")
                d = k
        out.append(d)
    return tuple(out)


def _scalar(a) -> float:
    v = np.asarray(a).reshape(-1)
    if v.size != 1:
        raise ValueError("expected a scalar input")
    return v[0].item()


# ---------------------------------------------------------------------------------------------- elementwise
@size_rule("Add", "Sub", "Mul", "Div", "Pow", "Mod", "BitShift", "Equal", "Less", "Greater", "LessOrEqual",
           "GreaterOrEqual", "And", "Or", "Xor", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "PRelu", "Max", "Min",
           "Sum", "Mean", "Where")
def _broadcasting(node, ctx):
    return _by_shapes(lambda *shapes: (prod(broadcast(*shapes)), 0))


# ---------------------------------------------------------------------------------------------- generators
@size_rule("Expand")
def _expand(node, ctx):
    return lambda x, s: (prod(broadcast(_shape(x), tuple(as_int_list(s)))), 0)


@size_rule("Tile")
def _tile(node, ctx):
    def need(x, r):
        reps = as_int_list(r)
        if any(v < 0 for v in reps):
            raise ValueError("Tile repeats must be >= 0")
        return prod(_shape(x)) * prod(reps), 0
    return need


@size_rule("ConstantOfShape")
def _constant_of_shape(node, ctx):
    def need(s):
        dims = as_int_list(s)
        if any(d < 0 for d in dims):
            raise ValueError("ConstantOfShape dims must be >= 0")
        return prod(dims), 0
    return need


@size_rule("Range")
def _range(node, ctx):
    def need(start, limit, delta):
        s, l, d = _scalar(start), _scalar(limit), _scalar(delta)
        if not all(math.isfinite(v) for v in (s, l, d)) or d == 0:
            raise ValueError(f"Range({s}, {l}, {d}) is not a finite range")
        return max(math.ceil((l - s) / d), 0), 0
    return need


@size_rule("OneHot")
def _onehot(node, ctx):
    return lambda idx, depth, values: (prod(_shape(idx)) * max(int(_scalar(depth)), 0), 0)


@size_rule("Pad")
def _pad(node, ctx):
    pads_attr = ctx.attr_ints("pads", None) if ctx.opset < 11 else None

    def need(x, pads=None, value=None, axes=None):
        shape = _shape(x)
        p = pads_attr if pads_attr is not None else as_int_list(pads)
        r = len(shape)
        ax = list(range(r)) if axes is None else [norm_axis(a, r) for a in as_int_list(axes)]
        if len(p) != 2 * len(ax):
            raise ValueError(f"Pad needs {2 * len(ax)} pads, got {len(p)}")
        dims = list(shape)
        for j, a in enumerate(ax):
            dims[a] = max(dims[a] + p[j] + p[j + len(ax)], 0)
        return prod(dims), 0
    return need


def _resized(shape, scales=None, sizes=None, axes=None) -> int:
    r = len(shape)
    ax = list(range(r)) if axes is None else [norm_axis(a, r) for a in axes]
    dims = list(shape)
    if sizes is not None:
        if len(sizes) != len(ax):
            raise ValueError("Resize sizes do not match the axes")
        for a, s in zip(ax, sizes):
            dims[a] = s
    elif scales is not None:
        if len(scales) != len(ax):
            raise ValueError("Resize scales do not match the axes")
        for a, s in zip(ax, scales):
            if not math.isfinite(s) or s < 0:
                raise ValueError("Resize scales must be finite and >= 0")
            dims[a] = math.floor(dims[a] * s)
    if any(d < 0 for d in dims):
        raise ValueError("negative output dimension")
    return prod(dims)


@size_rule("Resize")
def _resize(node, ctx):
    axes = ctx.attr_ints("axes", None)

    def need(x, roi=None, scales=None, sizes=None):
        if sizes is not None and np.size(sizes):
            return _resized(_shape(x), sizes=as_int_list(sizes), axes=axes), 0
        sc = None if scales is None or not np.size(scales) else [float(v) for v in np.asarray(scales).reshape(-1)]
        return _resized(_shape(x), scales=sc, axes=axes), 0
    return need


@size_rule("Upsample")
def _upsample(node, ctx):
    attr_scales = ctx.attr_floats("scales", None)

    def need(x, scales=None):
        sc = attr_scales if scales is None else [float(v) for v in np.asarray(scales).reshape(-1)]
        return _resized(_shape(x), scales=sc), 0
    return need


@size_rule("RandomNormal", "RandomUniform")
def _random(node, ctx):
    n = prod(ctx.attr_ints("shape"))
    return lambda *args: (n, 0)


@size_rule("TopK")
def _topk(node, ctx):
    axis = ctx.attr_int("axis", -1)

    def need(x, k):
        s = _shape(x)
        d = s[norm_axis(axis, len(s))] if s else 0
        kk = int(_scalar(k))
        if not 0 <= kk <= d:
            raise ValueError(f"TopK k={kk} is not in [0, {d}]")
        return prod(s) // max(d, 1) * kk, 0
    return need


# ---------------------------------------------------------------------------------------------- indexing
@size_rule("Gather")
def _gather(node, ctx):
    axis = ctx.attr_int("axis", 0)

    def need(x, idx):
        s = _shape(x)
        a = norm_axis(axis, len(s))
        return prod(s[:a]) * prod(_shape(idx)) * prod(s[a + 1:]), 0
    return need


@size_rule("GatherND")
def _gathernd(node, ctx):
    b = ctx.attr_int("batch_dims", 0)

    def need(x, idx):
        s, i = _shape(x), _shape(idx)
        m = i[-1] if i else 0
        return prod(i[:-1]) * prod(s[b + m:]), 0
    return need


# ---------------------------------------------------------------------------------------------- products
def _matmul_need(sa: tuple, sb: tuple) -> tuple[int, int]:
    if not sa or not sb:
        raise ValueError("MatMul of a scalar")
    a = (1,) + sa if len(sa) == 1 else sa
    b = sb + (1,) if len(sb) == 1 else sb
    out = prod(broadcast(a[:-2], b[:-2])) * a[-2] * b[-1]
    return out, out * a[-1]


@size_rule("MatMul")
def _matmul(node, ctx):
    return _by_shapes(_matmul_need)


@size_rule("Gemm")
def _gemm(node, ctx):
    ta, tb = ctx.attr_int("transA", 0), ctx.attr_int("transB", 0)

    def need(a, b, c=None):
        sa, sb = _shape(a), _shape(b)
        if len(sa) != 2 or len(sb) != 2:
            raise ValueError("Gemm takes 2-D inputs")
        m, k = (sa[1], sa[0]) if ta else sa
        n = sb[0] if tb else sb[1]
        return m * n, m * n * k
    return need


def _window_need(shape, kernel, strides, dil, pads, channels_out=None) -> tuple[int, int]:
    """(largest array, multiply-adds) of a sliding-window op over x [N, C, *sp] padded by `pads`."""
    nd = len(kernel)
    if len(shape) != nd + 2 or len(strides) != nd or len(dil) != nd or len(pads) != 2 * nd:
        raise ValueError("kernel, strides, dilations and pads do not match the input rank")
    if any(s < 1 for s in strides) or any(d < 1 for d in dil) or any(k < 1 for k in kernel):
        raise ValueError("kernel, strides and dilations must be >= 1")
    n, c = shape[:2]
    padded = [shape[2 + i] + pads[i] + pads[i + nd] for i in range(nd)]
    out_sp = [max((padded[i] - ((kernel[i] - 1) * dil[i] + 1)) // strides[i] + 1, 0) for i in range(nd)]
    windows = n * c * prod(out_sp) * prod(kernel)  # im2col columns / pooled window elements
    out = n * (channels_out if channels_out is not None else c) * prod(out_sp)
    macs = windows * (channels_out or 1)
    return max(n * c * prod(padded), windows, out), macs


def _conv_rule(node, ctx, weight_shape: tuple | None = None):
    """Conv over x [N, C, *sp] with weight [M, C/group, *k] (an input, or the chunked weight's shape)."""
    from .conv import _pads_for

    group = ctx.attr_int("group", 1)
    auto_pad = ctx.attr_str("auto_pad", "NOTSET")
    a_kernel, a_strides = ctx.attr_ints("kernel_shape", None), ctx.attr_ints("strides", None)
    a_dil, a_pads = ctx.attr_ints("dilations", None), ctx.attr_ints("pads", None)

    def need(x, w=None, b=None):
        shape = _shape(x)
        nd = len(shape) - 2
        ws = weight_shape or (_shape(w) if w is not None else None)
        ws = ws if ws is not None and len(ws) == nd + 2 else None
        kernel = list(a_kernel) if a_kernel else (list(ws[2:]) if ws else None)
        if kernel is None or nd < 1:
            raise ValueError("Conv needs a kernel shape and an input [N, C, ...]")
        strides, dil = a_strides or [1] * nd, a_dil or [1] * nd
        pads = _pads_for(auto_pad, shape[2:], kernel, strides, dil, a_pads)
        size, macs = _window_need(shape, kernel, strides, dil, pads, ws[0] if ws else None)
        return size, macs // max(group, 1)
    return need


size_rule("Conv")(_conv_rule)


def _conv_transpose_rule(node, ctx, stored: tuple | None = None):
    """ConvTranspose over x [N, Cin, *sp]: its weight an input [Cin, Cout/group, *k], or `stored`, the
    chunked weight's shape [Cout, Cin/group, *k]. Bounds the uncropped output and the patches."""
    group = ctx.attr_int("group", 1)
    a_strides, a_dil = ctx.attr_ints("strides", None), ctx.attr_ints("dilations", None)
    a_out_pad = ctx.attr_ints("output_padding", None)

    def need(x, w=None, b=None):
        shape = _shape(x)
        nd = len(shape) - 2
        ws = stored if stored is not None else (_shape(w) if w is not None else None)
        if ws is None or len(ws) != nd + 2 or nd < 1 or group < 1:
            raise ValueError("ConvTranspose needs a weight of the input's rank and an input [N, C, ...]")
        kernel = list(ws[2:])
        cout = ws[0] if stored is not None else ws[1] * group
        strides, dil, out_pad = a_strides or [1] * nd, a_dil or [1] * nd, a_out_pad or [0] * nd
        if len(strides) != nd or len(dil) != nd or len(out_pad) != nd or min(strides + dil) < 1:
            raise ValueError("strides, dilations and output_padding must match the input rank and be >= 1")
        full = [strides[i] * max(shape[2 + i] - 1, 0) + out_pad[i] + (kernel[i] - 1) * dil[i] + 1 for i in range(nd)]
        n, p = shape[0], prod(shape[2:])
        patches = n * cout * prod(kernel) * p
        return max(n * cout * prod(full), patches), patches * shape[1] // group
    return need


size_rule("ConvTranspose")(_conv_transpose_rule)


@size_rule("MaxPool", "AveragePool")
def _pool(node, ctx):
    from .conv import _pool_params

    def need(x):
        shape = _shape(x)
        if len(shape) < 3:
            raise ValueError("pooling needs an input [N, C, ...]")
        nd, kernel, strides, dil, pads, extra = _pool_params(ctx, x)
        pads = pads[:nd] + [pads[nd + i] + extra[i] for i in range(nd)]
        return _window_need(shape, kernel, strides, dil, pads)
    return need


# the nadoo domain's rules (weights in the bundle) register themselves in SIZE_RULES on import
from . import sizes_nadoo  # noqa: E402,F401
