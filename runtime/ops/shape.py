"""Shape operators: Shape, Size, Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Concat, Split, Slice,
Expand, Tile, Pad, ConstantOfShape, Range, Constant, Trilu, EyeLike (the indexing ones: indexing.py)."""
from __future__ import annotations

import numpy as np

from ._common import Fallback, as_int_list, norm_axis, register

_I64 = np.int64


@register("Shape")
def _shape(node, ctx):
    start = ctx.attr_int("start", 0)
    end = ctx.attr_int("end", None)

    def f(x):
        return np.array(x.shape[start:end] if (start or end is not None) else x.shape, dtype=_I64)
    return f


@register("Size")
def _size(node, ctx):
    return lambda x: np.array(x.size, dtype=_I64)


def _reshape_target(shape, allowzero):
    shape = as_int_list(shape)
    has_zero = (not allowzero) and any(s == 0 for s in shape)
    return shape, has_zero


@register("Reshape")
def _reshape(node, ctx):
    allowzero = ctx.attr_int("allowzero", 0)
    sc = ctx.const(1)
    if sc is not None:
        shape, has_zero = _reshape_target(sc, allowzero)
        if not has_zero:
            t = tuple(shape)
            return lambda x, s: x.reshape(t)

        def fz(x, s):
            return x.reshape(tuple(x.shape[i] if v == 0 else v for i, v in enumerate(shape)))
        return fz

    def f(x, s):
        shape, has_zero = _reshape_target(s, allowzero)
        if has_zero:
            shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
        return x.reshape(shape)
    return f


@register("Flatten")
def _flatten(node, ctx):
    axis = ctx.attr_int("axis", 1)

    def f(x):
        a = norm_axis(axis, x.ndim)
        lead = int(np.prod(x.shape[:a])) if a else 1
        return x.reshape(lead, -1) if x.size or lead else x.reshape(lead, int(np.prod(x.shape[a:])))
    return f


@register("Transpose")
def _transpose(node, ctx):
    perm = ctx.attr_ints("perm", None)
    if perm is None:
        return lambda x: x.transpose()
    perm = tuple(perm)
    return lambda x: x.transpose(perm)


def _axes_input_or_attr(ctx, idx, opset_switch):
    """Return (const_axes or None, dynamic?) for ops whose axes moved from attribute to input."""
    if ctx.opset < opset_switch:
        a = ctx.attr_ints("axes", None)
        return (list(a) if a is not None else None), False
    if not ctx.has_input(idx):
        return None, False
    c = ctx.const(idx)
    if c is not None:
        return as_int_list(c), False
    return None, True


@register("Squeeze")
def _squeeze(node, ctx):
    axes, dyn = _axes_input_or_attr(ctx, 1, 13)
    if dyn:
        return lambda x, a=None: np.squeeze(x, axis=tuple(as_int_list(a))) if a is not None else np.squeeze(x)
    if axes is None:
        return lambda x, *a: np.squeeze(x)
    ax = tuple(axes)
    return lambda x, *a: np.squeeze(x, axis=ax)


@register("Unsqueeze")
def _unsqueeze(node, ctx):
    axes, dyn = _axes_input_or_attr(ctx, 1, 13)

    def do(x, axes):
        r = x.ndim + len(axes)
        axes = sorted(norm_axis(a, r) for a in axes)
        shape = list(x.shape)
        for a in axes:
            shape.insert(a, 1)
        return x.reshape(shape)
    if dyn:
        return lambda x, a: do(x, as_int_list(a))
    return lambda x, *a: do(x, axes)


@register("Concat")
def _concat(node, ctx):
    axis = ctx.attr_int("axis")

    def f(*xs):
        xs = [x for x in xs if x is not None]
        if len(xs) == 1:
            return xs[0]
        return np.concatenate(xs, axis=axis)
    return f


@register("Split")
def _split(node, ctx):
    axis = ctx.attr_int("axis", 0)
    n_out = ctx.n_outputs
    attr_split = ctx.attr_ints("split", None) if ctx.opset < 13 else None

    def f(x, split=None):
        a = norm_axis(axis, x.ndim)
        sizes = as_int_list(split) if split is not None else (list(attr_split) if attr_split else None)
        if sizes is None:
            d = x.shape[a]
            chunk = -(-d // n_out)
            sizes = [chunk] * (n_out - 1) + [d - chunk * (n_out - 1)]
        idx = np.cumsum(sizes)[:-1]
        return tuple(np.split(x, idx, axis=a))
    return f


def _slice_tuple(shape, starts, ends, axes, steps):
    rank = len(shape)
    sl = [slice(None)] * rank
    if axes is None:
        axes = range(len(starts))
    if steps is None:
        steps = [1] * len(starts)
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = norm_axis(int(a), rank)
        d = shape[a]
        s, e, st = int(s), int(e), int(st)
        if st == 0:
            raise ValueError("Slice step cannot be 0")
        if s < 0:
            s += d
        if e < 0:
            e += d
        if st > 0:
            s = min(max(s, 0), d)
            e = min(max(e, 0), d)
        else:
            s = min(max(s, 0), d - 1)
            e = min(max(e, -1), d - 1)
            if e == -1:
                e = None
        sl[a] = slice(s, e, st)
    return tuple(sl)


@register("Slice")
def _slice(node, ctx):
    if ctx.opset < 10:
        starts, ends, axes = ctx.attr_ints("starts"), ctx.attr_ints("ends"), ctx.attr_ints("axes", None)
        return lambda x: x[_slice_tuple(x.shape, starts, ends, axes, None)]
    consts = [ctx.const(i) if ctx.has_input(i) else None for i in range(1, 5)]
    all_const = all(ctx.const(i) is not None for i in (1, 2)) and \
        all((not ctx.has_input(i)) or ctx.const(i) is not None for i in (3, 4))
    if all_const:
        starts, ends = as_int_list(consts[0]), as_int_list(consts[1])
        axes = as_int_list(consts[2]) if consts[2] is not None else None
        steps = as_int_list(consts[3]) if consts[3] is not None else None
        cache = {}

        def fc(x, *_):
            key = x.shape
            t = cache.get(key)
            if t is None:
                t = cache[key] = _slice_tuple(key, starts, ends, axes, steps)
                if len(cache) > 64:
                    cache.clear()
            return x[t]
        return fc

    def f(x, starts, ends, axes=None, steps=None):
        return x[_slice_tuple(x.shape, as_int_list(starts), as_int_list(ends),
                              None if axes is None else as_int_list(axes),
                              None if steps is None else as_int_list(steps))]
    return f


@register("Expand")
def _expand(node, ctx):
    sc = ctx.const(1)
    if sc is not None:
        tgt = tuple(as_int_list(sc))
        cache = {}

        def fc(x, s):
            shp = cache.get(x.shape)
            if shp is None:
                shp = cache[x.shape] = np.broadcast_shapes(x.shape, tgt)
            return x if shp == x.shape else np.broadcast_to(x, shp)
        return fc

    def f(x, s):
        shp = np.broadcast_shapes(x.shape, tuple(as_int_list(s)))
        return x if shp == x.shape else np.broadcast_to(x, shp)
    return f


@register("Tile")
def _tile(node, ctx):
    return lambda x, r: np.tile(x, as_int_list(r))


@register("Pad")
def _pad(node, ctx):
    mode = ctx.attr_str("mode", "constant")
    if ctx.opset < 11:
        pads_attr = ctx.attr_ints("pads")
        val_attr = ctx.attr_float("value", 0.0)
    else:
        pads_attr, val_attr = None, None
    np_mode = {"constant": "constant", "reflect": "reflect", "edge": "edge", "wrap": "wrap"}.get(mode)
    if np_mode is None:
        raise Fallback(f"Pad mode {mode}")

    def f(x, pads=None, value=None, axes=None):
        p = pads_attr if pads_attr is not None else as_int_list(pads)
        r = x.ndim
        ax = list(range(r)) if axes is None else [norm_axis(a, r) for a in as_int_list(axes)]
        k = len(ax)
        widths = [(0, 0)] * r
        for j, a in enumerate(ax):
            widths[a] = (p[j], p[j + k])
        if any(w < 0 for pr in widths for w in pr):
            # negative pads crop
            sl = tuple(slice(-lo if lo < 0 else 0, (x.shape[i] + hi) if hi < 0 else None)
                       for i, (lo, hi) in enumerate(widths))
            x = x[sl]
            widths = [(max(lo, 0), max(hi, 0)) for lo, hi in widths]
        if np_mode == "constant":
            v = val_attr if val_attr is not None else (0 if value is None or value.size == 0 else value.reshape(-1)[0])
            return np.pad(x, widths, mode="constant", constant_values=v)
        return np.pad(x, widths, mode=np_mode)
    return f


def decode_tensor_attr(v):
    if isinstance(v, np.ndarray):
        return v
    if isinstance(v, dict) and "tensor" in v:
        t = v["tensor"]
        return np.array(t["data"], dtype=t["dtype"]).reshape(t["shape"])
    return np.asarray(v)


@register("ConstantOfShape")
def _cos(node, ctx):
    val = ctx.attr_tensor("value", None)
    if val is None:
        val = np.zeros(1, dtype=np.float32)
    val = decode_tensor_attr(val)
    scalar = val.reshape(-1)[0]
    dt = val.dtype

    def f(s):
        return np.full(tuple(as_int_list(s)), scalar, dtype=dt)
    return f


@register("Range")
def _range(node, ctx):
    def f(start, limit, delta):
        return np.arange(start, limit, delta, dtype=np.result_type(start))
    return f


@register("Constant")
def _constant(node, ctx):
    kinds = {"value": (ctx.attr_tensor, None), "value_float": (ctx.attr_float, np.float32),
             "value_floats": (ctx.attr_floats, np.float32), "value_int": (ctx.attr_int, np.int64),
             "value_ints": (ctx.attr_ints, np.int64)}
    for k, (get, dt) in kinds.items():
        v = get(k, None)
        if v is not None:
            arr = v if dt is None else np.array(v, dtype=dt)
            return lambda: arr
    raise Fallback("Constant of this kind")


@register("Trilu")
def _trilu(node, ctx):
    upper = ctx.attr_int("upper", 1)

    def f(x, k=None):
        kk = 0 if k is None else int(np.asarray(k).reshape(-1)[0])
        return np.triu(x, kk) if upper else np.tril(x, kk)
    return f


@register("EyeLike")
def _eyelike(node, ctx):
    k = ctx.attr_int("k", 0)
    dt = ctx.attr_int("dtype", None)

    def f(x):
        from .elementwise import onnx_dtype_to_np
        d = onnx_dtype_to_np(dt) if dt is not None else x.dtype
        return np.eye(x.shape[0], x.shape[1], k=k, dtype=d)
    return f
