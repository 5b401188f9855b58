"""nadoo.Attention: one decoder layer's fused self-attention over a KV cache held as explicit state.

Inputs: q [1, n, heads·D], k and v [1, n, kv_heads·D] (projected, biased), position_ids [1, n] (int),
inv_freq [D/2] (rotary inverse frequencies, a constant), optional q_norm / k_norm [D] (per-head
RMSNorm scales, stored with any (1 + w) offset already added). Attributes: heads, kv_heads,
head_dim, scale, max_positions, epsilon (of the q/k norms), window (sliding window, 0 = full),
softcap (of the scores, 0 = none). Output [1, n, heads·D].

The layer's keys and values live in the plan's `state` (kv_cache.SequenceState, keyed by node
name); a plan built without one keeps a private state. The n new positions must follow the cached
ones (position_ids = L, L+1, ... with L the cached length) or start at 0, which starts a new
sequence. One sequence at a time: the batch axis must be 1. The state's attention policy
(runtime/sparse_attention.py) decides which cached keys each query reads; the time spent here adds
up in state.attention_s.
"""
from __future__ import annotations

import time

import numpy as np

from ..errors import BundleError, InputError
from ._common import register


def _int_attr(ctx, name: str, lo: int = 1) -> int:
    v = ctx.attr(name)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise BundleError(f"corrupt bundle: attention node {ctx.node.get('name')!r}: {name} must be an integer >= {lo}")
    return v


@register("Attention", domain="nadoo")
def _attention(node, ctx):
    from ..kv_cache import SequenceState
    from ..lm_kernels import RopeTable, attention

    heads, kv_heads, head_dim = (_int_attr(ctx, k) for k in ("heads", "kv_heads", "head_dim"))
    max_positions = _int_attr(ctx, "max_positions")
    window = _int_attr(ctx, "window", 0) if "window" in ctx.attrs else 0
    scale, eps = float(ctx.attr("scale")), float(ctx.attr("epsilon", 1e-6))
    softcap = float(ctx.attr("softcap", 0.0))
    name = node.get("name") or "attention"
    if heads % kv_heads:
        raise BundleError(f"corrupt bundle: attention node {name!r}: {heads} heads do not share {kv_heads} kv heads evenly")
    inv_freq = ctx.const(4)
    if inv_freq is None or inv_freq.shape != (head_dim // 2,):
        raise BundleError(f"corrupt bundle: attention node {name!r} needs constant inv_freq of shape [{head_dim // 2}]")
    rope = RopeTable(inv_freq, max_positions)
    state = ctx.state if ctx.state is not None else SequenceState()

    def f(q, k, v, position_ids, _inv_freq=None, q_norm=None, k_norm=None):
        if q.ndim != 3 or q.shape[0] != 1:
            raise InputError(f"{name}: one sequence at a time (batch 1), got queries of shape {q.shape}")
        pos = np.asarray(position_ids).reshape(-1)
        n = q.shape[1]
        if pos.dtype.kind not in "iu" or pos.size != n:
            raise InputError(f"{name}: position_ids must be {n} integers, got {pos.dtype}{list(pos.shape)}")
        cache = state.layer(name, kv_heads, head_dim, max_positions, window or None)
        start = int(pos[0]) if n else cache.length
        if start == 0:  # position 0 begins a new sequence
            cache.reset()
            state.restarts += 1
        if start != cache.length or (n and not np.array_equal(pos, np.arange(start, start + n))):
            raise InputError(f"{name}: position_ids must continue the cached sequence at {cache.length} "
                             f"(or start at 0), got {pos[:4].tolist()}{' …' if n > 4 else ''}")
        t0, c0 = time.perf_counter(), time.thread_time()
        out = attention(q[0], k[0], v[0], cache, n_heads=heads, scale=scale, rope=rope, window=window or None,
                        softcap=softcap or None, q_norm=q_norm, k_norm=k_norm, norm_eps=eps, sparse=state.attention)
        state.attention_s += time.perf_counter() - t0
        state.attention_cpu_s += time.thread_time() - c0  # what a loaded machine does not inflate
        return out[None]
    return f
