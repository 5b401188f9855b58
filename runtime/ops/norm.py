"""Normalizations: LayerNormalization, BatchNormalization (inference), InstanceNormalization,
SimplifiedLayerNormalization / SkipLayerNormalization are left to custom ops."""
from __future__ import annotations

import numpy as np

from ._common import Fallback, norm_axis, register


@register("LayerNormalization")
def _layernorm(node, ctx):
    axis = ctx.attr_int("axis", -1)
    eps = ctx.attr_float("epsilon", 1e-5)
    n_out = ctx.n_outputs
    scale_c = ctx.const(1)
    bias_c = ctx.const(2) if ctx.has_input(2) else None

    def f(x, scale, bias=None):
        a = norm_axis(axis, x.ndim)
        axes = tuple(range(a, x.ndim))
        mean = np.mean(x, axis=axes, keepdims=True)
        d = np.subtract(x, mean)
        var = np.mean(np.square(d), axis=axes, keepdims=True)
        var += x.dtype.type(eps)
        inv = np.sqrt(var)
        np.reciprocal(inv, out=inv)
        d *= inv
        d *= scale_c if scale_c is not None else scale
        b = bias_c if bias_c is not None else bias
        if b is not None:
            d += b
        if n_out == 1:
            return d
        return (d, mean, inv)[:n_out]
    return f


@register("BatchNormalization")
def _batchnorm(node, ctx):
    if ctx.n_outputs > 1 or ctx.attr_int("training_mode", 0):
        raise Fallback("BatchNormalization training mode")
    eps = ctx.attr_float("epsilon", 1e-5)
    cs = [ctx.const(i) for i in range(1, 5)]
    pre = None
    if all(c is not None for c in cs):
        scale, b, mean, var = cs
        mul = (scale / np.sqrt(var + eps)).astype(scale.dtype)
        add = (b - mean * mul).astype(scale.dtype)
        pre = (mul, add)

    def f(x, scale, b, mean, var):
        if pre is not None:
            mul, add = pre
        else:
            mul = scale / np.sqrt(var + eps)
            add = b - mean * mul
        shp = (1, -1) + (1,) * (x.ndim - 2)
        y = x * mul.reshape(shp)
        y += add.reshape(shp)
        return y.astype(x.dtype, copy=False)
    return f


@register("InstanceNormalization")
def _instnorm(node, ctx):
    eps = ctx.attr_float("epsilon", 1e-5)

    def f(x, scale, b):
        axes = tuple(range(2, x.ndim))
        mean = x.mean(axis=axes, keepdims=True)
        var = x.var(axis=axes, keepdims=True)
        shp = (1, -1) + (1,) * (x.ndim - 2)
        y = (x - mean) / np.sqrt(var + eps) * scale.reshape(shp) + b.reshape(shp)
        return y.astype(x.dtype, copy=False)
    return f
