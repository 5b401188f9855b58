"""Resize (opset 10-19), modes nearest and linear (bilinear, trilinear: separable, one
axis at a time), every coordinate transformation but tf_crop_and_resize. Cubic, antialiasing and
keep_aspect_ratio_policy other than stretch are left to the onnx.reference fallback."""
from __future__ import annotations

import numpy as np

from ._common import Fallback, as_int_list, register

_TRANSFORMS = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "half_pixel_symmetric")


def _source_coords(mode: str, n_out: int, n_in: int, scale: float) -> np.ndarray:
    """Input coordinate of every output index along one axis (ONNX coordinate_transformation_mode)."""
    x = np.arange(n_out, dtype=np.float64)
    if mode == "asymmetric":
        return x / scale
    if mode == "align_corners":
        return x * (n_in - 1) / (n_out - 1) if n_out > 1 else np.zeros(n_out)
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if n_out > 1 else np.zeros(n_out)
    if mode == "half_pixel_symmetric":
        adjustment = n_out / (scale * n_in)
        return n_in / 2 * (1 - adjustment) + (x + 0.5) / scale - 0.5
    return (x + 0.5) / scale - 0.5  # half_pixel


def _nearest(src: np.ndarray, rounding: str, n_in: int) -> np.ndarray:
    if rounding == "floor":
        idx = np.floor(src)
    elif rounding == "ceil":
        idx = np.ceil(src)
    elif rounding == "round_prefer_ceil":
        idx = np.floor(src + 0.5)
    else:  # round_prefer_floor
        idx = np.ceil(src - 0.5)
    return np.clip(idx, 0, n_in - 1).astype(np.int64)


def _resize_axis(x, axis, n_out, scale, mode, transform, rounding):
    n_in = x.shape[axis]
    src = _source_coords(transform, n_out, n_in, scale)
    if mode == "nearest":
        return np.take(x, _nearest(src, rounding, n_in), axis=axis)
    src = np.clip(src, 0, n_in - 1)  # linear: the edge value beyond the border
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    shape = [1] * x.ndim
    shape[axis] = n_out
    w = (src - i0).astype(x.dtype).reshape(shape)
    a = np.take(x, i0, axis=axis)
    return a + (np.take(x, i1, axis=axis) - a) * w


@register("Resize")
def _resize(node, ctx):
    mode = ctx.attr("mode", "nearest")
    if isinstance(mode, bytes):
        mode = mode.decode()
    transform = ctx.attr("coordinate_transformation_mode", "half_pixel" if ctx.opset >= 11 else "asymmetric")
    rounding = ctx.attr("nearest_mode", "round_prefer_floor")
    if mode not in ("nearest", "linear", "bilinear", "trilinear") or transform not in _TRANSFORMS:
        raise Fallback(f"Resize mode {mode!r} / {transform!r}")
    if int(ctx.attr("antialias", 0)) or ctx.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise Fallback("Resize antialias / keep_aspect_ratio_policy")
    if rounding not in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"):
        raise Fallback(f"Resize nearest_mode {rounding!r}")
    mode = "nearest" if mode == "nearest" else "linear"
    axes_attr = ctx.attr("axes", None)
    # inputs: opset 10 (X, scales); opset 11+ (X, roi, scales, sizes)
    scales_at, sizes_at = (1, None) if ctx.opset < 11 else (2, 3)

    def f(x, *rest):
        args = (x,) + rest
        scales = args[scales_at] if len(args) > scales_at else None
        sizes = args[sizes_at] if sizes_at is not None and len(args) > sizes_at else None
        axes = list(range(x.ndim)) if axes_attr is None else [a % x.ndim for a in axes_attr]
        if sizes is not None and np.size(sizes):
            out = as_int_list(sizes)
            sc = [o / x.shape[a] for o, a in zip(out, axes)]
        elif scales is not None and np.size(scales):
            sc = [float(s) for s in np.asarray(scales).reshape(-1)]
            out = [int(np.floor(x.shape[a] * s)) for a, s in zip(axes, sc)]
        else:
            raise ValueError("Resize needs scales or sizes")
        if len(out) != len(axes):
            raise ValueError(f"Resize got {len(out)} sizes/scales for {len(axes)} axes")
        y = x
        for a, n, s in zip(axes, out, sc):
            if n != x.shape[a] or s != 1:
                y = _resize_axis(y, a, n, s, mode, transform, rounding)
        return np.ascontiguousarray(y, dtype=x.dtype)
    return f
