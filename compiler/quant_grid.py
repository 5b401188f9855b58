"""The quantization grid and its search, shared by plain and GPTQ quantization: float16 rounding of the
stored parameters, codes <-> values for both codecs, the per-group clipping search with weighted
least-squares refits (`_quantize_block`), and the [R, K] -> groups preparation. compiler/quantize.py
describes the method; this module is its arithmetic.
"""
from __future__ import annotations

import numpy as np

from nadoo.runtime import qcodec
from nadoo.runtime.errors import CompileError
from nadoo.runtime.tiers import CODECS, TIER_BITS

F16_MAX = 65504.0
GPTQ_DAMP = 0.1           # GPTQ dampening: this fraction of mean diag(H) is added to H's diagonal
                          # (0.1 beat 0.01 on held-out MiniLM sentences: H from a few hundred tokens
                          # is near-singular for K = 1536, and weak dampening overfits the calibration set)
IMP_FLOOR = 0.01          # relative floor added to the importance vector (fraction of its mean)
_BLOCK_ELEMS = 1 << 17    # weights per vectorised block (cache-friendly working set)
_F16_NEG_INF = np.float16(-np.inf)
_F16_POS_INF = np.float16(np.inf)


def shrink_grid(bits: int) -> np.ndarray:
    """Default clipping-search shrink factors per tier (first entry 1.0 = no clipping)."""
    if bits == 8:
        return np.array([1.0, 0.97, 0.94, 0.9], np.float32)
    if bits in (6, 5):
        return np.linspace(1.0, 0.8, 9, dtype=np.float32)
    if bits == 4:
        return np.linspace(1.0, 0.7, 11, dtype=np.float32)
    return np.linspace(1.0, 0.5, 21, dtype=np.float32)


GRID_SAMPLE = 64  # groups of a block tested for lying on a source grid


def source_grids(W: np.ndarray, qmax: int) -> list[int]:
    """The divisors n for which most of the groups of W [n_rows, ng, G] lie on a symmetric grid
    k·absmax/n (integer k): weights that were quantized before, as a GGUF file's Q8_0 (n = 127) and
    Q4_0/Q5_0 (n = 8, 16) blocks are. A tier with at least the source's bits can take such a group
    exactly (scale absmax/n, zero point in the middle of its codes), where the min/max search would
    re-round it onto a shifted grid and add a second quantization error on top of the file's. Only the
    divisors a zp grid of qmax + 1 codes holds are tested (n <= (qmax + 1) / 2); float weights match
    none, and the test costs one pass over GRID_SAMPLE groups per divisor."""
    half = (int(qmax) + 1) // 2
    cands = sorted({n for k in range(2, half.bit_length() + 1) for n in (1 << (k - 1), (1 << (k - 1)) - 1)
                    if 2 < n <= half}, reverse=True)
    sample = W.reshape(-1, W.shape[-1])[:GRID_SAMPLE]
    amax = np.abs(sample).max(-1)
    live = amax > 0
    if not live.any():
        return []
    out = []
    for n in cands:
        s = _f16_near(amax / np.float32(n))
        with np.errstate(divide="ignore", invalid="ignore"):  # s = 0 (an all-zero group): inf, never on a grid
            r = sample / s[:, None]
            on = (np.abs(r - np.rint(r)) <= 1e-3).all(-1) & live & (s > 0)
        if on.sum() >= 0.5 * live.sum():
            out.append(n)
    return out


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


def _to_codes(x, p, inv, qmax, zp: bool):
    """Codes of values x on the grid (scale 1/inv, parameter p: zero point if zp, else min)."""
    q = x * inv + p if zp else (x - p) * inv
    return np.clip(np.rint(q), 0, qmax)


def _to_values(q, s, p, zp: bool):
    """What codes q decode to: s·(q − z) (zp) or s·q + min, in the reader's float32 order."""
    return (q - p) * s if zp else q * s + p


def _inverse(s):
    with np.errstate(divide="ignore"):
        return np.where(s > 0, np.float32(1.0) / np.where(s > 0, s, 1), 0).astype(np.float32)


def _layout(bits: int, codec: str):
    """The tier layout that packs and decodes `bits`-bit payloads of `codec`."""
    if codec not in CODECS:
        raise CompileError(f"quantize: unknown codec {codec!r} (one of {', '.join(CODECS)})")
    if bits not in qcodec.SUPPORTED_BITS:
        raise CompileError(f"quantize: bits must be one of {qcodec.SUPPORTED_BITS}, got {bits!r}")
    tier = next(t for t, b in TIER_BITS.items() if b == bits)
    if tier not in CODECS[codec]:
        raise CompileError(f"quantize: the {codec} codec has no {bits}-bit tier")
    return CODECS[codec][tier]


def _stored(s, p, zp: bool):
    """The searched float32 parameters as stored: float16 scales and float16 mins or uint8 zero points."""
    return s.astype(np.float16), (p.astype(np.uint8) if zp else p.astype(np.float16))


class _Block:
    """Vectorised per-group evaluation for a block W [n, ng, G] with importance A [1, ng, G]."""

    def __init__(self, W: np.ndarray, A: np.ndarray, qmax: int, zp: bool = False):
        self.W = W
        self.A = A
        self.zp = zp  # parameters (s, z) of the integer-zero-point grid, else (s, min)
        self.qmax = np.float32(qmax)
        self.Sa = A.sum(-1)                      # [1, ng]
        self.Saw = (W * A).sum(-1)               # [n, ng]
        self.t = np.empty_like(W)                # scratch
        self.q = np.empty_like(W)

    def codes(self, s, m, out):
        """out <- clip(rint((W - m) / s), 0, qmax) (zp: rint(W / s + z)) as float32 (s may be 0 -> all
        codes 0, zp: z)."""
        inv = _inverse(s)
        if self.zp:
            np.multiply(self.W, inv[..., None], out=out)
            out += m[..., None]
        else:
            np.subtract(self.W, m[..., None], out=out)
            out *= inv[..., None]
        np.rint(out, out=out)
        np.clip(out, 0, self.qmax, out=out)
        return out

    def err(self, s, m, q):
        """Weighted squared error per group of decoding codes q with (s, m)."""
        t = self.t
        if self.zp:
            np.subtract(q, m[..., None], out=t)
            t *= s[..., None]
        else:
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
        if self.zp:  # the integer zero point nearest the fit, then the scale refit for it
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.clip(np.rint(-m / s), 0, float(self.qmax))
                d = q.astype(np.float64) - z[..., None]
                ad = d * self.A
                s = np.einsum("ijk,ijk->ij", ad, self.W) / np.einsum("ijk,ijk->ij", ad, d)
            s = np.where(ok & np.isfinite(s) & (s > 0), s, np.nan)
            return s, np.where(np.isfinite(z), z, 0)
        return s, m

    def try_params(self, s, m, best):
        """Evaluate float16-representable (s, m) (float32 arrays; NaN s = skip); update best."""
        bs, bm, be = best
        valid = np.isfinite(s) & np.isfinite(m) & (s >= 0) & (s <= F16_MAX) & (np.abs(m) <= F16_MAX)
        # decoded extremes must stay finite/representable-ish: m + qmax*s within float32 easily
        s = np.where(valid, s, 0).astype(np.float32)
        m = np.where(valid, m, 0).astype(np.float32)
        q = self.codes(s, m, self.q)
        e = self.err(s, m, q)
        better = valid & (e < be)
        return np.where(better, s, bs), np.where(better, m, bm), np.where(better, e, be)


def _quantize_block(W, A, qmax, shrinks, lsq_each, refine_iters, zp=False):
    """Search the parameters of every group of W [n, ng, G]; returns (codes f32, scales, mins or zero
    points) as float32."""
    blk = _Block(W, A, qmax, zp)
    lo = W.min(-1)
    hi = W.max(-1)
    mu = np.clip(blk.Saw / blk.Sa, lo, hi).astype(np.float32) if shrinks.size > 1 else lo
    best = (np.zeros_like(lo), np.zeros_like(lo), np.full(lo.shape, np.inf, np.float32))
    for f in shrinks:
        lo_f = mu + (lo - mu) * f if f != 1 else lo
        hi_f = mu + (hi - mu) * f if f != 1 else hi
        if zp:  # zero is on the grid: widen to include it, z = the code of 0
            lo_f, hi_f = np.minimum(lo_f, 0), np.maximum(hi_f, 0)
            s = _f16_up((hi_f - lo_f) / np.float32(qmax))
            z = -lo_f * _inverse(s)
            # round to nearest: the nearest integer zero point; the search: the integers on both sides
            for m in ((np.rint(z),) if shrinks.size == 1 else (np.floor(z), np.ceil(z))):
                best = blk.try_params(s, np.clip(m, 0, qmax).astype(np.float32), best)
            if lsq_each:
                blk.codes(best[0], best[1], blk.q)
        else:
            m = _f16_down(lo_f)
            s = _f16_up(np.maximum(hi_f - m, 0) / np.float32(qmax))
            best = blk.try_params(s, m, best)
        if lsq_each:
            s2, m2 = blk.lsq(blk.q)   # blk.q holds this candidate's codes (zp: the best so far)
            best = blk.try_params(_f16_near(s2), m2 if zp else _f16_near(m2), best)
    if zp:  # a source's own grid, where the block lies on one (source_grids): exact, so error 0 wins
        amax = np.maximum(np.abs(lo), np.abs(hi))
        neg = -lo >= hi  # the extreme is negative: the grid needs its extra level below zero
        for n in source_grids(W, qmax):
            s = _f16_near(amax / np.float32(n))
            half = np.float32((int(qmax) + 1) // 2)
            best = blk.try_params(s, np.where(neg, half, half - 1).astype(np.float32), best)
            best = blk.try_params(s, np.full_like(s, half), best)
    for _ in range(refine_iters):
        bs, bm, _ = best
        q = blk.codes(bs, bm, blk.q)
        s2, m2 = blk.lsq(q)
        best = blk.try_params(_f16_near(s2), m2 if zp else _f16_near(m2), best)
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
        # [K]: every row reads the same inputs; [R, K]: rows read different inputs (grouped conv)
        imp = np.asarray(importance, dtype=np.float64)
        if imp.shape not in ((K,), (R, K)):
            raise CompileError(f"quantize: importance must have shape ({K},) or ({R}, {K}), got {np.shape(importance)}")
        if not np.isfinite(imp).all() or (imp < 0).any():
            raise CompileError("quantize: importance must be finite and >= 0")
        mean = imp.mean(-1, keepdims=True)
        # normalised per row: mean ~ 1 (scale-free); a row whose inputs were never excited is uniform
        imp = np.where(mean > 0, imp / np.where(mean > 0, mean, 1) + IMP_FLOOR, 1.0).astype(np.float32)
    return w, int(group_size), imp
