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

from nadoo.runtime.errors import CompileError
from nadoo.runtime.tiers import DEFAULT_CODEC

# The grid and its search (quant_grid.py) and GPTQ (gptq.py) live beside this module; their public names
# are re-exported here, where callers have always found them.
from .gptq import _gptq, gptq_factor, quantize_rows_gptq
from .quant_grid import (_BLOCK_ELEMS, F16_MAX, GPTQ_DAMP, IMP_FLOOR, _f16_near, _layout, _prepare,  # noqa: F401
                         _quantize_block, _stored, shrink_grid)

__all__ = ["quantize", "quantize_payload", "quantize_chunks", "gptq_factor", "shrink_grid", "F16_MAX",
           "IMP_FLOOR", "GPTQ_DAMP"]  # nested bit-planes: compiler/quantize_nested.py

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
