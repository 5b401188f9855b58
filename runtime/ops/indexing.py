"""Indexing operators: Gather, GatherElements, GatherND, ScatterND, ScatterElements, NonZero, OneHot."""
from __future__ import annotations

import numpy as np

from ._common import Fallback, norm_axis, register

_I64 = np.int64


@register("Gather")
def _gather(node, ctx):
    axis = ctx.attr_int("axis", 0)
    ic = ctx.const(1)
    if ic is not None and ic.ndim == 0:
        iv = int(ic)
        pre = (slice(None),) * axis if axis >= 0 else None

        def fs(x, i):
            p = pre if pre is not None else (slice(None),) * norm_axis(axis, x.ndim)
            return x[p + (iv, Ellipsis)]
        return fs
    return lambda x, i: np.take(x, i, axis=axis)


@register("GatherElements")
def _gather_elements(node, ctx):
    axis = ctx.attr_int("axis", 0)

    def f(x, idx):
        a = norm_axis(axis, x.ndim)
        if idx.size and idx.min() < 0:
            idx = np.where(idx < 0, idx + x.shape[a], idx)
        return np.take_along_axis(x, idx, axis=a)
    return f


def _gather_nd(x, idx, b):
    idx = np.asarray(idx)
    batch_shape = x.shape[:b]
    m = idx.shape[-1]
    if idx.size and idx.min() < 0:
        dims = np.array(x.shape[b:b + m], dtype=idx.dtype)
        idx = np.where(idx < 0, idx + dims, idx)
    if b == 0:
        return x[tuple(np.moveaxis(idx, -1, 0))]
    nb = int(np.prod(batch_shape)) if batch_shape else 1
    xb = x.reshape((nb,) + x.shape[b:])
    ib = idx.reshape((nb,) + idx.shape[b:])
    out = [xb[k][tuple(np.moveaxis(ib[k], -1, 0))] for k in range(nb)]
    res = np.stack(out) if out else np.empty((0,), dtype=x.dtype)
    return res.reshape(idx.shape[:-1] + x.shape[b + m:])


@register("GatherND")
def _gathernd(node, ctx):
    b = ctx.attr_int("batch_dims", 0)
    return lambda x, idx: _gather_nd(x, idx, b)


@register("ScatterND")
def _scatternd(node, ctx):
    red = ctx.attr_str("reduction", "none")

    def f(x, idx, upd):
        out = x.copy()
        m = idx.shape[-1]
        key = tuple(np.moveaxis(idx, -1, 0))
        if red == "none":
            out[key] = upd
        elif red == "add":
            np.add.at(out, key, upd)
        elif red == "mul":
            np.multiply.at(out, key, upd)
        elif red == "max":
            np.maximum.at(out, key, upd)
        elif red == "min":
            np.minimum.at(out, key, upd)
        else:
            raise Fallback(red)
        del m
        return out
    if red not in ("none", "add", "mul", "max", "min"):
        raise Fallback(f"ScatterND reduction {red}")
    return f


@register("ScatterElements")
def _scatterel(node, ctx):
    axis = ctx.attr_int("axis", 0)
    red = ctx.attr_str("reduction", "none")
    if red != "none":
        raise Fallback("ScatterElements reduction")

    def f(x, idx, upd):
        a = norm_axis(axis, x.ndim)
        idx = np.where(idx < 0, idx + x.shape[a], idx)
        out = x.copy()
        np.put_along_axis(out, idx, upd, axis=a)
        return out
    return f


@register("NonZero")
def _nonzero(node, ctx):
    return lambda x: np.array(np.nonzero(x), dtype=_I64).reshape(x.ndim, -1)


@register("OneHot")
def _onehot(node, ctx):
    axis = ctx.attr_int("axis", -1)

    def f(idx, depth, values):
        d = int(np.asarray(depth).reshape(-1)[0])
        idx = np.asarray(idx).astype(np.int64)
        idx = np.where(idx < 0, idx + d, idx)
        r = idx.ndim + 1
        a = norm_axis(axis, r)
        hot = np.expand_dims(idx, a) == np.arange(d).reshape([-1 if i == a else 1 for i in range(r)])
        return np.where(hot, values[1], values[0]).astype(values.dtype)
    return f
