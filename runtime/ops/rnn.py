"""Recurrent layers: LSTM, GRU and RNN (ONNX semantics, forward / reverse / bidirectional, both layouts,
sequence_lens, initial states, LSTM peepholes). The input projection of every time step is one matmul
up front; only the recurrent product runs step by step. Non-default activations, `clip` and
`input_forget` are left to the onnx.reference fallback."""
from __future__ import annotations

import numpy as np

from ._common import Fallback, register
from .elementwise import _sigmoid

_DEFAULT_ACTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _check_attrs(op: str, ctx) -> tuple[str, int, int]:
    """(direction, hidden_size, layout); raises Fallback for configurations not implemented here."""
    acts = ctx.attr("activations", None)
    n_dir = 2 if ctx.attr("direction", "forward") == "bidirectional" else 1
    if acts is not None and [a.lower() for a in acts] != [a.lower() for a in _DEFAULT_ACTS[op] * n_dir]:
        raise Fallback(f"{op} activations {acts}")
    if ctx.attr("clip", None) is not None or int(ctx.attr("input_forget", 0)):
        raise Fallback(f"{op} clip / input_forget")
    direction = ctx.attr("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        raise Fallback(f"{op} direction {direction!r}")
    return direction, int(ctx.attr("hidden_size", 0)), int(ctx.attr("layout", 0))


def _step_mask(seq_lens, T: int, B: int, dtype):
    """[T, B, 1] 1 where step t < the sequence's length (None when every sequence is full)."""
    if seq_lens is None:
        return None
    lens = np.asarray(seq_lens).reshape(-1).astype(np.int64)
    if lens.shape != (B,):
        raise ValueError(f"sequence_lens has {lens.size} entries for a batch of {B}")
    if np.all(lens >= T):
        return None
    return (np.arange(T)[:, None] < lens[None, :]).astype(dtype)[:, :, None]


def _order(T: int, lens, reverse: bool):
    """Time steps in processing order; a reversed sequence starts at its own last valid step, so per
    batch row the step index is gathered (`idx` [T, B]) when lengths differ."""
    if not reverse:
        return None
    if lens is None:
        return np.arange(T)[::-1]
    lens = np.minimum(np.asarray(lens).reshape(-1).astype(np.int64), T)
    t = np.arange(T)[:, None]
    return np.where(t < lens[None, :], lens[None, :] - 1 - t, t)  # [T, B]: padded steps stay in place


def _take(a, idx, k):
    """a [T, B, ...] at processing step k: a[idx[k, b], b] (idx None = in order, 1-D = same for all b)."""
    if idx is None:
        return a[k]
    if idx.ndim == 1:
        return a[idx[k]]
    return a[idx[k], np.arange(a.shape[1])]


def _run_direction(op, xw, R, Rb, h0, c0, P, mask, idx, linear_before_reset):
    """One direction over time. xw [T, B, G·H] = X·Wᵀ + Wb (all steps); returns Y [T, B, H], h, c."""
    T, B = xw.shape[:2]
    H = R.shape[1]
    Rt = np.ascontiguousarray(R.T)  # [H, G·H]
    h = h0
    c = c0
    Y = np.zeros((T, B, H), xw.dtype)
    for k in range(T):
        g = _take(xw, idx, k)
        m = None if mask is None else _take(mask, idx, k)
        if op == "LSTM":
            z = g + h @ Rt + Rb
            i, o, f, cc = z[:, :H], z[:, H:2 * H], z[:, 2 * H:3 * H], z[:, 3 * H:]
            if P is not None:
                i = i + P[:H] * c
                f = f + P[2 * H:] * c
            i, f = _sigmoid(i), _sigmoid(f)
            c_new = f * c + i * np.tanh(cc)
            if P is not None:
                o = o + P[H:2 * H] * c_new
            h_new = _sigmoid(o) * np.tanh(c_new)
        elif op == "GRU":
            hr = h @ Rt  # [B, 3H]; gates z, r, h
            zr = _sigmoid(g[:, :2 * H] + hr[:, :2 * H] + Rb[:2 * H])
            zg, r = zr[:, :H], zr[:, H:]
            if linear_before_reset:
                n = np.tanh(g[:, 2 * H:] + r * (hr[:, 2 * H:] + Rb[2 * H:]))
            else:
                n = np.tanh(g[:, 2 * H:] + (r * h) @ Rt[:, 2 * H:] + Rb[2 * H:])
            h_new = (1 - zg) * n + zg * h
        else:
            h_new = np.tanh(g + h @ Rt + Rb)
        if m is not None:  # past a sequence's end its state stays, its output is 0
            h_new = m * h_new + (1 - m) * h
            if op == "LSTM":
                c_new = m * c_new + (1 - m) * c
        h = h_new
        if op == "LSTM":
            c = c_new
        out = h if m is None else h * m
        if idx is None:
            Y[k] = out
        elif idx.ndim == 1:
            Y[idx[k]] = out
        else:
            Y[idx[k], np.arange(B)] = out
    return Y, h, c


def _builder(op):
    def build(node, ctx):
        direction, hidden, layout = _check_attrs(op, ctx)
        lbr = int(ctx.attr("linear_before_reset", 0))
        G = _GATES[op]
        n_out = ctx.n_outputs

        def f(X, W, R, B=None, seq_lens=None, h0=None, c0=None, P=None):
            if layout:
                X = np.swapaxes(X, 0, 1)  # [batch, seq, in] → [seq, batch, in]
            T, Bn = X.shape[:2]
            D = W.shape[0]
            H = R.shape[-1]
            if hidden and hidden != H:
                raise ValueError(f"{op} hidden_size {hidden} but R has {H} columns")
            dt = X.dtype
            mask = _step_mask(seq_lens, T, Bn, dt)
            lens = None if mask is None else seq_lens
            Ys, hs, cs = [], [], []
            for d in range(D):
                b = np.zeros(2 * G * H, dt) if B is None else B[d]
                xw = (X.reshape(T * Bn, -1) @ W[d].T).reshape(T, Bn, G * H) + b[:G * H]
                hd = np.zeros((Bn, H), dt) if h0 is None else (np.swapaxes(h0, 0, 1) if layout else h0)[d]
                cd = np.zeros((Bn, H), dt) if c0 is None else (np.swapaxes(c0, 0, 1) if layout else c0)[d]
                reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
                idx = _order(T, lens, reverse)
                Pd = None if P is None else P[d]
                Y, h, c = _run_direction(op, xw, R[d], b[G * H:], hd, cd, Pd, mask, idx, lbr)
                Ys.append(Y)
                hs.append(h)
                cs.append(c)
            Y = np.stack(Ys, axis=1)  # [T, D, B, H]
            Yh, Yc = np.stack(hs), np.stack(cs)
            if layout:
                Y, Yh, Yc = Y.transpose(2, 0, 1, 3), np.swapaxes(Yh, 0, 1), np.swapaxes(Yc, 0, 1)
            outs = (np.ascontiguousarray(Y), Yh, Yc)[:max(n_out, 1)]
            return outs[0] if n_out == 1 else outs
        return f
    return build


for _op in ("LSTM", "GRU", "RNN"):
    register(_op)(_builder(_op))
