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


def _order(T: int, B: int, lens, reverse: bool) -> np.ndarray:
    """[T, B]: the time index that processing step k reads for batch row b. A reversed sequence
    starts at its own last valid step; steps past a sequence's end stay where they are (masked)."""
    t = np.broadcast_to(np.arange(T)[:, None], (T, B))
    if not reverse:
        return t
    if lens is None:
        return t[::-1]
    return np.where(t < lens[None, :], lens[None, :] - 1 - t, t)


def _recur(op, XW, Rt, Rbh, h, c, P, m, lbr):
    """All directions at once, over processing steps. XW [T, D, B, G·H] = X·Wᵀ + biases (except a GRU's
    Rbh), Rt [D, H, G·H], h / c [D, B, H], P [D, 1, 3H] peepholes, m [T, 1, B, 1] valid-step mask.
    Returns the outputs per processing step [T, D, B, H] and the final h, c."""
    T = XW.shape[0]
    H = Rt.shape[1]
    Y = np.empty(XW.shape[:3] + (H,), XW.dtype)
    for k in range(T):
        hr = np.matmul(h, Rt)
        z = XW[k] + hr
        if op == "LSTM":  # gates i, o, f, c
            if P is not None:
                z[..., :H] += P[..., :H] * c
                z[..., 2 * H:3 * H] += P[..., 2 * H:] * c
                i, f = _sigmoid(z[..., :H]), _sigmoid(z[..., 2 * H:3 * H])
                c_new = f * c + i * np.tanh(z[..., 3 * H:])
                o = _sigmoid(z[..., H:2 * H] + P[..., H:2 * H] * c_new)
            else:
                s = _sigmoid(z[..., :3 * H])
                c_new = s[..., 2 * H:] * c + s[..., :H] * np.tanh(z[..., 3 * H:])
                o = s[..., H:2 * H]
            h_new = o * np.tanh(c_new)
        elif op == "GRU":  # gates z, r, h
            zr = _sigmoid(z[..., :2 * H])
            zg, r = zr[..., :H], zr[..., H:]
            if lbr:
                n = np.tanh(XW[k][..., 2 * H:] + r * (hr[..., 2 * H:] + Rbh))
            else:
                n = np.tanh(XW[k][..., 2 * H:] + np.matmul(r * h, Rt[..., 2 * H:]))
            h_new = n + zg * (h - n)
        else:
            h_new = np.tanh(z)
        if m is not None:  # past a sequence's end its state stays and its output is 0
            h_new = h + m[k] * (h_new - h)
            if op == "LSTM":
                c_new = c + m[k] * (c_new - c)
            Y[k] = h_new * m[k]
        else:
            Y[k] = h_new
        h = h_new
        if op == "LSTM":
            c = c_new
    return Y, h, c


def _builder(op):
    def build(node, ctx):
        direction, hidden, layout = _check_attrs(op, ctx)
        lbr = int(ctx.attr("linear_before_reset", 0))
        G = _GATES[op]
        n_out = ctx.n_outputs

        def f(X, W, R, B=None, seq_lens=None, h0=None, c0=None, P=None):
            if layout:  # [batch, seq, ...] → [seq, batch, ...]; states [batch, dir, H] → [dir, batch, H]
                X = np.swapaxes(X, 0, 1)
                h0 = None if h0 is None else np.swapaxes(h0, 0, 1)
                c0 = None if c0 is None else np.swapaxes(c0, 0, 1)
            T, Bn = X.shape[:2]
            D, H = W.shape[0], R.shape[-1]
            if hidden and hidden != H:
                raise ValueError(f"{op} hidden_size {hidden} but R has {H} columns")
            dt = X.dtype
            lens = None
            if seq_lens is not None:
                lens = np.minimum(np.asarray(seq_lens).reshape(-1).astype(np.int64), T)
                if lens.shape != (Bn,):
                    raise ValueError(f"sequence_lens has {lens.size} entries for a batch of {Bn}")
                if np.all(lens == T):
                    lens = None
            B = np.zeros((D, 2 * G * H), dt) if B is None else B
            # biases folded into the input projection, except a GRU's Rbh (inside r·(h·Rhᵀ + Rbh))
            bias = B[:, :G * H] + B[:, G * H:]
            Rbh = None
            if op == "GRU" and lbr:
                bias[:, 2 * H:] -= B[:, G * H + 2 * H:]
                Rbh = B[:, None, G * H + 2 * H:]
            XW = np.matmul(X.reshape(1, T * Bn, -1), np.swapaxes(W, 1, 2)).reshape(D, T, Bn, G * H)
            XW += bias[:, None, None, :]
            rows = np.arange(Bn)
            idx = [_order(T, Bn, lens, direction == "reverse" or d == 1) for d in range(D)]
            XW = np.stack([XW[d][idx[d], rows] for d in range(D)], axis=1)  # [T, D, B, GH], processing order
            m = None if lens is None else (np.arange(T)[:, None] < lens[None, :]).astype(dt)[:, None, :, None]
            h = np.zeros((D, Bn, H), dt) if h0 is None else np.asarray(h0, dt)
            c = np.zeros((D, Bn, H), dt) if c0 is None else np.asarray(c0, dt)
            Yp, h, c = _recur(op, XW, np.ascontiguousarray(np.swapaxes(R, 1, 2)), Rbh, h, c,
                              None if P is None else P[:, None, :], m, lbr)
            Y = np.empty_like(Yp)
            for d in range(D):  # back to time order
                Y[idx[d], d, rows] = Yp[:, d]
            if layout:
                Y, h, c = Y.transpose(2, 0, 1, 3), np.swapaxes(h, 0, 1), np.swapaxes(c, 0, 1)
            outs = (np.ascontiguousarray(Y), np.ascontiguousarray(h), np.ascontiguousarray(c))
            return outs[0] if n_out == 1 else outs[:n_out]
        return f
    return build


for _op in ("LSTM", "GRU", "RNN"):
    register(_op)(_builder(_op))
