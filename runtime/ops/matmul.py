"""MatMul and Gemm (one BLAS call per node where possible; constant weights pre-laid-out at build time)."""
from __future__ import annotations

import numpy as np

from ._common import register


def _matmul_const_b(w: np.ndarray):
    """x @ W for a constant 2-D W: fold the leading dims of x into one GEMM."""
    w = np.ascontiguousarray(w)
    n = w.shape[1]

    def f(a, b):
        if a.ndim <= 2:
            return np.matmul(a, w)
        lead = a.shape[:-1]
        return np.matmul(a.reshape(-1, a.shape[-1]), w).reshape(lead + (n,))
    return f


@register("MatMul")
def _matmul(node, ctx):
    w = ctx.const(1)
    if w is not None and w.ndim == 2:
        return _matmul_const_b(w)
    return np.matmul


@register("Gemm")
def _gemm(node, ctx):
    alpha = ctx.attr_float("alpha", 1.0)
    beta = ctx.attr_float("beta", 1.0)
    ta = ctx.attr_int("transA", 0)
    tb = ctx.attr_int("transB", 0)
    b_const = ctx.const(1)
    c_const = ctx.const(2) if ctx.has_input(2) else None

    if b_const is not None:
        bw = b_const.T if tb else b_const
        if alpha != 1.0:
            bw = bw * bw.dtype.type(alpha)
        bw = np.ascontiguousarray(bw)
        cc = None
        if c_const is not None:
            cc = c_const * c_const.dtype.type(beta) if beta != 1.0 else c_const
            cc = np.ascontiguousarray(cc)

        def f(a, b, c=None):
            if ta:
                a = a.T
            y = np.matmul(a, bw)
            if cc is not None:
                y += cc
            elif c is not None and beta != 0.0:
                y += c * beta if beta != 1.0 else c
            return y
        return f

    def g(a, b, c=None):
        if ta:
            a = a.T
        if tb:
            b = b.T
        y = np.matmul(a, b)
        if alpha != 1.0:
            y *= alpha
        if c is not None and beta != 0.0:
            y += c * beta if beta != 1.0 else c
        return y
    return g
