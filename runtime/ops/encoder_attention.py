"""nadoo.EncoderAttention: an encoder layer's self-attention, scores to head merge, as one op.

Inputs: q, k, v [B, S, heads·D] (the projections, biased, before the head split), optional mask: an
additive float mask broadcastable to [B, heads, Sq, Sk] (0 keeps a key, -inf or a large negative
value drops it). Attributes: heads, scale (of q·k), zero_masked_rows (1: a query row whose every
key is -inf gives zeros, as exporters write it with IsNaN/Where after the softmax; 0: NaN, as a
bare softmax does). Output [B, Sq, heads·D]:

    softmax(scale · Q·Kᵀ + mask) · V, per head, heads merged back in order.

The compiler fuses the exported pattern into this op (compiler/encoder_attention.py); a session
builds it as runtime/chunked/encoder_attention.py, which adds the block-sparse policy. This module
is the dense kernel both use, and the builder for plans without a session (calibration).
"""
from __future__ import annotations

import numpy as np

from ..errors import BundleError, InputError
from ._common import register


def attention_attrs(node: dict, attrs: dict) -> tuple[int, float, bool]:
    """(heads, scale, zero_masked_rows) of a node, checked: a corrupt bundle is one clear error."""
    heads, scale, zero = attrs.get("heads"), attrs.get("scale"), attrs.get("zero_masked_rows", 0)
    name = node.get("name") or "EncoderAttention"
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise BundleError(f"corrupt bundle: encoder attention node {name!r}: heads must be an integer >= 1")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale):
        raise BundleError(f"corrupt bundle: encoder attention node {name!r}: scale must be a finite number")
    if zero not in (0, 1):
        raise BundleError(f"corrupt bundle: encoder attention node {name!r}: zero_masked_rows must be 0 or 1")
    return heads, float(scale), bool(zero)


def split_heads(x: np.ndarray, heads: int) -> np.ndarray:
    """[B, S, heads·D] -> [B, heads, S, D] (a view)."""
    b, s, hd = x.shape
    return x.reshape(b, s, heads, hd // heads).transpose(0, 2, 1, 3)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """[B, heads, S, D] -> [B, S, heads·D]."""
    b, h, s, d = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(b, s, h * d)


def check_inputs(name: str, heads: int, q, k, v, mask) -> None:
    """Shapes the kernel relies on; a mismatch is the caller's input error, never a wrong result."""
    for label, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != 3 or a.shape[-1] % heads or a.dtype.kind != "f":
            raise InputError(f"{name}: {label} must be float [batch, seq, heads*head_dim] with {heads} heads, "
                             f"got {a.dtype}{list(a.shape)}")
    if q.shape[0] != k.shape[0] or k.shape != v.shape or q.shape[2] != k.shape[2]:
        raise InputError(f"{name}: q {list(q.shape)}, k {list(k.shape)} and v {list(v.shape)} do not match")
    if mask is not None:
        full = (q.shape[0], heads, q.shape[1], k.shape[1])
        m = mask.shape
        if (mask.dtype.kind != "f" or mask.ndim > 4
                or any(a not in (1, b) for a, b in zip(m[::-1], full[::-1]))):
            raise InputError(f"{name}: the mask must be float and broadcast to {list(full)}, got {mask.dtype}{list(m)}")


def softmax_rows(s: np.ndarray, zero_masked_rows: bool) -> np.ndarray:
    """Stable softmax over the last axis, in place on `s` (float32 scores)."""
    m = s.max(axis=-1, keepdims=True)
    dead = ~np.isfinite(m) if zero_masked_rows else None
    if dead is not None and dead.any():
        m[dead] = 0  # every key -inf: exp gives 0 everywhere, the row becomes 0 below
    s -= m
    np.exp(s, out=s)
    total = s.sum(axis=-1, keepdims=True)
    if dead is not None and dead.any():
        total[dead] = np.inf
    s /= total
    return s


def dense_attention(q, k, v, mask, heads: int, scale: float, zero_masked_rows: bool) -> np.ndarray:
    """The op's function over every key: [B, Sq, heads·D]."""
    qh = split_heads(q.astype(np.float32, copy=False), heads) * np.float32(scale)
    kh = split_heads(k.astype(np.float32, copy=False), heads)
    vh = split_heads(v.astype(np.float32, copy=False), heads)
    s = np.matmul(qh, kh.transpose(0, 1, 3, 2))
    if mask is not None:
        s += mask.astype(np.float32, copy=False)
    return merge_heads(np.matmul(softmax_rows(s, zero_masked_rows), vh))


@register("EncoderAttention", domain="nadoo")
def _encoder_attention(node, ctx):
    heads, scale, zero = attention_attrs(node, ctx.attrs)
    name = node.get("name") or "EncoderAttention"

    def f(q, k, v, mask=None):
        check_inputs(name, heads, q, k, v, mask)
        return dense_attention(q, k, v, mask, heads, scale, zero)
    return f
