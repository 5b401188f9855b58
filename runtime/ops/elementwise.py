"""Element-wise operators (unary, binary with ONNX/NumPy broadcasting, variadic, Where, Cast, activations)."""
from __future__ import annotations

import numpy as np

from ._common import Fallback, register

# ------------------------------------------------------------------ erf (NumPy has none)
# Rational approximation used by Eigen/XLA for float32 erf (clamped to [-4, 4]); |error| ~ 1e-7.
_ERF_A = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_B = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def erf(x: np.ndarray) -> np.ndarray:
    """Vectorized erf. float32 (and float16, via float32) use a rational approximation; float64 is exact."""
    x = np.asarray(x)
    if x.dtype == np.float64:
        return _erf64(x)
    out_dt = x.dtype if x.dtype.kind == "f" else np.dtype(np.float32)
    xc = np.clip(x, -4.0, 4.0, dtype=np.float32) if x.dtype != np.float32 else np.clip(x, -4.0, 4.0)
    x2 = xc * xc
    p = np.full_like(x2, _ERF_A[0])
    for c in _ERF_A[1:]:
        p *= x2
        p += c
    p *= xc
    q = np.full_like(x2, _ERF_B[0])
    for c in _ERF_B[1:]:
        q *= x2
        q += c
    p /= q
    return p if p.dtype == out_dt else p.astype(out_dt)


def _erf64(x):
    # Abramowitz-Stegun 7.1.26 is only 1.5e-7; for float64 use math.erf element-wise (rare path).
    import math
    return np.vectorize(math.erf, otypes=[np.float64])(x)


_SQRT1_2 = 0.7071067811865476


def gelu(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    if approximate == "tanh":
        c = np.sqrt(2.0 / np.pi).astype(x.dtype) if x.dtype.kind == "f" else np.sqrt(2.0 / np.pi)
        t = x * x
        t *= 0.044715
        t += 1.0
        t *= x
        t *= c
        np.tanh(t, out=t)
        t += 1.0
        t *= x
        t *= 0.5
        return t
    y = erf(x * x.dtype.type(_SQRT1_2))
    y += 1.0
    y *= x
    y *= 0.5
    return y


# ------------------------------------------------------------------ unary
def _unary(fn):
    def builder(node, ctx):
        return fn
    return builder


def _relu(x):
    return np.maximum(x, 0, dtype=x.dtype) if x.dtype.kind == "f" else np.maximum(x, 0).astype(x.dtype)


def _sigmoid(x):
    y = np.negative(x)
    np.exp(y, out=y)
    y += 1.0
    np.reciprocal(y, out=y)
    return y


def _softplus(x):
    return np.logaddexp(x, 0).astype(x.dtype, copy=False)


def _softsign(x):
    return x / (1 + np.abs(x))


def _round(x):
    return np.round(x)  # NumPy rounds half to even, like ONNX


def _not(x):
    return np.logical_not(x)


_UNARY = {
    "Relu": _relu, "Sigmoid": _sigmoid, "Tanh": np.tanh, "Exp": np.exp, "Log": np.log, "Sqrt": np.sqrt,
    "Neg": np.negative, "Abs": np.abs, "Reciprocal": np.reciprocal, "Floor": np.floor, "Ceil": np.ceil,
    "Not": _not, "Sign": np.sign, "Sin": np.sin, "Cos": np.cos, "Tan": np.tan, "Asin": np.arcsin,
    "Acos": np.arccos, "Atan": np.arctan, "Sinh": np.sinh, "Cosh": np.cosh, "Asinh": np.arcsinh,
    "Acosh": np.arccosh, "Atanh": np.arctanh, "Erf": erf, "Softplus": _softplus, "Softsign": _softsign,
    "Round": _round, "IsNaN": np.isnan, "BitwiseNot": np.invert,
}
for _name, _fn in _UNARY.items():
    register(_name)(_unary(_fn))


@register("Identity")
def _identity(node, ctx):
    return lambda x: x


@register("Dropout")
def _dropout(node, ctx):
    n_out = ctx.n_outputs

    if n_out == 1:
        return lambda x, *rest: x
    return lambda x, *rest: (x, np.ones(x.shape, dtype=bool))


@register("IsInf")
def _isinf(node, ctx):
    pos = ctx.attr_int("detect_positive", 1)
    neg = ctx.attr_int("detect_negative", 1)

    def f(x):
        if pos and neg:
            return np.isinf(x)
        if pos:
            return np.isposinf(x)
        if neg:
            return np.isneginf(x)
        return np.zeros(x.shape, dtype=bool)
    return f


@register("Gelu")
def _gelu(node, ctx):
    approx = ctx.attr_str("approximate", "none")
    return lambda x: gelu(x, approx)


@register("LeakyRelu")
def _leaky(node, ctx):
    alpha = ctx.attr_float("alpha", 0.01)

    def f(x):
        return np.where(x >= 0, x, x * x.dtype.type(alpha))
    return f


@register("Elu")
def _elu(node, ctx):
    alpha = ctx.attr_float("alpha", 1.0)
    return lambda x: np.where(x > 0, x, (np.exp(np.minimum(x, 0)) - 1) * x.dtype.type(alpha))


@register("Selu")
def _selu(node, ctx):
    alpha = ctx.attr_float("alpha", 1.67326319217681884765625)
    gamma = ctx.attr_float("gamma", 1.05070102214813232421875)
    return lambda x: (np.where(x > 0, x, (np.exp(np.minimum(x, 0)) - 1) * alpha) * gamma).astype(x.dtype)


@register("HardSigmoid")
def _hsig(node, ctx):
    alpha = ctx.attr_float("alpha", 0.2)
    beta = ctx.attr_float("beta", 0.5)
    return lambda x: np.clip(x * x.dtype.type(alpha) + x.dtype.type(beta), 0, 1).astype(x.dtype, copy=False)


@register("HardSwish")
def _hswish(node, ctx):
    return lambda x: x * np.clip(x * x.dtype.type(1 / 6) + x.dtype.type(0.5), 0, 1).astype(x.dtype, copy=False)


@register("Clip")
def _clip(node, ctx):
    if ctx.opset < 11:
        lo, hi = ctx.attr_float("min", None), ctx.attr_float("max", None)

        def f6(x):
            return np.clip(x, lo, hi).astype(x.dtype, copy=False)
        return f6

    def f(x, lo=None, hi=None):
        if lo is None and hi is None:
            return x
        y = np.clip(x, lo, hi) if (lo is not None and hi is not None) else (
            np.maximum(x, lo) if lo is not None else np.minimum(x, hi))
        return y.astype(x.dtype, copy=False)
    return f


# ------------------------------------------------------------------ binary
def _int_div(a, b):
    # ONNX integer Div truncates toward zero (C semantics).
    q = np.floor_divide(a, b)
    fix = (np.remainder(a, b) != 0) & ((a < 0) != (b < 0))
    return np.where(fix, q + 1, q).astype(q.dtype, copy=False)


def _div(a, b):
    if a.dtype.kind in "iu":
        return _int_div(a, b)
    return np.divide(a, b)


def _pow_builder(node, ctx):
    e = ctx.const(1)
    if e is not None and e.size == 1:
        ev = float(e.reshape(-1)[0])
        if ev == 2.0:
            return lambda a, b: np.square(a) if a.dtype.kind == "f" else (a * a)
        if ev == 1.0:
            return lambda a, b: a
        if ev == 0.5:
            return lambda a, b: np.sqrt(a) if a.dtype.kind == "f" else np.power(a, b).astype(a.dtype)
        if ev == 3.0:
            return lambda a, b: a * a * a

    def f(a, b):
        if a.dtype.kind == "f" and b.dtype != a.dtype:
            b = b.astype(a.dtype)
        return np.power(a, b).astype(a.dtype, copy=False)
    return f


register("Pow")(_pow_builder)


_BINARY = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": _div,
    "Equal": np.equal, "Less": np.less, "Greater": np.greater, "LessOrEqual": np.less_equal,
    "GreaterOrEqual": np.greater_equal, "And": np.logical_and, "Or": np.logical_or, "Xor": np.logical_xor,
    "BitwiseAnd": np.bitwise_and, "BitwiseOr": np.bitwise_or, "BitwiseXor": np.bitwise_xor,
    "PRelu": lambda x, s: np.where(x >= 0, x, x * s).astype(x.dtype, copy=False),
}


def _binary(fn):
    def builder(node, ctx):
        return fn
    return builder


for _name, _fn in _BINARY.items():
    register(_name)(_binary(_fn))


@register("Mod")
def _mod(node, ctx):
    fmod = ctx.attr_int("fmod", 0)
    if fmod:
        return lambda a, b: np.fmod(a, b)
    return lambda a, b: np.mod(a, b)


@register("BitShift")
def _bitshift(node, ctx):
    d = ctx.attr_str("direction", "LEFT")
    return (lambda a, b: np.left_shift(a, b)) if d == "LEFT" else (lambda a, b: np.right_shift(a, b))


def _variadic(np_fn, mean=False):
    def builder(node, ctx):
        def f(*xs):
            r = xs[0]
            for x in xs[1:]:
                r = np_fn(r, x)
            if mean:
                r = (r / len(xs)).astype(xs[0].dtype, copy=False)
            return r
        return f
    return builder


register("Max")(_variadic(np.maximum))
register("Min")(_variadic(np.minimum))
register("Sum")(_variadic(np.add))
register("Mean")(_variadic(np.add, mean=True))


@register("Where")
def _where(node, ctx):
    return lambda c, a, b: np.where(c, a, b)


# ------------------------------------------------------------------ Cast
_ONNX_TO_NP = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
               9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


def onnx_dtype_to_np(t: int):
    try:
        return np.dtype(_ONNX_TO_NP[int(t)])
    except KeyError:
        raise Fallback(f"ONNX element type {t}") from None


@register("Cast")
def _cast(node, ctx):
    to = onnx_dtype_to_np(ctx.attr_int("to"))

    def f(x):
        if x.dtype == to:
            return x
        if to == np.bool_:
            return x != 0
        if x.dtype.kind == "f" and to.kind in "iu":
            with np.errstate(invalid="ignore"):
                return np.trunc(x).astype(to)
        return x.astype(to)
    return f


@register("CastLike")
def _castlike(node, ctx):
    def f(x, like):
        return x if x.dtype == like.dtype else x.astype(like.dtype)
    return f
