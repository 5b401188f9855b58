"""GPTQ (Frantar et al., 2022) on the quantization grid of compiler/quant_grid.py: columns quantized in
order, each one's rounding error fed back into the columns not yet quantized through the inverse
Hessian of the layer's calibration inputs (`gptq_factor`: its damped upper Cholesky factor).
"""
from __future__ import annotations

import numpy as np

from nadoo.runtime.errors import CompileError
from nadoo.runtime.tiers import DEFAULT_CODEC

from .quant_grid import (GPTQ_DAMP, _inverse, _layout, _prepare, _quantize_block, _stored, _to_codes, _to_values,
                         shrink_grid)

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
