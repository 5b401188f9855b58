"""Conv (im2col via sliding_window_view + one batched matmul, any groups/strides/pads/dilations, 1-3 spatial
dims) and pooling (MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool, LpPool is left to the fallback)."""
from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ._common import Fallback, register


def _pads_for(auto_pad, in_sp, kernel, strides, dilations, pads):
    nd = len(in_sp)
    if auto_pad in ("", "NOTSET"):
        return list(pads) if pads else [0] * (2 * nd)
    if auto_pad == "VALID":
        return [0] * (2 * nd)
    begin, end = [], []
    for i in range(nd):
        out = -(-in_sp[i] // strides[i])
        eff_k = (kernel[i] - 1) * dilations[i] + 1
        total = max(0, (out - 1) * strides[i] + eff_k - in_sp[i])
        small, big = total // 2, total - total // 2
        if auto_pad == "SAME_UPPER":
            begin.append(small)
            end.append(big)
        else:
            begin.append(big)
            end.append(small)
    return begin + end


def _windows(xp, kernel, strides, dilations):
    """xp: (N, C, *sp) padded -> view (N, C, *out_sp, *kernel)."""
    nd = len(kernel)
    eff = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations))
    axes = tuple(range(2, 2 + nd))
    w = sliding_window_view(xp, eff, axis=axes)
    idx = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + \
        tuple(slice(None, None, d) for d in dilations)
    return w[idx]


@register("Conv")
def _conv(node, ctx):
    w_const = ctx.const(1)
    group = ctx.attr_int("group", 1)
    auto_pad = ctx.attr_str("auto_pad", "NOTSET")
    b_const = ctx.const(2) if ctx.has_input(2) else None
    attr_kernel = ctx.attr_ints("kernel_shape", None)
    attr_strides = ctx.attr_ints("strides", None)
    attr_dil = ctx.attr_ints("dilations", None)
    attr_pads = ctx.attr_ints("pads", None)

    cache = {}

    def prep_w(w):
        key = id(w)
        if w_const is not None and key in cache:
            return cache[key]
        m, cg = w.shape[0], w.shape[1]
        wg = np.ascontiguousarray(w.reshape(group, m // group, cg * int(np.prod(w.shape[2:]))))
        if w_const is not None:
            cache[key] = wg
        return wg

    if w_const is not None:
        prep_w(w_const)

    def f(x, w, b=None):
        nd = x.ndim - 2
        kernel = list(attr_kernel) if attr_kernel else list(w.shape[2:])
        strides = list(attr_strides) if attr_strides else [1] * nd
        dil = list(attr_dil) if attr_dil else [1] * nd
        pads = _pads_for(auto_pad, x.shape[2:], kernel, strides, dil, attr_pads)
        n, c = x.shape[:2]
        m = w.shape[0]
        cg = c // group
        if group == 1 and not any(pads) and all(k == 1 for k in kernel):  # pointwise: one matmul, no windows
            xs = x[(slice(None), slice(None)) + tuple(slice(None, None, st) for st in strides)]
            y = np.matmul(prep_w(w)[0], xs.reshape(n, c, -1)).reshape((n, m) + xs.shape[2:])
        else:
            if any(pads):
                x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
            win = _windows(x, kernel, strides, dil)          # (N, C, *out, *k)
            out_sp = win.shape[2:2 + nd]
            if group == c == m:  # depthwise: one multiply-add per kernel tap beats C tiny matmuls
                wd = w.reshape(c, -1)
                y = np.zeros((n, c) + tuple(out_sp), np.result_type(x, w))
                for t, idx in enumerate(np.ndindex(*kernel)):
                    y += win[(Ellipsis,) + idx] * wd[:, t].reshape((1, c) + (1,) * nd)
            else:
                p = int(np.prod(out_sp))
                k = cg * int(np.prod(kernel))
                # -> (N, G, Cg, *k, *out) -> (N, G, K, P)
                win = win.reshape((n, group, cg) + tuple(out_sp) + tuple(kernel))
                perm = (0, 1, 2) + tuple(range(3 + nd, 3 + 2 * nd)) + tuple(range(3, 3 + nd))
                cols = np.ascontiguousarray(win.transpose(perm)).reshape(n, group, k, p)
                y = np.matmul(prep_w(w), cols).reshape((n, m) + tuple(out_sp))  # (G, Mg, K) @ (N, G, K, P)
        if b is not None:
            y += (b_const if b_const is not None else b).reshape((1, m) + (1,) * nd)
        return y
    return f


def _pool_params(ctx, x):
    nd = x.ndim - 2
    kernel = ctx.attr_ints("kernel_shape")
    strides = ctx.attr_ints("strides", None) or [1] * nd
    dil = ctx.attr_ints("dilations", None) or [1] * nd
    pads = _pads_for(ctx.attr_str("auto_pad", "NOTSET"), x.shape[2:], kernel, strides, dil,
                     ctx.attr_ints("pads", None))
    ceil = ctx.attr_int("ceil_mode", 0)
    extra = [0] * nd
    if ceil:
        for i in range(nd):
            eff = (kernel[i] - 1) * dil[i] + 1
            span = x.shape[2 + i] + pads[i] + pads[i + nd] - eff
            out_c = math.ceil(span / strides[i]) + 1
            # the last window must start inside the (left-padded) input
            if (out_c - 1) * strides[i] >= x.shape[2 + i] + pads[i]:
                out_c -= 1
            need = (out_c - 1) * strides[i] + eff - (x.shape[2 + i] + pads[i] + pads[i + nd])
            extra[i] = max(0, need)
            if out_c == 1 and dil[i] == 1 and need > 0:
                # one window reaching past the input (EfficientNet pools a 1x1 map with a 320x320 kernel):
                # the overhang is neither summed nor counted, so the window is the padded input itself
                kernel[i] -= need
                extra[i] = 0
    return nd, kernel, strides, dil, pads, extra


@register("MaxPool")
def _maxpool(node, ctx):
    if ctx.n_outputs > 1:
        raise Fallback("MaxPool with Indices output")
    if ctx.attr_int("storage_order", 0):
        raise Fallback("MaxPool storage_order")

    def f(x):
        nd, kernel, strides, dil, pads, extra = _pool_params(ctx, x)
        if any(pads) or any(extra):
            fill = -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
            x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd] + extra[i]) for i in range(nd)],
                       constant_values=fill)
        win = _windows(x, kernel, strides, dil)
        return win.max(axis=tuple(range(-nd, 0)))
    return f


@register("AveragePool")
def _avgpool(node, ctx):
    include_pad = ctx.attr_int("count_include_pad", 0)

    def f(x):
        nd, kernel, strides, dil, pads, extra = _pool_params(ctx, x)
        axes = tuple(range(-nd, 0))
        if not any(pads) and not any(extra):
            return _windows(x, kernel, strides, dil).mean(axis=axes, dtype=x.dtype)
        padw = [(0, 0), (0, 0)] + [(pads[i], pads[i + nd] + extra[i]) for i in range(nd)]
        xp = np.pad(x, padw)
        s = _windows(xp, kernel, strides, dil).sum(axis=axes)
        ones = np.zeros((1, 1) + x.shape[2:], dtype=x.dtype)
        ones[...] = 1
        if include_pad:
            # padding counts, the ceil-mode overhang does not
            mask = np.pad(ones, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)],
                          constant_values=1)
            mask = np.pad(mask, [(0, 0), (0, 0)] + [(0, extra[i]) for i in range(nd)])
        else:
            mask = np.pad(ones, padw)
        cnt = _windows(mask, kernel, strides, dil).sum(axis=axes)
        return (s / cnt).astype(x.dtype, copy=False)
    return f


@register("GlobalAveragePool")
def _gap(node, ctx):
    return lambda x: x.mean(axis=tuple(range(2, x.ndim)), keepdims=True, dtype=x.dtype)


@register("GlobalMaxPool")
def _gmp(node, ctx):
    return lambda x: x.max(axis=tuple(range(2, x.ndim)), keepdims=True)
