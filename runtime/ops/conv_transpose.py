"""ConvTranspose (1-3 spatial dims, groups, strides, dilations, pads, output_padding, output_shape,
auto_pad): one matmul per group gives every input position's contribution to a kernel-sized patch,
then one strided add per kernel offset scatters the patches into the output (col2im)."""
from __future__ import annotations

import itertools

import numpy as np

from ._common import register


def _pads(auto_pad, in_sp, kernel, strides, dil, out_pad, pads, out_shape):
    """(begin pads, end pads) per spatial axis, ONNX rules: output_shape or SAME_* fix the total."""
    nd = len(in_sp)
    full = [strides[i] * (in_sp[i] - 1) + out_pad[i] + (kernel[i] - 1) * dil[i] + 1 for i in range(nd)]
    if out_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        want = list(out_shape)[-nd:] if out_shape is not None else [in_sp[i] * strides[i] for i in range(nd)]
        total = [full[i] - want[i] for i in range(nd)]
        if any(t < 0 for t in total):
            raise ValueError(f"ConvTranspose output_shape {want} is larger than the full output {full}")
        if auto_pad == "SAME_UPPER":
            return [t // 2 for t in total], [t - t // 2 for t in total], full
        return [t - t // 2 for t in total], [t // 2 for t in total], full
    if auto_pad == "VALID" or not pads:
        return [0] * nd, [0] * nd, full
    return list(pads[:nd]), list(pads[nd:]), full


@register("ConvTranspose")
def _conv_transpose(node, ctx):
    group = int(ctx.attr("group", 1))
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    attr_kernel = ctx.attr("kernel_shape", None)
    attr_strides = ctx.attr("strides", None)
    attr_dil = ctx.attr("dilations", None)
    attr_pads = ctx.attr("pads", None)
    attr_out_pad = ctx.attr("output_padding", None)
    out_shape = ctx.attr("output_shape", None)

    def f(x, w, b=None):
        nd = x.ndim - 2
        n, c = x.shape[:2]
        kernel = list(attr_kernel) if attr_kernel else list(w.shape[2:])
        if kernel != list(w.shape[2:]):
            raise ValueError(f"kernel_shape {kernel} does not match the weight's {list(w.shape[2:])}")
        strides = list(attr_strides) if attr_strides else [1] * nd
        dil = list(attr_dil) if attr_dil else [1] * nd
        out_pad = list(attr_out_pad) if attr_out_pad else [0] * nd
        begin, end, full = _pads(auto_pad, x.shape[2:], kernel, strides, dil, out_pad, attr_pads, out_shape)
        mg = w.shape[1]
        cg = c // group
        kk = int(np.prod(kernel))
        in_sp = x.shape[2:]
        p = int(np.prod(in_sp))
        # patches[n, g, (m, k...), p] = Σ_c w[g·cg + c, m, k...] · x[n, g·cg + c, p]
        wg = w.reshape(group, cg, mg * kk).transpose(0, 2, 1)            # (G, Mg·kk, Cg)
        xg = x.reshape(n, group, cg, p)
        patches = np.matmul(wg, xg).reshape((n, group * mg) + tuple(kernel) + tuple(in_sp))
        y = np.zeros((n, group * mg) + tuple(full), x.dtype)
        for ks in itertools.product(*[range(k) for k in kernel]):
            dst = tuple(slice(ks[i] * dil[i], ks[i] * dil[i] + strides[i] * (in_sp[i] - 1) + 1, strides[i])
                        for i in range(nd))
            y[(slice(None), slice(None)) + dst] += patches[(slice(None), slice(None)) + ks]
        y = y[(slice(None), slice(None)) + tuple(slice(begin[i], full[i] - end[i]) for i in range(nd))]
        if b is not None:
            y = y + b.reshape((1, -1) + (1,) * nd)
        return np.ascontiguousarray(y)
    return f
