"""Reductions, ArgMax/ArgMin, Softmax/LogSoftmax, CumSum, TopK."""
from __future__ import annotations

import numpy as np

from ._common import Fallback, as_int_list, norm_axis, register


def _reduce_builder(kind):
    def builder(node, ctx):
        keep = bool(ctx.attr_int("keepdims", 1))
        noop = bool(ctx.attr_int("noop_with_empty_axes", 0))
        switch = 13 if kind == "ReduceSum" else 18
        if ctx.opset < switch:
            a = ctx.attr_ints("axes", None)
            const_axes = tuple(a) if a is not None else None
            dyn = False
        elif ctx.has_input(1):
            c = ctx.const(1)
            const_axes = tuple(as_int_list(c)) if c is not None else None
            dyn = c is None
        else:
            const_axes, dyn = None, False

        def compute(x, axes):
            if axes is not None and len(axes) == 0:
                axes = None
                if noop:
                    return x
            return _apply(kind, x, axes, keep)

        if dyn:
            return lambda x, axes=None: compute(x, None if axes is None else tuple(as_int_list(axes)))
        return lambda x, *_: compute(x, const_axes)
    return builder


def _apply(kind, x, axes, keep):
    if kind == "ReduceMean":
        return np.mean(x, axis=axes, keepdims=keep, dtype=x.dtype if x.dtype.kind == "f" else None)
    if kind == "ReduceSum":
        return np.sum(x, axis=axes, keepdims=keep, dtype=x.dtype)
    if kind == "ReduceMax":
        return np.max(x, axis=axes, keepdims=keep) if x.size else _empty_red(x, axes, keep, -np.inf)
    if kind == "ReduceMin":
        return np.min(x, axis=axes, keepdims=keep) if x.size else _empty_red(x, axes, keep, np.inf)
    if kind == "ReduceProd":
        return np.prod(x, axis=axes, keepdims=keep, dtype=x.dtype)
    if kind == "ReduceSumSquare":
        return np.sum(np.square(x), axis=axes, keepdims=keep, dtype=x.dtype)
    if kind == "ReduceL1":
        return np.sum(np.abs(x), axis=axes, keepdims=keep, dtype=x.dtype)
    if kind == "ReduceL2":
        return np.sqrt(np.sum(np.square(x), axis=axes, keepdims=keep)).astype(x.dtype, copy=False)
    if kind == "ReduceLogSum":
        return np.log(np.sum(x, axis=axes, keepdims=keep)).astype(x.dtype, copy=False)
    if kind == "ReduceLogSumExp":
        m = np.max(x, axis=axes, keepdims=True)
        r = np.log(np.sum(np.exp(x - m), axis=axes, keepdims=True)) + m
        if not keep:
            r = np.squeeze(r, axis=axes) if axes is not None else r.reshape(())
        return r.astype(x.dtype, copy=False)
    raise Fallback(kind)


def _empty_red(x, axes, keep, fill):
    shape = np.sum(np.zeros(x.shape, dtype=np.float32), axis=axes, keepdims=keep).shape
    return np.full(shape, fill, dtype=x.dtype)


for _k in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSumSquare", "ReduceL1",
           "ReduceL2", "ReduceLogSum", "ReduceLogSumExp"):
    register(_k)(_reduce_builder(_k))


def _arg_builder(fn):
    def builder(node, ctx):
        axis = ctx.attr_int("axis", 0)
        keep = bool(ctx.attr_int("keepdims", 1))
        last = ctx.attr_int("select_last_index", 0)

        def f(x):
            a = norm_axis(axis, x.ndim)
            if last:
                xr = np.flip(x, axis=a)
                r = x.shape[a] - 1 - fn(xr, axis=a)
            else:
                r = fn(x, axis=a)
            r = np.asarray(r, dtype=np.int64)
            return np.expand_dims(r, a) if keep else r
        return f
    return builder


register("ArgMax")(_arg_builder(np.argmax))
register("ArgMin")(_arg_builder(np.argmin))


def softmax(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    y = np.subtract(x, m)
    np.exp(y, out=y)
    s = np.sum(y, axis=axis, keepdims=True)
    y /= s
    return y


def _softmax_builder(log):
    def builder(node, ctx):
        legacy = ctx.opset < 13
        axis = ctx.attr_int("axis", 1 if legacy else -1)

        def f(x):
            if legacy:
                a = norm_axis(axis, x.ndim)
                shp = x.shape
                x2 = x.reshape(int(np.prod(shp[:a])), -1)
                y = _one(x2, -1)
                return y.reshape(shp)
            return _one(x, axis)

        def _one(x, ax):
            if not log:
                return softmax(x, ax)
            m = np.max(x, axis=ax, keepdims=True)
            y = x - m
            return y - np.log(np.sum(np.exp(y), axis=ax, keepdims=True))
        return f
    return builder


register("Softmax")(_softmax_builder(False))
register("LogSoftmax")(_softmax_builder(True))


@register("CumSum")
def _cumsum(node, ctx):
    excl = ctx.attr_int("exclusive", 0)
    rev = ctx.attr_int("reverse", 0)

    def f(x, axis):
        a = norm_axis(int(np.asarray(axis).reshape(-1)[0]), x.ndim)
        y = np.flip(x, a) if rev else x
        c = np.cumsum(y, axis=a, dtype=x.dtype)
        if excl:
            c = np.concatenate([np.zeros_like(np.take(c, [0], axis=a)), np.take(c, np.arange(c.shape[a] - 1),
                                                                                axis=a)], axis=a)
        return np.flip(c, a) if rev else c
    return f


@register("TopK")
def _topk(node, ctx):
    axis = ctx.attr_int("axis", -1)
    largest = ctx.attr_int("largest", 1)
    if ctx.opset < 10:
        raise Fallback("TopK-1")

    def f(x, k):
        kk = int(np.asarray(k).reshape(-1)[0])
        a = norm_axis(axis, x.ndim)
        key = -x if largest else x
        idx = np.argsort(key, axis=a, kind="stable")
        idx = np.take(idx, np.arange(kk), axis=a)
        return np.take_along_axis(x, idx, axis=a), idx.astype(np.int64)
    return f
