"""Activation-aware grouped asymmetric quantizer (NumPy) producing .ndc quantized payloads.

For a weight matrix W [R, K] (row = output channel, K = input features), each row is cut along K
into groups of G columns; every group gets a float16 ``scale``, a second parameter p and b-bit codes
(see :mod:`nadoo.runtime.qcodec` for the byte layouts and the exact decode formulas). The grid is the
codec's (``codec=``):
- ``"zp"`` (NDC 1.2, the default): p = an integer zero point z in [0, 2^b - 1], w^ = s·(q − z), the
  grid of ONNX Runtime's MatMulNBits (zero is always on it);
- ``"minmax"``: p = a float16 min, w^ = s·q + min (the legacy codec, also the nested bit-planes').
Every candidate is evaluated with the parameters exactly as stored (float16 scale, integer z), so the
decode reproduces what the quantizer assumed.

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
float16 (zp: the range widened to include 0, ``scale`` rounded up, z = round(−lo/scale)), so it covers
the whole group and |w - w^| <= scale/2 for every element. Constant groups
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
from nadoo.runtime.tiers import CODECS, DEFAULT_CODEC, NESTED, TIER_BITS

__all__ = ["quantize", "quantize_payload", "quantize_chunks", "gptq_factor", "shrink_grid", "F16_MAX",
           "IMP_FLOOR", "GPTQ_DAMP", "quantize_nested"]

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


_FACTORS: dict = {}  # id(H) -> (H, damp, U): each tier of a weight reuses its factor (O(K³) to make)


def gptq_factor(hessian: np.ndarray, damp: float = GPTQ_DAMP) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp·mean(diag H)·I)^-1 (float32 [K, K]); U^T U = H^-1.

    Input channels never excited in calibration (diag 0) get diag 1, so H is invertible; the
    dampening is raised tenfold (up to 3 times) if the factorisation still fails. Memoised on the
    array's identity (the entry keeps H alive, so the id cannot be reused), for the last few H."""
    hit = _FACTORS.get(id(hessian))
    if hit is not None and hit[0] is hessian and hit[1] == damp:
        return hit[2]
    U = _gptq_factor(hessian, damp)
    if len(_FACTORS) >= 4:
        _FACTORS.pop(next(iter(_FACTORS)))
    _FACTORS[id(hessian)] = (hessian, damp, U)
    return U


def _gptq_factor(hessian: np.ndarray, damp: float) -> np.ndarray:
    H = np.array(hessian, dtype=np.float64)
    K = H.shape[0]
    if H.shape != (K, K) or not np.isfinite(H).all():
        raise CompileError(f"quantize: hessian must be a finite square matrix, got shape {H.shape}")
    d = np.diag(H).copy()
    dead = d <= 0
    H[dead, :] = 0
    H[:, dead] = 0
    H[np.flatnonzero(dead), np.flatnonzero(dead)] = 1.0
    mean = float(np.mean(np.diag(H)))
    for attempt in range(4):
        Hd = H + (damp * 10 ** attempt) * mean * np.eye(K)
        try:
            L = np.linalg.cholesky(Hd)
            Linv = np.linalg.solve(L, np.eye(K))          # H^-1 = Linv^T Linv
            Hinv = Linv.T @ Linv
            return np.ascontiguousarray(np.linalg.cholesky(Hinv).T, np.float32)
        except np.linalg.LinAlgError:
            continue
    raise CompileError("quantize: the input second-moment matrix is not positive definite")


def _gptq(w, bits, G, imp, U, shrinks, lsq_each, refine_iters, perm=None, zp=False):
    """GPTQ (Frantar et al. 2022) with the layout's groups: columns in order (or in ``perm`` order,
    act-order, with U the factor of the permuted H), each group's (scale, min) chosen by the
    clipping search on the *error-updated* weights when the group's first column comes up, each
    column's rounding error propagated to the later columns through U (upper Cholesky of H^-1),
    lazily in blocks of 128 columns. Vectorised over rows: all rows share H."""
    R, K = w.shape
    qmax = np.float32((1 << bits) - 1)
    ng = -(-K // G)
    perm = np.arange(K) if perm is None else np.asarray(perm)
    pinv = np.argsort(perm)
    W = np.array(w[:, perm], dtype=np.float32, copy=True)     # permuted working copy
    qp = np.empty((R, K), np.uint8)
    S = np.zeros((R, ng), np.float32)
    M = np.zeros((R, ng), np.float32)
    INV = np.zeros((R, ng), np.float32)
    done = np.zeros(ng, bool)
    gid = perm // G                                             # group of each permuted column
    B = 128 if perm is not None else G * max(1, 128 // G)
    for b0 in range(0, K, B):
        b1 = min(K, b0 + B)
        err = np.empty((R, b1 - b0), np.float32)
        for i in range(b0, b1):
            g = gid[i]
            if not done[g]:
                # the group's columns as they stand now: in-block ones are current, later ones still
                # owe this block's pending update
                cols = pinv[g * G:min(K, (g + 1) * G)]
                cur = W[:, cols]
                late = cols >= b1
                if late.any() and i > b0:
                    cur[:, late] -= err[:, :i - b0] @ U[b0:i][:, cols[late]]
                W3 = np.ascontiguousarray(cur).reshape(R, 1, len(cols))
                _, bs, bm = _quantize_block(W3, imp[..., perm[cols]].reshape(-1, 1, len(cols)), qmax, shrinks,
                                            lsq_each, refine_iters, zp)
                S[:, g], M[:, g] = bs[:, 0], bm[:, 0]
                INV[:, g] = _inverse(bs[:, 0])
                done[g] = True
            s, m, inv = S[:, g], M[:, g], INV[:, g]
            col = W[:, i]
            q = _to_codes(col, m, inv, qmax, zp)
            qp[:, i] = q.astype(np.uint8)
            e = (col - _to_values(q, s, m, zp)) / U[i, i]
            err[:, i - b0] = e
            if i + 1 < b1:
                W[:, i + 1:b1] -= np.outer(e, U[i, i + 1:b1])
        if b1 < K:
            W[:, b1:] -= err @ U[b0:b1, b1:]
    return (np.ascontiguousarray(qp[:, pinv]), *_stored(S, M, zp))


def quantize_rows_gptq(wt: np.ndarray, bits: int, group_size: int, hessian: np.ndarray, *,
                       method: str = "search", block: int = 32, damp: float = GPTQ_DAMP, codec: str = DEFAULT_CODEC):
    """GPTQ for a weight stored *transposed*, wt [N, O] (row n = input unit n's weights to all O
    outputs, groups along O): the FFN down-projection in neuron-group layout. Rows (= input
    columns of the real weight) are processed in order; H [N, N] is the second moment of the
    input. The group parameters of a block of ``block`` rows are searched (uniform importance)
    when the block starts, on the rows as updated so far; each row's error is fed forward through
    the Cholesky factor of H^-1. Returns (codes uint8 [N, O], scales, mins or zero points) in the payload
    layout of `codec`."""
    zp = _layout(bits, codec).codec == "zp"
    wt, G, _ = _prepare(wt, bits, group_size, None)
    N, O = wt.shape
    U = gptq_factor(hessian, damp)
    if U.shape != (N, N):
        raise CompileError(f"quantize: hessian must be [{N}, {N}], got {U.shape}")
    qmax = np.float32((1 << bits) - 1)
    ng = -(-O // G)
    o_pad = ng * G
    shrinks = np.asarray([1.0] if method == "rtn" else shrink_grid(bits), np.float32)
    lsq, refine = (False, 0) if method == "rtn" else (True, 2)
    W = np.zeros((N, o_pad), np.float32)
    W[:, :O] = wt
    W[:, O:] = wt[:, O - 1:O]
    A = np.zeros((1, ng, G), np.float32)
    A.reshape(-1)[:O] = 1
    codes = np.empty((N, o_pad), np.uint8)
    S = np.empty((N, ng), np.float32)
    M = np.empty((N, ng), np.float32)
    for b0 in range(0, N, block):
        b1 = min(N, b0 + block)
        _, bs, bm = _quantize_block(np.ascontiguousarray(W[b0:b1]).reshape(b1 - b0, ng, G), A, qmax, shrinks,
                                    lsq, refine, zp)
        S[b0:b1], M[b0:b1] = bs, bm
        s = np.repeat(bs, G, axis=1)
        m = np.repeat(bm, G, axis=1)
        inv = _inverse(s)
        err = np.empty((b1 - b0, o_pad), np.float32)
        for i in range(b0, b1):
            j = i - b0
            q = _to_codes(W[i], m[j], inv[j], qmax, zp)
            codes[i] = q.astype(np.uint8)
            e = (W[i] - _to_values(q, s[j], m[j], zp)) / U[i, i]
            e[O:] = 0
            err[j] = e
            if i + 1 < b1:
                W[i + 1:b1] -= np.outer(U[i, i + 1:b1], e)
        if b1 < N:
            W[b1:] -= U[b0:b1, b1:].T @ err
    return (np.ascontiguousarray(codes[:, :O]), *_stored(S, M, zp))


def quantize(w: np.ndarray, bits: int, group_size: int, importance: np.ndarray | None = None,
             *, method: str = "search", grid: np.ndarray | None = None, refine_iters: int = 2,
             lsq_each: bool = True, threads: int = 1, hessian: np.ndarray | None = None,
             gptq_u: np.ndarray | None = None, act_order: bool = False, codec: str = DEFAULT_CODEC):
    """Quantize w float32 [R, K] -> (codes uint8 [R, K], scales float16 [R, ng], p [R, ng]) on the grid of
    `codec`: p = zero points uint8 ("zp") or mins float16 ("minmax").

    ``group_size`` is the effective group size (the caller passes K when K < the compile option).
    ``importance`` float32 [K] = mean x^2 of the input channels (None = uniform), or [R, K] when rows
    read different inputs (a grouped conv: each output channel its own group's input channels).
    ``threads`` > 1 quantizes row blocks in parallel threads (results are identical).
    ``method="rtn"`` gives plain min/max round-to-nearest (the shrink-1.0 candidate only).
    ``hessian`` [K, K] = mean x^T x of the layer input (or ``gptq_u`` = :func:`gptq_factor` of it,
    precomputed): GPTQ error feedback, group parameters by ``method`` on the updated weights.
    """
    zp = _layout(bits, codec).codec == "zp"
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
    if hessian is not None or gptq_u is not None:
        perm = None
        if act_order:
            if hessian is None:
                raise CompileError("quantize: act_order needs the hessian")
            perm = np.argsort(-np.diag(hessian), kind="stable")
            U = gptq_factor(np.asarray(hessian)[np.ix_(perm, perm)])
        else:
            U = gptq_u if gptq_u is not None else gptq_factor(hessian)
        if U.shape != (K, K):
            raise CompileError(f"quantize: hessian must be [{K}, {K}], got {U.shape}")
        return _gptq(w, bits, G, imp, U, shrinks, lsq_each, refine_iters, perm, zp)

    if k_pad != K:   # pad with a real value of the last group (keeps min/max) and zero importance
        wp = np.empty((R, k_pad), np.float32)
        wp[:, :K] = w
        wp[:, K:] = w[:, K - 1:K]
        ip = np.zeros(imp.shape[:-1] + (k_pad,), np.float32)
        ip[..., :K] = imp
    else:
        wp, ip = w, imp
    W3 = wp.reshape(R, ng, G)
    A3 = ip.reshape(-1, ng, G)  # [1 | R, ng, G]

    codes = np.empty((R, k_pad), np.uint8)
    S = np.empty((R, ng), np.float32)
    M = np.empty((R, ng), np.float32)
    rows_per = max(1, _BLOCK_ELEMS // k_pad)

    def work(r0):
        r1 = min(R, r0 + rows_per)
        q, bs, bm = _quantize_block(W3[r0:r1], A3 if len(A3) == 1 else A3[r0:r1], qmax, shrinks, lsq_each,
                                    refine_iters, zp)
        codes[r0:r1] = q.reshape(r1 - r0, k_pad)
        S[r0:r1], M[r0:r1] = bs, bm

    starts = range(0, R, rows_per)
    if threads > 1 and len(starts) > 1:
        # NumPy releases the GIL inside its loops; blocks are independent and write disjoint rows
        with ThreadPoolExecutor(max_workers=threads) as ex:
            list(ex.map(work, starts))
    else:
        for r0 in starts:
            work(r0)
    return (np.ascontiguousarray(codes[:, :K]), *_stored(S, M, zp))


def quantize_payload(w: np.ndarray, bits: int, group_size: int, importance: np.ndarray | None = None,
                     **kw) -> tuple[bytes, dict]:
    """Quantize and pack. Returns (payload bytes, errors) where errors, computed from the DECODED
    payload (what the runtime will see), are::

        mse      mean (w - w^)^2
        out_err  sum_k imp_k sum_r (w - w^)^2_rk / sum_k imp_k sum_r w^2_rk   (raw importance,
                 uniform if None): relative output-error energy under a diagonal input model
        max_abs  max |w - w^|
    """
    layout = _layout(bits, kw.get("codec", DEFAULT_CODEC))
    payload = layout.pack(*quantize(w, bits, group_size, importance, **kw), group_size)[0]
    return payload, _errors(w, payload, layout, group_size, importance)


def quantize_chunks(w: np.ndarray, bounds, bits: int, group_size: int, importance: np.ndarray | None = None,
                    **kw) -> list[tuple[bytes, dict]]:
    """Quantize the whole matrix once (GPTQ needs no more: rows are independent given H) and pack
    rows ``bounds[c]:bounds[c+1]`` as chunk c. ``down_hessian`` [R, R] selects
    :func:`quantize_rows_gptq` (a transposed weight). Returns [(payload, errors)] per chunk, errors as
    :func:`quantize_payload`."""
    down_h = kw.pop("down_hessian", None)
    codec = kw.get("codec", DEFAULT_CODEC)
    layout = _layout(bits, codec)
    if down_h is not None:
        codes, scales, params = quantize_rows_gptq(w, bits, group_size, down_h, method=kw.get("method", "search"),
                                                   codec=codec)
    else:
        codes, scales, params = quantize(w, bits, group_size, importance, **kw)
    out = []
    for lo, hi in zip(bounds, bounds[1:]):
        p = layout.pack(codes[lo:hi], scales[lo:hi], params[lo:hi], group_size)[0]
        out.append((p, _errors(np.asarray(w)[lo:hi], p, layout, group_size, _rows(importance, lo, hi))))
    return out


def quantize_chunks_transposed(w: np.ndarray, bounds, bits: int, group_size: int, **kw) -> list[tuple[bytes, dict]]:
    """A weight stored transposed, w [R inputs, N outputs] (a gated MLP's down projection), quantized as the
    real weight wᵀ [N, R] with groups along its input axis (:func:`quantize`, GPTQ when ``hessian`` [R, R]
    = the input's second moment is given) and packed per chunk of rows ``bounds[c]:bounds[c+1]`` (whole
    groups) in the zp codec over chunk transposes (NDC 1.3). Returns [(payload, errors)] as
    :func:`quantize_chunks`, errors of the decoded chunk in its stored orientation."""
    from nadoo.runtime.tiers import ZERO_POINT_T

    layout = ZERO_POINT_T[_layout(bits, "zp").key]
    w = np.asarray(w, np.float32)
    codes, scales, zps = quantize(np.ascontiguousarray(w.T), bits, group_size, None, codec="zp", **kw)
    out = []
    for lo, hi in zip(bounds, bounds[1:]):
        g0, g1 = lo // group_size, -(-hi // group_size)
        p = layout.pack(codes[:, lo:hi], scales[:, g0:g1], zps[:, g0:g1], group_size)[0]
        out.append((p, _errors(w[lo:hi], p, layout, group_size, None)))
    return out


def _rows(importance, lo: int, hi: int):
    """The importance of rows lo:hi ([K] is shared by every row)."""
    return importance if importance is None or np.ndim(importance) == 1 else np.asarray(importance)[lo:hi]


def _errors(w, payload, layout, group_size, importance):
    w = np.asarray(w, dtype=np.float32)
    R, K = w.shape
    return _errors_of(w, layout.decode(layout.key, [payload], R, K, group_size), importance)


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


def _errors_of(w, wh, importance):
    d = (w - wh).astype(np.float64)
    w64 = w.astype(np.float64)
    if importance is not None and np.ndim(importance) == 2:  # per-row importance [R, K]
        imp = np.asarray(importance, np.float64)
        num, den = float(np.einsum("rk,rk,rk->", imp, d, d)), float(np.einsum("rk,rk,rk->", imp, w64, w64))
    else:
        imp = np.ones(w.shape[1]) if importance is None else np.asarray(importance, np.float64).reshape(-1)
        num, den = float(imp @ np.einsum("rk,rk->k", d, d)), float(imp @ np.einsum("rk,rk->k", w64, w64))
    out_err = num / den if den > 0 else (0.0 if num == 0 else float("inf"))
    return {"mse": float(np.einsum("rk,rk->", d, d) / d.size), "out_err": out_err, "max_abs": float(np.abs(d).max())}
