"""Activation-aware grouped asymmetric quantizer (NumPy) producing .ndc v1 quantized payloads.

For a weight matrix W [R, K] (row = output channel, K = input features), each row is cut along K
into groups of G columns; every group gets a float16 ``scale`` and ``min`` and b-bit codes
(see :mod:`nadoo.runtime.qcodec` for the byte layout and the exact decode formula).

Quality: the parameters of each group are chosen to minimise the *importance-weighted* error
``sum_k imp_k (w_k - w^_k)^2`` where ``imp_k`` = mean x_k^2 of the layer's input channel k from
calibration (a diagonal model of the output error ``E||(W - W^) x||^2``). Per group:

1. a clipping search: a grid of shrink factors pulls [min, max] toward the group's weighted mean
   (1.0 = plain min/max round-to-nearest, always a candidate), each evaluated with the float16
   scale/min actually stored;
2. for every candidate, one weighted least-squares fit of (scale, min) given its codes,
   re-rounded to float16 and re-evaluated;
3. a few alternating refinements (codes <- params, params <- weighted LS) of the winner.
A candidate only replaces the incumbent when its weighted error is strictly lower, so the result
is never worse (in weighted error, per group) than plain min/max round-to-nearest.

Robustness: the shrink-1.0 candidate rounds ``min`` toward -inf and ``scale`` toward +inf in
float16, so it covers the whole group and |w - w^| <= scale/2 for every element. Constant groups
decode exactly (or within float16 rounding of the value); scale 0 is allowed (all codes 0).
Weights must be finite with |w| <= 65504 (float16 range), otherwise :class:`CompileError`.
Importance must be finite and >= 0; a floor of ``IMP_FLOOR`` x its mean is added so channels not
excited by the calibration data are still quantized sensibly.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from nadoo.runtime import qcodec
from nadoo.runtime.errors import CompileError

__all__ = ["quantize", "quantize_payload", "shrink_grid", "F16_MAX", "IMP_FLOOR"]

F16_MAX = 65504.0
IMP_FLOOR = 0.01          # relative floor added to the importance vector (fraction of its mean)
_BLOCK_ELEMS = 1 << 17    # weights per vectorised block (cache-friendly working set)
_F16_NEG_INF = np.float16(-np.inf)
_F16_POS_INF = np.float16(np.inf)


def shrink_grid(bits: int) -> np.ndarray:
    """Default clipping-search shrink factors per tier (first entry 1.0 = no clipping)."""
    if bits == 8:
        return np.array([1.0, 0.97, 0.94, 0.9], np.float32)
    if bits == 4:
        return np.linspace(1.0, 0.7, 11, dtype=np.float32)
    return np.linspace(1.0, 0.5, 21, dtype=np.float32)


def _f16_down(x: np.ndarray) -> np.ndarray:
    """Largest float16 <= x (x finite, |x| <= 65504), returned as float32."""
    h = x.astype(np.float16)
    with np.errstate(over="ignore"):
        h = np.where(h.astype(np.float32) > x, np.nextafter(h, _F16_NEG_INF), h)
    return h.astype(np.float32)


def _f16_up(x: np.ndarray) -> np.ndarray:
    """Smallest float16 >= x, clamped to 65504, returned as float32."""
    h = x.astype(np.float16)
    with np.errstate(over="ignore"):
        h = np.where(h.astype(np.float32) < x, np.nextafter(h, _F16_POS_INF), h)
    return np.minimum(h.astype(np.float32), np.float32(F16_MAX))


def _f16_near(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(np.float16).astype(np.float32)


class _Block:
    """Vectorised per-group evaluation for a block W [n, ng, G] with importance A [1, ng, G]."""

    def __init__(self, W: np.ndarray, A: np.ndarray, qmax: int):
        self.W = W
        self.A = A
        self.qmax = np.float32(qmax)
        self.Sa = A.sum(-1)                      # [1, ng]
        self.Saw = (W * A).sum(-1)               # [n, ng]
        self.t = np.empty_like(W)                # scratch
        self.q = np.empty_like(W)

    def codes(self, s, m, out):
        """out <- clip(rint((W - m) / s), 0, qmax) as float32 (s may be 0 -> all codes 0)."""
        with np.errstate(divide="ignore"):
            inv = np.where(s > 0, np.float32(1.0) / np.where(s > 0, s, 1), 0).astype(np.float32)
        np.subtract(self.W, m[..., None], out=out)
        out *= inv[..., None]
        np.rint(out, out=out)
        np.clip(out, 0, self.qmax, out=out)
        return out

    def err(self, s, m, q):
        """Weighted squared error per group of decoding codes q with (s, m)."""
        t = self.t
        np.multiply(q, s[..., None], out=t)
        t += m[..., None]
        t -= self.W
        np.square(t, out=t)
        t *= self.A
        return t.sum(-1)

    def lsq(self, q):
        """Weighted least-squares (scale, min) given codes q; invalid fits return NaN scale."""
        t = self.t
        np.multiply(q, self.A, out=t)            # a*q
        Saq = t.sum(-1).astype(np.float64)
        Saqw = np.einsum("ijk,ijk->ij", t, self.W).astype(np.float64)
        Saqq = np.einsum("ijk,ijk->ij", t, q).astype(np.float64)
        Sa = self.Sa.astype(np.float64)
        Saw = self.Saw.astype(np.float64)
        det = Sa * Saqq - Saq * Saq
        ok = det > 1e-12 * Sa * Saqq
        with np.errstate(divide="ignore", invalid="ignore"):
            s = (Sa * Saqw - Saq * Saw) / det
            m = (Saw - s * Saq) / Sa
        ok &= np.isfinite(s) & np.isfinite(m) & (s > 0)
        s = np.where(ok, s, np.nan)
        return s, m

    def try_params(self, s, m, best):
        """Evaluate float16-representable (s, m) (float32 arrays; NaN s = skip); update best."""
        bs, bm, be = best
        valid = np.isfinite(s) & np.isfinite(m) & (s >= 0) & (np.abs(m) <= F16_MAX)
        # decoded extremes must stay finite/representable-ish: m + qmax*s within float32 easily
        s = np.where(valid, s, 0).astype(np.float32)
        m = np.where(valid, m, 0).astype(np.float32)
        q = self.codes(s, m, self.q)
        e = self.err(s, m, q)
        better = valid & (e < be)
        return np.where(better, s, bs), np.where(better, m, bm), np.where(better, e, be)


def _quantize_block(W, A, qmax, shrinks, lsq_each, refine_iters):
    """Search the parameters of every group of W [n, ng, G]; returns (codes f32, scales, mins)."""
    blk = _Block(W, A, qmax)
    lo = W.min(-1)
    hi = W.max(-1)
    mu = np.clip(blk.Saw / blk.Sa, lo, hi).astype(np.float32) if shrinks.size > 1 else lo
    best = (np.zeros_like(lo), np.zeros_like(lo), np.full(lo.shape, np.inf, np.float32))
    for f in shrinks:
        lo_f = mu + (lo - mu) * f if f != 1 else lo
        hi_f = mu + (hi - mu) * f if f != 1 else hi
        m = _f16_down(lo_f)
        s = _f16_up(np.maximum(hi_f - m, 0) / np.float32(qmax))
        best = blk.try_params(s, m, best)
        if lsq_each:
            s2, m2 = blk.lsq(blk.q)   # blk.q holds this candidate's codes
            best = blk.try_params(_f16_near(s2), _f16_near(m2), best)
    for _ in range(refine_iters):
        bs, bm, _ = best
        q = blk.codes(bs, bm, blk.q)
        s2, m2 = blk.lsq(q)
        best = blk.try_params(_f16_near(s2), _f16_near(m2), best)
    bs, bm, _ = best
    return blk.codes(bs, bm, blk.q), bs, bm


def _prepare(w, bits, group_size, importance):
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise CompileError(f"quantize: expected a non-empty 2-D weight matrix, got shape {w.shape}")
    if bits not in qcodec.SUPPORTED_BITS:
        raise CompileError(f"quantize: bits must be one of {qcodec.SUPPORTED_BITS}, got {bits!r}")
    if not isinstance(group_size, (int, np.integer)) or isinstance(group_size, bool) or group_size <= 0:
        raise CompileError(f"quantize: group_size must be a positive integer, got {group_size!r}")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        raise CompileError("quantize: weight matrix contains NaN or inf")
    amax = float(np.abs(w).max())
    if amax > F16_MAX:
        raise CompileError(
            f"quantize: |w| up to {amax:.6g} exceeds the float16 range ({F16_MAX:g}) of scales/mins")
    R, K = w.shape
    if importance is None:
        imp = np.ones(K, np.float32)
    else:
        imp = np.asarray(importance, dtype=np.float64).reshape(-1)
        if imp.shape != (K,):
            raise CompileError(f"quantize: importance must have shape ({K},), got {np.shape(importance)}")
        if not np.isfinite(imp).all() or (imp < 0).any():
            raise CompileError("quantize: importance must be finite and >= 0")
        mean = imp.mean()
        if mean <= 0:
            imp = np.ones(K)
        else:
            imp = imp / mean + IMP_FLOOR        # normalised: mean ~ 1 (scale-free)
        imp = imp.astype(np.float32)
    return w, int(group_size), imp


def quantize(w: np.ndarray, bits: int, group_size: int, importance: np.ndarray | None = None,
             *, method: str = "search", grid: np.ndarray | None = None, refine_iters: int = 2,
             lsq_each: bool = True, threads: int = 1):
    """Quantize w float32 [R, K] -> (codes uint8 [R, K], scales float16 [R, ng], mins float16 [R, ng]).

    ``group_size`` is the effective group size (the caller passes K when K < the compile option).
    ``importance`` float32 [K] = mean x^2 of the input channels (None = uniform).
    ``threads`` > 1 quantizes row blocks in parallel threads (results are identical).
    ``method="rtn"`` gives plain min/max round-to-nearest (the shrink-1.0 candidate only).
    """
    w, G, imp = _prepare(w, bits, group_size, importance)
    R, K = w.shape
    ng = -(-K // G)
    k_pad = ng * G
    qmax = (1 << bits) - 1
    if method not in ("search", "rtn"):
        raise CompileError(f"quantize: unknown method {method!r}")
    shrinks = np.asarray([1.0] if method == "rtn" else (shrink_grid(bits) if grid is None else grid),
                         np.float32)
    if method == "rtn":
        refine_iters, lsq_each = 0, False

    if k_pad != K:   # pad with a real value of the last group (keeps min/max) and zero importance
        wp = np.empty((R, k_pad), np.float32)
        wp[:, :K] = w
        wp[:, K:] = w[:, K - 1:K]
        ip = np.zeros(k_pad, np.float32)
        ip[:K] = imp
    else:
        wp, ip = w, imp
    W3 = wp.reshape(R, ng, G)
    A3 = ip.reshape(1, ng, G)

    codes = np.empty((R, k_pad), np.uint8)
    scales = np.empty((R, ng), np.float16)
    mins = np.empty((R, ng), np.float16)
    rows_per = max(1, _BLOCK_ELEMS // k_pad)

    def work(r0):
        r1 = min(R, r0 + rows_per)
        q, bs, bm = _quantize_block(W3[r0:r1], A3, qmax, shrinks, lsq_each, refine_iters)
        codes[r0:r1] = q.reshape(r1 - r0, k_pad)
        scales[r0:r1] = bs.astype(np.float16)
        mins[r0:r1] = bm.astype(np.float16)

    starts = range(0, R, rows_per)
    if threads > 1 and len(starts) > 1:
        # NumPy releases the GIL inside its loops; blocks are independent and write disjoint rows
        with ThreadPoolExecutor(max_workers=threads) as ex:
            list(ex.map(work, starts))
    else:
        for r0 in starts:
            work(r0)
    return np.ascontiguousarray(codes[:, :K]), scales, mins


def quantize_payload(w: np.ndarray, bits: int, group_size: int, importance: np.ndarray | None = None,
                     **kw) -> tuple[bytes, dict]:
    """Quantize and pack. Returns (payload bytes, errors) where errors, computed from the DECODED
    payload (what the runtime will see), are::

        mse      mean (w - w^)^2
        out_err  sum_k imp_k sum_r (w - w^)^2_rk / sum_k imp_k sum_r w^2_rk   (raw importance,
                 uniform if None): relative output-error energy under a diagonal input model
        max_abs  max |w - w^|
    """
    codes, scales, mins = quantize(w, bits, group_size, importance, **kw)
    payload = qcodec.pack(codes, scales, mins, bits, group_size)
    w = np.asarray(w, dtype=np.float32)
    R, K = w.shape
    wh = qcodec.dequantize(payload, R, K, group_size, bits)
    d = (w - wh).astype(np.float64)
    d2 = np.einsum("rk,rk->k", d, d)
    w2 = np.einsum("rk,rk->k", w.astype(np.float64), w.astype(np.float64))
    imp = np.ones(K) if importance is None else np.asarray(importance, np.float64).reshape(-1)
    den = float(imp @ w2)
    num = float(imp @ d2)
    out_err = num / den if den > 0 else (0.0 if num == 0 else float("inf"))
    return payload, {"mse": float(d2.sum() / d.size), "out_err": out_err,
                     "max_abs": float(np.abs(d).max())}
