"""RMSNormalization (ONNX opset 23): y = x / sqrt(mean(x², over axes axis..rank-1) + epsilon) · scale.

The decoder-LM kernels (runtime/lm_kernels.py rms_norm) use `rms_normalize` too, so a compiled
graph and the NumPy reference decoder round identically."""
from __future__ import annotations

import numpy as np

from ._common import Fallback, norm_axis, register


def rms_normalize(x: np.ndarray, scale: np.ndarray, eps: float, axis: int = -1) -> np.ndarray:
    """In float32, in the reference implementations' order: mean of squares, + eps, divide by its root."""
    x = x.astype(np.float32, copy=False)
    axes = tuple(range(norm_axis(axis, x.ndim), x.ndim))
    ms = np.mean(np.square(x), axis=axes, keepdims=True)
    ms += np.float32(eps)
    y = x / np.sqrt(ms)
    return y * scale


@register("RMSNormalization")
def _rmsnorm(node, ctx):
    axis = int(ctx.attr("axis", -1))
    eps = float(ctx.attr("epsilon", 1e-5))
    if int(ctx.attr("stash_type", 1)) != 1 or ctx.n_outputs != 1:
        raise Fallback("RMSNormalization with a non-float32 stash type")
    scale_c = ctx.const(1)

    def f(x, scale):
        return rms_normalize(x, scale_c if scale_c is not None else scale, eps, axis)
    return f
