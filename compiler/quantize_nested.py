"""The nested tier layout's quantizer (NDC 1.1 §4.2b): one 8-bit quantization stored as bit-planes whose
high bits are a 4-bit quantization of their own (GPTQ'd when the layer has calibration inputs), so one
payload serves 8 and 4 bits and a b-bit read reads b bits per weight. Built on compiler/quantize.py.
"""
from __future__ import annotations

import numpy as np

from nadoo.runtime.errors import CompileError
from nadoo.runtime.tiers import NESTED

from .quantize import _errors_of, _f16_near, _rows, gptq_factor, quantize, quantize_rows_gptq

__all__ = ["quantize_nested"]


def _nested_from_q4(w, codes4, s4, m4, G, U=None):
    """8-bit codes whose high nibble is the given 4-bit quantization: with s8 = s4/16 and
    m8 = m4 - 7.5·s8 the nested 4-bit decode s8·(16·q4 + 7.5) + m8 equals s4·q4 + m4 (up to float16
    rounding of m8), and the low nibble refines each weight inside its 4-bit bin, clamped to the bin
    so the truncation stays exactly q4. GPTQ moves 4-bit codes away from the weights' own bins, so
    with ``U`` (the GPTQ factor of the layer input) the refinement is itself GPTQ with per-weight
    box constraints: each column's clamping error is fed forward to the columns not yet coded."""
    R, K = w.shape
    s8 = (s4.astype(np.float32) / 16).astype(np.float16)
    m8 = _f16_near(m4.astype(np.float32) - np.float32(7.5) * s8.astype(np.float32)).astype(np.float16)
    s = np.repeat(s8.astype(np.float32), G, axis=1)[:, :K]
    m = np.repeat(m8.astype(np.float32), G, axis=1)[:, :K]
    with np.errstate(divide="ignore"):
        inv = np.where(s > 0, np.float32(1) / np.where(s > 0, s, 1), 0).astype(np.float32)
    lo = codes4.astype(np.float32) * 16
    hi = lo + 15
    q8 = np.clip(np.rint((w - m) * inv), lo, hi) if U is None else _box_gptq(w, s, m, lo, U)
    return q8.astype(np.uint8), s8, m8


def _box_gptq(w, s, m, lo, U):
    """GPTQ over the columns of w [R, K] with fixed per-weight grids (s, m [R, K]) and codes boxed to
    [lo, lo + 15]: each column's error (rounding + clamping) is fed forward through U."""
    R, K = w.shape
    with np.errstate(divide="ignore"):
        inv = np.where(s > 0, np.float32(1) / np.where(s > 0, s, 1), 0).astype(np.float32)
    W = np.array(w, np.float32, copy=True)
    q8 = np.empty((R, K), np.uint8)
    B = 128
    for b0 in range(0, K, B):
        b1 = min(K, b0 + B)
        err = np.empty((R, b1 - b0), np.float32)
        for i in range(b0, b1):
            q = np.clip(np.rint((W[:, i] - m[:, i]) * inv[:, i]), lo[:, i], lo[:, i] + 15)
            q8[:, i] = q.astype(np.uint8)
            e = (W[:, i] - (q * s[:, i] + m[:, i])) / U[i, i]
            err[:, i - b0] = e
            if i + 1 < b1:
                W[:, i + 1:b1] -= np.outer(e, U[i, i + 1:b1])
        if b1 < K:
            W[:, b1:] -= err @ U[b0:b1, b1:]
    return q8


def quantize_nested(w: np.ndarray, bounds, group_size: int, importance: np.ndarray | None = None, *,
                    base: str = "q4", **kw) -> list[tuple[list[bytes], dict]]:
    """Nested tiers (NDC 1.1): one 8-bit quantization whose top 4 bits are the 4-bit codes.
    ``base="q4"`` (default): the 4-bit tier is quantized as usual (GPTQ / search, ``kw`` as
    :func:`quantize_chunks`) and the 8-bit codes refine it (:func:`_nested_from_q4`);
    ``base="q8"``: a plain 8-bit quantization, truncated. Returns per chunk ([plane A, B, C],
    {tier: errors as :func:`quantize_payload`}) for the tiers NESTED serves (q8, q4), from the decoded planes."""
    w = np.ascontiguousarray(w, np.float32)
    down_h = kw.pop("down_hessian", None)
    G = group_size
    kw["codec"] = "minmax"  # the planes store the scale+min grid
    if base == "q8":
        kw = {k: v for k, v in kw.items() if k not in ("hessian", "gptq_u", "act_order")}
        q8, s8, m8 = quantize(w, 8, G, importance, **kw)
    elif base == "q4":
        if down_h is not None:   # transposed weight: rows are the input units, so GPTQ runs on w.T
            c4, s4, m4 = quantize_rows_gptq(w, 4, G, down_h, method=kw.get("method", "search"), codec="minmax")
            _, s8, m8 = _nested_from_q4(w, c4, s4, m4, G)  # the grid only
            K = w.shape[1]
            s = np.ascontiguousarray(np.repeat(s8.astype(np.float32), G, axis=1)[:, :K].T)
            m = np.ascontiguousarray(np.repeat(m8.astype(np.float32), G, axis=1)[:, :K].T)
            lo = np.ascontiguousarray(c4.T.astype(np.float32) * 16)
            q8 = np.ascontiguousarray(_box_gptq(np.ascontiguousarray(w.T), s, m, lo, gptq_factor(down_h)).T)
        else:
            c4, s4, m4 = quantize(w, 4, G, importance, **kw)
            U = kw.get("gptq_u")
            if U is None and kw.get("hessian") is not None:
                U = gptq_factor(kw["hessian"])
            q8, s8, m8 = _nested_from_q4(w, c4, s4, m4, G, U)
    else:
        raise CompileError(f"quantize: unknown nested base {base!r} (q4 or q8)")
    out = []
    for lo, hi in zip(bounds, bounds[1:]):
        planes = NESTED.pack(q8[lo:hi], s8[lo:hi], m8[lo:hi], G)
        errs = {}
        for tier in NESTED.serves:
            wh = NESTED.decode(tier, planes, hi - lo, w.shape[1], G)
            errs[tier] = _errors_of(w[lo:hi], wh, _rows(importance, lo, hi))
        out.append((planes, errs))
    return out
