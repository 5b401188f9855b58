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
from .sparse_attention import (HEAVY_BLOCK, heavy_keep, oracle_mask, page_bounds, page_mask, rerank_mask, sparq_mask,
                               window_mask)

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


_SCORE_ELEMS = 1 << 22  # scores [heads, rows, keys] held at once: 16 MB, so an 8k prefill goes in row blocks
_ROW_BLOCK = 256


def attention(q, k, v, cache, *, n_heads: int, scale: float, rope: RopeTable | None = None,
              window: int | None = None, softcap: float | None = None,
              q_norm: np.ndarray | None = None, k_norm: np.ndarray | None = None,
              norm_eps: float = 1e-6, norm_style: str = "plain", sparse=None) -> np.ndarray:
    """One layer's attention for n new tokens at positions cache.length .. cache.length+n-1.

    q [n, n_heads*D], k/v [n, kv_heads*D] are the projected (biased) activations. Applies the
    optional per-head q/k RMSNorm, rotary embedding, appends k/v to `cache` (a LayerKVCache), and
    attends causally — with `window`, a query at position p sees keys in (p - window, p] — with
    grouped-query sharing (query head h reads kv head h // (n_heads / kv_heads)). Returns [n, n_heads*D].
    Works the same for a prefill (n > 1) and a decode step (n = 1). `sparse`: an AttentionPolicy
    (runtime/sparse_attention.py) choosing which of those keys each query reads; it applies to every
    query, prompt rows included, so a prefill sees what token-by-token decoding would.
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
    if sparse is not None and not sparse.governs(window):
        sparse = None
    if sparse is not None and sparse.kind == "heavy" and cache.ring and cache.window > sparse.budget:
        raise InputError(f"--attention heavy evicts, but a sliding-window layer keeps its {cache.window} keys in a "
                         f"ring: use --kv-budget >= {cache.window} or --attention-scope global")

    # Grouped-query attention without repeating K/V: the g query heads that share one kv head are
    # stacked along the row axis, so each kv head does one [g*rows, D] x [D, m] product.
    g = n_heads // kvh
    q4 = qh.reshape(kvh, g, n, d)
    out = np.empty((kvh, g, n, d), np.float32)
    # A heavy-hitter cache evicts between blocks of the prompt, so it never holds much more than its budget.
    step = HEAVY_BLOCK if sparse is not None and sparse.kind == "heavy" else max(n, 1)
    for b0 in range(0, n, step):
        b1 = min(n, b0 + step)
        view = cache.append(kh[:, b0:b1], vh[:, b0:b1])
        _attend(q4[:, :, b0:b1], view, start + b0, cache, out[:, :, b0:b1], g=g, scale=scale, window=window,
                softcap=softcap, sparse=sparse)
        if sparse is not None and sparse.evicts and not cache.ring:
            _evict(cache, sparse)
    return out.reshape(n_heads, n, d).transpose(1, 0, 2).reshape(n, n_heads * d)


def _attend(q4, view, qstart, cache, out, *, g, scale, window, softcap, sparse) -> None:
    """Attention of queries q4 [kvh, g, n, D] at positions qstart.. over `view`, into out [kvh, g, n, D],
    a block of rows at a time; counts the KV bytes read in cache.bytes_read."""
    kvh, _, n, d = q4.shape
    kpos = view.positions
    m = len(view)
    if n == 1 and sparse is None and not cache.track_attention:
        # One decode step, dense: the view holds exactly the keys this query may see (a linear cache
        # only positions up to it; a ring exactly its window), so no mask is built or applied.
        keys, values = view.take()
        p = _scores(q4.reshape(kvh, g, d), keys, scale, softcap)
        p -= p.max(axis=-1, keepdims=True)
        np.exp(p, out=p)
        p /= p.sum(axis=-1, keepdims=True)
        out[:] = np.matmul(p, values).reshape(kvh, g, 1, d)
        cache.bytes_read += m * kvh * cache.key_bytes
        return
    # small row blocks also let a sliding-window layer's block read little more than its window
    rows_per = max(1, min(_ROW_BLOCK, _SCORE_ELEMS // max(1, kvh * g * m)))
    # a prefill decodes the stored keys once, not per row block; the oracle scores every key anyway
    full = view.take() if n > 1 or (sparse is not None and sparse.kind == "oracle") else None
    for r0 in range(0, n, rows_per):
        r1 = min(n, r0 + rows_per)
        rows = r1 - r0
        qpos = np.arange(qstart + r0, qstart + r1)
        qg = q4[:, :, r0:r1].reshape(kvh, g * rows, d)
        allowed = kpos[None, :] <= qpos[:, None]
        if window is not None:
            allowed &= kpos[None, :] > qpos[:, None] - window
        mask, extra_bytes, scores = allowed, 0, None
        over = allowed.sum(axis=1) > sparse.budget if sparse is not None else None
        if over is not None and over.any() and sparse.kind != "heavy":
            if sparse.kind == "window":
                mask = np.where(over[:, None], allowed & window_mask(sparse, kpos, qpos), allowed)
            elif sparse.kind == "pages":
                lo, hi = _page_bounds_of(cache, view, full, kpos, sparse.page)
                sel, scored = page_mask(sparse, qg, g, lo, hi, kpos, qpos, scale, softcap)
                mask = np.where(over[None, :, None], sel & allowed[None], allowed[None])
                extra_bytes = int(scored[over].sum()) * kvh * 2 * d * lo.itemsize  # the page bounds scored
                if sparse.candidates:
                    mask, scores, more = _rerank(sparse, qg, g, view, full, mask, allowed, over, kpos, qpos, cache,
                                                 scale, softcap)
                    extra_bytes += more
            elif sparse.kind == "sparq":
                # first stage: every visible key scored on the `components` coordinates where the group's
                # queries are largest (reads those coordinates of each key); the best `candidates` go on
                approx, per_key = _partial_scores(sparse.components, qg, g, view, full, scale)
                sel = sparq_mask(sparse, approx, g, allowed, kpos, qpos)
                mask = np.where(over[None, :, None], sel, allowed[None])
                extra_bytes = int(allowed[over].sum()) * kvh * per_key
                mask, scores, more = _rerank(sparse, qg, g, view, full, mask, allowed, over, kpos, qpos, cache,
                                             scale, softcap)
                extra_bytes += more
            else:  # oracle: score everything, keep each query's top keys
                scores = _scores(qg, full[0], scale, softcap)
                probs = _softmax(scores, np.broadcast_to(allowed, (kvh, g, rows, m)).reshape(kvh, g * rows, m))
                mask = np.where(over[None, :, None], oracle_mask(sparse.budget, probs, g, allowed), allowed[None])
        # read only the columns some query of the block needs (a decode step with a sparse policy reads few)
        cols = np.flatnonzero(mask.any(axis=tuple(range(mask.ndim - 1))))
        sub = None if cols.size == m else cols
        if full is None:
            keys, values = view.take(sub, keys=scores is None)  # keys already scored are not read again
        else:
            keys, values = full if sub is None else (full[0][:, sub], full[1][:, sub])
        if scores is None:
            scores = _scores(qg, keys, scale, softcap)
        elif sub is not None:
            scores = scores[..., sub]
        mask = mask if sub is None else mask[..., sub]
        per_head = mask.ndim == 3
        # rows of `scores` run (query head in group, query); the mask depends on the kv head and the query
        full_mask = np.broadcast_to(mask[:, None] if per_head else mask[None, None], (kvh, g, rows, mask.shape[-1]))
        probs = _softmax(scores, full_mask.reshape(kvh, g * rows, -1))
        out[:, :, r0:r1] = np.matmul(probs, values).reshape(kvh, g, rows, d)
        cache.bytes_read += int(mask.sum()) * (1 if per_head else kvh) * cache.key_bytes + extra_bytes
        if cache.track_attention and not cache.ring:
            cache.acc[slice(0, m) if sub is None else sub] += probs.sum(axis=(0, 1))  # view columns are slots


def _rerank(sparse, qg, g, view, full, mask, allowed, over, kpos, qpos, cache, scale, softcap):
    """Second stage of a two-stage selection: the candidates' keys (not their values) are read and scored
    exactly, and the best of them by exact weight (rerank_mask) are the keys attended. Returns the final
    mask, the scores [kv_heads, g*rows, m] (-inf outside the candidates) and the bytes of the keys read
    but not attended."""
    kvh, m = qg.shape[0], kpos.size
    ccols = np.flatnonzero(mask.any(axis=(0, 1)))
    ck = full[0][:, ccols] if full is not None else view.take(ccols, values=False)[0]
    cs = _scores(qg, ck, scale, softcap)
    base = window_mask(sparse, kpos[ccols], qpos) & allowed[:, ccols]
    cand = mask[..., ccols]
    final = np.where(over[None, :, None], rerank_mask(sparse, cs, g, cand, base), cand)
    out = np.zeros_like(mask)
    out[..., ccols] = final
    scores = np.full((kvh, qg.shape[1], m), -np.inf, np.float32)
    scores[..., ccols] = cs
    return out, scores, int(cand.sum() - final.sum()) * (cache.key_bytes // 2)


def _partial_scores(r, qg, g, view, full, scale):
    """([kv_heads, g*rows, m] scores from the r coordinates where the |q| of each query, summed over its
    group's heads, is largest; bytes read per key and KV head). A prefill has every key decoded already,
    so it zeroes the other coordinates of q (the same sum); a decode step gathers the r coordinates."""
    kvh, gr, d = qg.shape
    rows = gr // g
    r = min(r, d)
    idx = np.argpartition(-np.abs(qg.reshape(kvh, g, rows, d)).sum(axis=1), r - 1, axis=-1)[..., :r]  # [kvh, rows, r]
    per_key = r * view.k.itemsize + (4 if view.k_scale is not None else 0)
    keep = np.zeros((kvh, rows, d), bool)
    np.put_along_axis(keep, idx, True, axis=-1)
    keep = np.broadcast_to(keep[:, None], (kvh, g, rows, d)).reshape(kvh, gr, d)
    qm = np.where(keep, qg, np.float32(0))
    # SparQ's temperature: sqrt of the share of each head's |q| (L1) in the coordinates kept
    tau = np.sqrt(np.maximum(np.abs(qm).sum(-1) / np.maximum(np.abs(qg).sum(-1), np.float32(1e-30)), 1e-12))[..., None]
    if full is not None or rows > 1:
        keys = full[0] if full is not None else view.take(values=False)[0]
        return _scores(qm, keys, scale, None) / tau, per_key
    cols = np.take_along_axis(view.k, idx[:, 0][:, None, :], axis=2).astype(np.float32)  # [kvh, m, r]
    if view.k_scale is not None:
        cols *= view.k_scale[..., None]
    qi = np.take_along_axis(qg, idx[:, 0][:, None, :], axis=2)  # [kvh, g, r]
    return _scores(qi, cols, scale, None) / tau, per_key


def _scores(qg, keys, scale, softcap):
    # keys @ q^T, not q @ keys^T: NumPy hands a stacked product with a transposed right operand to a
    # slow loop (5 ms instead of 0.02 ms for one decode step's [4, 256] x [256, 512])
    scores = np.ascontiguousarray(np.matmul(keys, qg.transpose(0, 2, 1)).transpose(0, 2, 1))
    scores *= np.float32(scale)
    if softcap is not None:
        scores /= np.float32(softcap)
        np.tanh(scores, out=scores)
        scores *= np.float32(softcap)
    return scores


def _softmax(scores, mask):
    """Masked softmax over the last axis, in float32 with max subtraction; every row keeps at least
    its own key, so the max is finite."""
    p = np.where(mask, scores, np.float32(-np.inf)) if not mask.all() else scores.copy()
    p -= p.max(axis=-1, keepdims=True)
    np.exp(p, out=p)
    p /= p.sum(axis=-1, keepdims=True)
    return p


def _page_bounds_of(cache, view, full, kpos, page):
    """Page bounds: kept by a linear cache as keys arrive, else (a ring under scope "all") from the
    window of keys at hand."""
    if cache.page:
        n = cache.n_pages
        return cache.page_lo[:, :n], cache.page_hi[:, :n]
    keys = full[0] if full is not None else view.take()[0]
    return page_bounds(keys, kpos, page, int(kpos.max()) // page + 1)


def _evict(cache, policy) -> None:
    """After a step of an evicting policy, drop the keys no later query will read: at most budget - 1
    stay, so the next query, with its own key, reads at most `budget`."""
    if cache.length < policy.budget:  # the next query sees no more than the budget: all stays
        return
    pos = cache.slot_positions
    last = cache.length - 1
    if policy.kind == "window":
        keep = window_mask(policy, pos, np.array([last + 1]))[0]  # what the next query will see
    else:
        keep = heavy_keep(policy, pos, cache.acc[:cache.filled], last + 1)
    if not keep.all():
        cache.evict(keep)
