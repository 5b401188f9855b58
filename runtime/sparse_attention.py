"""Training-free sparse attention over the KV cache: which cached keys each query reads.

    dense   every key the layer's own mask allows (causal, and its native sliding window)
    window  StreamingLLM: the first `sink` positions + the most recent `window`; older keys are evicted
    pages   Quest: keys grouped in pages of `page` positions, each page summarised by its element-wise
            min and max key; a query scores a page by sum_i max(q_i*min_i, q_i*max_i) (an upper bound
            of q.k over the page) and reads the best pages that fit the budget, plus the sinks and a
            local window (grouped heads: the heads' softmax weights of the bound, summed). Nothing is
            evicted: the cache stays whole, only less of it is read.
            With `candidates` C, two stages: the bound's pages offer C keys, whose keys (not values) are
            read and scored exactly, and the best budget - sink - window of them are attended.
    sparq   SparQ (Ribar et al. 2024), two stages: every key scored on the `components` coordinates
            where the queries are largest (reads only those), the best `candidates` keys scored exactly
            (reads their keys), the best of those attended (reads their values). Key-level, where a page
            selection is limited by how attention spreads over pages (see README).
    heavy   H2O: the sinks, a recent window and the "heavy hitters" (keys with the largest attention
            they have received so far, summed over queries and heads); the rest is evicted.
    oracle  the `budget` keys with the largest exact attention weight, per query (for measuring: it
            has to score every key to choose)

`budget` counts the keys one query reads in one layer, sinks and window included. A query that can
see no more keys than the budget reads them all, so every policy is exactly dense until the context
outgrows its budget. With grouped-query attention a selection is made per KV head, from the scores of
the query heads that share it (summed). By default only global-attention layers are governed (native
sliding-window layers are exact already); scope "all" applies the policy inside native windows too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

__all__ = ["ATTENTION_KINDS", "AttentionPolicy", "KV_DTYPES", "SCOPES"]

ATTENTION_KINDS = ("dense", "window", "pages", "sparq", "heavy", "oracle")
SCOPES = ("global", "all")
KV_DTYPES = ("float32", "float16", "int8")
EVICTING = ("window", "heavy")
HEAVY_BLOCK = 64  # prompt rows a heavy-hitter prefill attends with between two evictions


def _count(name: str, value, lo: int):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise InputError(f"--{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class AttentionPolicy:
    kind: str = "dense"
    budget: int | None = None  # keys read per query per layer (sinks and window included)
    sink: int | None = None  # default 4
    window: int | None = None  # recent keys always read; default per kind (see `recent`)
    page: int | None = None  # pages: keys per page, default 16
    scope: str = "global"  # "global": only full-attention layers; "all": native-window layers too
    kv_dtype: str = "float32"
    # pages: keys (beyond sinks and window) the bound picks as candidates; their exact scores then choose
    # the budget's keys among them (None: the bound's pages are read as they are)
    candidates: int | None = None
    components: int | None = None  # sparq: coordinates of each key the first stage reads (default 16)

    def __post_init__(self):
        if self.kind not in ATTENTION_KINDS:
            raise InputError(f"unknown --attention {self.kind!r} ({', '.join(ATTENTION_KINDS)})")
        if self.scope not in SCOPES:
            raise InputError(f"unknown --attention-scope {self.scope!r} (global or all)")
        if self.kv_dtype not in KV_DTYPES:
            raise InputError(f"unknown --kv-dtype {self.kv_dtype!r} ({', '.join(KV_DTYPES)})")
        budget = _count("kv-budget", self.budget, 1)
        sink, window, page = _count("sink", self.sink, 0), _count("window", self.window, 1), _count("page", self.page, 1)
        candidates = _count("candidates", self.candidates, 1)
        components = _count("components", self.components, 1)
        given = [n for n, v in (("kv-budget", budget), ("sink", sink), ("window", window), ("page", page),
                                ("candidates", candidates), ("components", components)) if v is not None]
        if self.kind == "dense":
            if given:
                raise InputError(f"--{given[0]} needs a sparse --attention (window, pages, sparq, heavy or oracle)")
        else:
            if budget is None:
                raise InputError(f"--attention {self.kind} needs --kv-budget N (keys read per query)")
            if page is not None and self.kind != "pages":
                raise InputError(f"--page applies to --attention pages, not {self.kind}")
            if candidates is not None and self.kind not in ("pages", "sparq"):
                raise InputError(f"--candidates applies to --attention pages or sparq, not {self.kind}")
            if components is not None and self.kind != "sparq":
                raise InputError(f"--components applies to --attention sparq, not {self.kind}")
            if self.kind == "oracle" and (sink is not None or window is not None):
                raise InputError("--attention oracle picks the exact top keys: --sink and --window do not apply")
        sink = 0 if self.kind == "oracle" else 4 if sink is None else sink
        page = 16 if page is None else page
        if window is None and budget is not None:
            window = {"window": budget - sink, "pages": max(page, budget // 8), "sparq": max(1, budget // 8),
                      "heavy": max(1, budget // 2)}.get(self.kind, 0)
        if budget is not None and self.kind != "oracle" and (window is None or window < 1 or sink + window > budget):
            raise InputError(f"--sink {sink} + --window {window} must leave room within --kv-budget {budget} "
                             "(the window needs at least 1 key)")
        if self.kind == "pages" and window < page:
            # a page is scored only once it lies wholly in the past, which needs the window to span a page
            raise InputError(f"--attention pages needs --window >= --page ({window} < {page})")
        if self.kind == "sparq":
            candidates = budget + budget // 2 if candidates is None else candidates  # see sparq_mask
            components = 16 if components is None else components
        if candidates is not None and candidates < budget - sink - window:
            raise InputError(f"--candidates {candidates} must be at least the keys it chooses from, --kv-budget "
                             f"{budget} - --sink {sink} - --window {window} = {budget - sink - window}")
        for name, v in (("budget", budget), ("sink", sink), ("window", window), ("page", page),
                        ("candidates", candidates), ("components", components)):
            object.__setattr__(self, name, v)

    @property
    def active(self) -> bool:
        return self.kind != "dense"

    @property
    def evicts(self) -> bool:
        return self.kind in EVICTING

    @property
    def np_dtype(self):
        return np.dtype(self.kv_dtype)

    def governs(self, native_window: int | None) -> bool:
        """Whether this policy applies to a layer with that native sliding window (None = global)."""
        return self.active and (native_window is None or self.scope == "all")

    def describe(self) -> dict:
        """The settings, as `--json` reports them."""
        return {"kind": self.kind, "budget": self.budget, "sink": self.sink, "window": self.window,
                "page": self.page if self.kind == "pages" else None, "candidates": self.candidates, "components": self.components, "scope": self.scope, "kv_dtype": self.kv_dtype}


# ------------------------------------------------------------------ selections
def window_mask(policy: AttentionPolicy, kpos: np.ndarray, qpos: np.ndarray) -> np.ndarray:
    """[rows, keys]: the sinks and the recent window of each query."""
    return (kpos[None, :] < policy.sink) | (kpos[None, :] > qpos[:, None] - policy.window)


def page_bounds(keys: np.ndarray, kpos: np.ndarray, page: int, n_pages: int) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise min and max key [kv_heads, n_pages, D] of each page (page = position // page) from
    keys [kv_heads, m, D] at positions kpos; pages without a key hold +inf / -inf."""
    kvh, _, d = keys.shape
    lo = np.full((kvh, n_pages, d), np.inf, np.float32)
    hi = np.full((kvh, n_pages, d), -np.inf, np.float32)
    if kpos.size:
        order = np.argsort(kpos, kind="stable")
        ids = kpos[order] // page
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # first key of each page present
        sorted_keys = keys[:, order]
        lo[:, ids[starts]] = np.minimum.reduceat(sorted_keys, starts, axis=1)
        hi[:, ids[starts]] = np.maximum.reduceat(sorted_keys, starts, axis=1)
    return lo, hi


def round_outward(a: np.ndarray, dtype: np.dtype, toward: float) -> np.ndarray:
    """`a` (float32) in `dtype`, each value rounded toward `toward` (-inf for a lower bound, +inf for an
    upper one) where the nearest value of `dtype` would cross it: a rounded bound stays a bound."""
    if a.dtype == dtype:
        return a
    r = a.astype(dtype)
    crossed = r.astype(np.float32) < a if toward > 0 else r.astype(np.float32) > a
    r[crossed] = np.nextafter(r[crossed], dtype.type(toward))
    return r


def page_mask(policy: AttentionPolicy, qg: np.ndarray, g: int, lo: np.ndarray, hi: np.ndarray,
              kpos: np.ndarray, qpos: np.ndarray, scale: float = 1.0,
              softcap: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """([kv_heads, rows, keys], pages scored per row): sinks + local window + the top pages of each
    query by the Quest bound.
    qg [kv_heads, g*rows, D] are the unscaled queries grouped per KV head; lo/hi [kv_heads, n_pages, D]
    the page bounds; scale and softcap as the attention's own scores.

    With grouped heads, a page is ranked by the weight the softmax of each query head would give
    its bound, summed over the heads sharing the KV head (as the oracle sums the heads' attention
    probabilities): a page one head needs keeps its rank even when the other heads ignore it. Summing the
    heads' raw bounds instead let them outvote it: on Gemma 3 at 4096 tokens, budget 1024, the
    continuation's perplexity was +6.4 % over dense that way, +1.5 % this way."""
    kvh, n_pages = lo.shape[0], lo.shape[1]
    rows = qpos.size
    empty = ~np.isfinite(hi[..., 0])  # pages holding no key yet
    lo, hi = np.where(empty[..., None], 0, lo), np.where(empty[..., None], 0, hi)
    # max(q*min, q*max) = q+ * max + q- * min elementwise, so the bound is two products
    qp, qn = np.maximum(qg, 0), np.minimum(qg, 0)
    bound = np.matmul(qp, hi.transpose(0, 2, 1)) + np.matmul(qn, lo.transpose(0, 2, 1))  # [kvh, g*rows, pages]
    bound *= np.float32(scale)
    if softcap is not None:  # monotone: a capped bound still bounds the capped score
        bound = np.tanh(bound / np.float32(softcap)) * np.float32(softcap)
    first = np.arange(n_pages) * policy.page  # first position of each page
    last = first + policy.page - 1
    # pages starting after the query are in its future; pages wholly among the sinks or the local
    # window are read anyway and need no budget
    useless = (first[None, :] > qpos[:, None]) | (last[None, :] < policy.sink) \
        | (first[None, :] > qpos[:, None] - policy.window)
    out = useless[None] | empty[:, None, :]  # [kvh, rows, pages]: not to be chosen
    bound = np.where(out[:, None], -np.inf, bound.reshape(kvh, g, rows, n_pages))
    top_bound = bound.max(axis=-1, keepdims=True)
    weight = np.exp(bound - np.where(np.isfinite(top_bound), top_bound, 0)).sum(axis=1)  # [kvh, rows, pages]
    score = np.where(out, -np.inf, weight)
    n_top = (policy.candidates or policy.budget - policy.sink - policy.window) // policy.page
    chosen = np.zeros((kvh, rows, n_pages), bool)
    if n_top > 0:
        k = min(n_top, n_pages)
        top = np.argpartition(-score, k - 1, axis=-1)[..., :k] if k < n_pages else \
            np.broadcast_to(np.arange(n_pages), (kvh, rows, n_pages))
        np.put_along_axis(chosen, top, True, axis=-1)
        chosen &= ~out
    base = window_mask(policy, kpos, qpos)
    return base[None] | chosen[:, :, kpos // policy.page], (~useless).sum(axis=1)


def sparq_mask(policy: AttentionPolicy, approx: np.ndarray, g: int, allowed: np.ndarray,
               kpos: np.ndarray, qpos: np.ndarray) -> np.ndarray:
    """[kv_heads, rows, keys]: the first stage of `sparq` (SparQ attention, Ribar et al. 2024): sinks +
    window + the `candidates` keys with the largest approximate weight. approx [kv_heads, g*rows, keys]
    are the scores from the r coordinates of largest |q|, divided by SparQ's temperature
    (lm_kernels._partial_scores); each head's softmax of them is summed over the heads of a KV head.
    Softcapping is left out of the estimate (it is monotone and Gemma 3 does not use it)."""
    kvh, gr, m = approx.shape
    rows = gr // g
    base = window_mask(policy, kpos, qpos) & allowed
    s = np.where(allowed[None, None], approx.reshape(kvh, g, rows, m), -np.inf)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    free = allowed & ~base
    weight = np.where(free[None], s.sum(axis=1), -1.0)
    k = min(policy.candidates, m)
    chosen = np.zeros((kvh, rows, m), bool)
    np.put_along_axis(chosen, np.argpartition(-weight, k - 1, axis=-1)[..., :k], True, axis=-1)
    return base[None] | (chosen & free[None])


def rerank_mask(policy: AttentionPolicy, scores: np.ndarray, g: int, cand: np.ndarray, base: np.ndarray) -> np.ndarray:
    """[kv_heads, rows, c]: the second stage of `pages` with candidates: of the candidate keys the bound's
    pages hold, the budget - sink - window with the largest exact attention weight (each query head's
    softmax over the candidates, summed over the heads sharing the KV head, as the oracle does), plus
    the sinks and window. scores [kv_heads, g*rows, c] are the exact scores of the candidate columns,
    cand [kv_heads, rows, c] the candidates (sinks and window included), base [rows, c] sinks + window."""
    kvh, _, c = scores.shape
    rows = cand.shape[1]
    s = np.where(cand[:, None], scores.reshape(kvh, g, rows, c), -np.inf)
    s -= s.max(axis=-1, keepdims=True)  # every row has its own key among the candidates: finite
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    free = cand & ~base[None]
    weight = np.where(free, s.sum(axis=1), -1.0)
    k = policy.budget - policy.sink - policy.window
    if k >= c:
        return cand
    chosen = np.zeros((kvh, rows, c), bool)
    np.put_along_axis(chosen, np.argpartition(-weight, k - 1, axis=-1)[..., :k], True, axis=-1)
    return (cand & base[None]) | (chosen & free)


def oracle_mask(budget: int, probs: np.ndarray, g: int, allowed: np.ndarray) -> np.ndarray:
    """[kv_heads, rows, keys]: each query's `budget` keys with the largest attention weight summed
    over the query heads sharing the KV head. probs [kv_heads, g*rows, keys] (dense softmax)."""
    kvh, _, m = probs.shape
    rows = allowed.shape[0]
    mass = probs.reshape(kvh, g, rows, m).sum(axis=1)
    mass = np.where(allowed[None], mass, -1.0)
    out = np.zeros((kvh, rows, m), bool)
    k = min(budget, m)
    top = np.argpartition(-mass, k - 1, axis=-1)[..., :k]
    np.put_along_axis(out, top, True, axis=-1)
    return out & allowed[None]


def heavy_keep(policy: AttentionPolicy, kpos: np.ndarray, acc: np.ndarray, next_pos: int) -> np.ndarray:
    """Which of the cached keys (positions kpos, accumulated attention acc) a heavy-hitter cache keeps
    for the query at position `next_pos`, which adds its own key: the sinks, the recent window, then
    the largest accumulated scores, budget - 1 keys in all."""
    keep = (kpos < policy.sink) | (kpos > next_pos - policy.window)
    room = policy.budget - 1 - int(keep.sum())
    if room > 0:
        cand = np.flatnonzero(~keep)
        if cand.size > room:
            cand = cand[np.argpartition(-acc[cand], room - 1)[:room]]
        keep[cand] = True
    return keep
