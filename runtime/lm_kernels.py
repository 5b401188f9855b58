"""Decoder-LM building blocks as pure NumPy functions: RMSNorm, rotary embedding, the FFN
activations and one layer's fused attention over a KV cache.

Everything computes in float32, in the same order of operations as the transformers reference
implementations, so that a decoder built from these matches them to float rounding. One sequence
at a time (no batch axis): generation decodes one stream, and a batch of streams would each need
its own cache anyway.
"""
from __future__ import annotations

import numpy as np

from .errors import InputError
from .ops.elementwise import _sigmoid, gelu
from .ops.rmsnorm import rms_normalize

__all__ = ["ACTIVATIONS", "RopeTable", "apply_rope", "attention", "rms_norm", "rope_inv_freq", "silu"]

NORM_STYLES = ("plain", "gemma")


# ------------------------------------------------------------------ activations
def silu(x: np.ndarray) -> np.ndarray:
    # exp(-x) overflows to inf for very negative x; 1/(1+inf) = 0 is the right limit, so the
    # warning is noise.
    with np.errstate(over="ignore"):
        return x * _sigmoid(x)


ACTIVATIONS = {
    "silu": silu,
    "gelu_tanh": lambda x: gelu(x, "tanh"),
    "gelu": gelu,
}


# ------------------------------------------------------------------ RMSNorm
def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, style: str = "plain") -> np.ndarray:
    """RMS-normalise the last axis. style="gemma" scales by (1 + weight): Gemma checkpoints store
    the offset from one. Adding it in float32 here gives the same float32 factor a compiled graph
    stores pre-added, so both round identically."""
    if style == "gemma":
        weight = np.float32(1.0) + weight
    elif style != "plain":
        raise InputError(f"unknown norm style {style!r} (expected one of {NORM_STYLES})")
    return rms_normalize(x, weight, eps)


# ------------------------------------------------------------------ rotary embedding
def rope_inv_freq(dim: int, theta: float) -> np.ndarray:
    """The default RoPE inverse frequencies theta^(-2i/dim), i < dim/2, in float32 as the
    reference implementations compute them (so the angles round the same way)."""
    if dim <= 0 or dim % 2:
        raise InputError(f"rotary dimension must be a positive even number, got {dim}")
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)


class RopeTable:
    """cos/sin of position * inv_freq, one row per position, computed on demand and kept.

    The table grows by doubling (up to max_positions) so that decoding pays nothing per token, while a
    model with a 32k context does not allocate 32k rows for a 20-token prompt. Angles are formed in
    float32 like the reference (a float64 angle is more exact but no longer matches the model the
    weights were trained with at large positions).
    """

    def __init__(self, inv_freq: np.ndarray, max_positions: int):
        inv = np.asarray(inv_freq, dtype=np.float32)
        if inv.ndim != 1 or inv.size == 0:
            raise InputError(f"inv_freq must be a non-empty vector, got shape {inv.shape}")
        self.inv_freq = inv
        self.max_positions = int(max_positions)
        self._cos = np.empty((0, inv.size), np.float32)
        self._sin = np.empty((0, inv.size), np.float32)

    def _grow(self, needed: int) -> None:
        have = self._cos.shape[0]
        cap = min(self.max_positions, max(needed, 2 * have, 64))
        pos = np.arange(have, cap, dtype=np.float32)
        ang = pos[:, None] * self.inv_freq[None, :]
        self._cos = np.concatenate([self._cos, np.cos(ang)])
        self._sin = np.concatenate([self._sin, np.sin(ang)])

    def cos_sin(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Half-width tables [n, dim/2] for positions start .. start+n-1."""
        end = start + n
        if start < 0 or end > self.max_positions:
            raise InputError(f"positions {start}..{end - 1} outside the model's {self.max_positions} positions")
        if end > self._cos.shape[0]:
            self._grow(end)
        return self._cos[start:end], self._sin[start:end]


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate x [..., n, dim] in the half-split layout (dims i and i + dim/2 form a pair), the
    layout Hugging Face checkpoints use. cos/sin are the [n, dim/2] halves from RopeTable."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    out = np.empty(x.shape, np.float32)
    np.subtract(x1 * cos, x2 * sin, out=out[..., :h])
    np.add(x2 * cos, x1 * sin, out=out[..., h:])
    return out


# ------------------------------------------------------------------ attention
def _heads(x: np.ndarray, n_heads: int, head_dim: int, what: str) -> np.ndarray:
    """[n, heads*dim] or [n, heads, dim] -> [heads, n, dim]."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 2 and x.shape[1] == n_heads * head_dim:
        x = x.reshape(x.shape[0], n_heads, head_dim)
    if x.ndim != 3 or x.shape[1:] != (n_heads, head_dim):
        raise InputError(f"attention {what} has shape {x.shape}, expected [n, {n_heads}*{head_dim}]")
    return x.transpose(1, 0, 2)


def attention(q, k, v, cache, *, n_heads: int, scale: float, rope: RopeTable | None = None,
              window: int | None = None, softcap: float | None = None,
              q_norm: np.ndarray | None = None, k_norm: np.ndarray | None = None,
              norm_eps: float = 1e-6, norm_style: str = "plain") -> np.ndarray:
    """One layer's attention for n new tokens at positions cache.length .. cache.length+n-1.

    q [n, n_heads*D], k/v [n, kv_heads*D] are the projected (biased) activations. Applies the
    optional per-head q/k RMSNorm, rotary embedding, appends k/v to `cache` (a LayerKVCache), and
    attends causally — with `window`, a query at position p sees keys in (p - window, p] — with
    grouped-query sharing (query head h reads kv head h // (n_heads / kv_heads)). Returns [n, n_heads*D].
    Works the same for a prefill (n > 1) and a decode step (n = 1).
    """
    kvh, d = cache.kv_heads, cache.head_dim
    if n_heads % kvh:
        raise InputError(f"{n_heads} query heads cannot share {kvh} kv heads evenly")
    qh = _heads(q, n_heads, d, "q")
    kh = _heads(k, kvh, d, "k")
    vh = _heads(v, kvh, d, "v")
    n = qh.shape[1]
    if kh.shape[1] != n or vh.shape[1] != n:
        raise InputError(f"attention got {n} queries but {kh.shape[1]} keys and {vh.shape[1]} values")
    if q_norm is not None:
        qh = rms_norm(qh, q_norm, norm_eps, norm_style)
    if k_norm is not None:
        kh = rms_norm(kh, k_norm, norm_eps, norm_style)
    start = cache.length
    if rope is not None:
        cos, sin = rope.cos_sin(start, n)
        qh = apply_rope(qh, cos, sin)
        kh = apply_rope(kh, cos, sin)
    keys, values, kpos = cache.append(kh, vh)
    keys = keys.astype(np.float32, copy=False)
    values = values.astype(np.float32, copy=False)

    # Grouped-query attention without repeating K/V: the g query heads that share one kv head are
    # stacked along the row axis, so each kv head does one [g*n, D] x [D, m] product.
    g = n_heads // kvh
    qg = qh.reshape(kvh, g * n, d)
    scores = np.matmul(qg, keys.transpose(0, 2, 1))
    scores *= np.float32(scale)
    if softcap is not None:
        scores /= np.float32(softcap)
        np.tanh(scores, out=scores)
        scores *= np.float32(softcap)

    qpos = np.arange(start, start + n)
    allowed = kpos[None, :] <= qpos[:, None]
    if window is not None:
        allowed &= kpos[None, :] > qpos[:, None] - window
    if not allowed.all():
        # rows of `scores` run (query head in group, query); the mask depends on the query only
        full_mask = np.tile(allowed, (g, 1))
        np.copyto(scores, np.float32(-np.inf), where=~full_mask[None])

    # softmax in float32 with max subtraction; every row keeps at least its own key, so the max is finite
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = np.matmul(scores, values)  # [kvh, g*n, D]
    return out.reshape(n_heads, n, d).transpose(1, 0, 2).reshape(n, n_heads * d)
