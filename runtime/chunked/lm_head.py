"""`nadoo.LMHead`: a language model's output layer routed by vocabulary chunk.

logits[..., t] = softcap(x · W[row_of[t]]), W [V, K] stored as chunks of rows in the order the
compiler chose (similar rows together, compiler/lm_head.py). Inputs: x [..., K], row_of [V], basis B
[K, r], mean row μ [K]. Attributes: `weight`, `softcap` (0: none).

`Policy.lm_head = "dense"` computes every row. `"topk"`, on a call with one position (a decode
step), computes exact logits only for the chunks it must:

    w_i = μ + B_m a_i + t_i  (a_i = Bᵀ(w_i - μ) over the first m columns, t_i the rest), so
    x·w_i <= x·μ + u_m·a_i + ‖x⊥‖·‖t_i‖ + ‖u_m‖·‖B_mᵀ t_i‖ + slack,   u = Bᵀx, x⊥ = x - B_m u_m.

The bound is exact arithmetic plus `slack` (float32 rounding of both sides); a_i and the norms are
computed when the session opens from the very blocks the run multiplies (the plan's tiers), so it
holds at every tier. The `lm_head_k` chunks with the highest estimates are read first; then, for
greedy decoding, every unread chunk whose bound reaches the best exact logit is read (highest bound
first) until none does: the argmax is the dense one. A call that needed such extra reads is not
*certified* (counted). With sampling (a temperature set by generate.py), chunks are read until the
bound on the probability mass left out is below `lm_head_epsilon`; the bound is reported. Rows not
computed have logit -inf. When more than a quarter of the chunks could still hold the argmax, the
call computes the dense head instead (one product over the cached whole tensor, as `dense` does). Calls with several positions (prefill of many logits, perplexity) run dense.
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import numpy as np

from .. import callstats
from ..errors import BundleError, InputError
from .base import register
from .gather import checked_row_map
from .linear import ChunkedLinear, linear

_TEMPERATURE = contextvars.ContextVar("nadoo_lm_head_temperature", default=0.0)
_EPS32 = float(np.finfo(np.float32).eps)
_BATCH = 4  # chunks read in the first round after the k (then more per round)
_FALLBACK = 4  # more than 1/_FALLBACK of the chunks still able to win: compute the dense head instead


def stages(r: int) -> list[int]:
    """The sketch dimensions the bound is refined at: thirds of the basis, each stage computed only
    for the rows the previous one left able to matter."""
    return sorted({max(1, round(r * j / 3)) for j in (1, 2, 3)})


@contextlib.contextmanager
def sampling(temperature: float):
    """Calls inside the block sample at `temperature` (0: greedy): a routed head then covers all but
    `lm_head_epsilon` of the probability mass instead of certifying the argmax."""
    token = _TEMPERATURE.set(float(temperature))
    try:
        yield
    finally:
        _TEMPERATURE.reset(token)


class HeadCounters:
    """One call's routed-head counts (callstats.state_for)."""

    __slots__ = ("calls", "routed_calls", "chunks_read", "certified", "tail_mass_max", "macs", "dense_macs")

    def __init__(self):
        self.calls = self.routed_calls = self.chunks_read = self.certified = self.macs = self.dense_macs = 0
        self.tail_mass_max = 0.0


class _Certificate:
    """Sketch coordinates and residual norms of every stored row, from the decoded blocks. The
    coordinates are kept per stage (columns dims[s-1]:dims[s]) as contiguous blocks: a product with a
    column slice of one [V, r] array would copy it on every call."""

    def __init__(self, store, e, tiers, basis, mean, dims):
        r, K = basis.shape[1], e.row_len
        A = np.empty((e.rows, r), np.float32)
        wc2 = np.empty(e.rows, np.float64)
        for i, w in store.stream(e, tiers):
            lo, hi = e.bounds[i], e.bounds[i + 1]
            wc = w.reshape(hi - lo, -1) - mean
            A[lo:hi] = wc @ basis
            wc2[lo:hi] = np.einsum("ij,ij->i", wc, wc, dtype=np.float64)
        G = basis.T.astype(np.float64) @ basis
        self.blocks = [np.ascontiguousarray(A[:, lo:hi]) for lo, hi in zip([0, *dims], dims)]
        del A
        self.t_norm, self.in_norm = [], []
        a2 = np.zeros(e.rows, np.float64)  # ‖a‖² over the first m columns
        for m, block in zip(dims, self.blocks):
            a2 += np.einsum("ij,ij->i", block, block, dtype=np.float64)
            # ‖I - G_m‖₂: how far the stored basis is from orthonormal (float32 rounding)
            gap = float(np.linalg.norm(np.eye(m) - G[:m, :m], 2))
            # ‖t‖² = ‖w - μ‖² - 2 aᵀ(B_mᵀ(w - μ)) + aᵀ G a <= ‖w - μ‖² - (1 - gap) ‖a‖², a being the
            # float32 product B_mᵀ(w - μ): its rounding moves the middle term by at most 2K·eps·‖w - μ‖²
            t2 = wc2 - (1 - gap) * a2 + 4 * K * _EPS32 * wc2
            self.t_norm.append(np.sqrt(np.maximum(t2, 0)).astype(np.float32))
            # ‖B_mᵀ t‖ = ‖(I - G_m) a‖ <= gap ‖a‖
            self.in_norm.append((gap * np.sqrt(a2) + 1e-6).astype(np.float32))
        self.row_norm_max = float(np.sqrt(wc2.max())) + float(np.linalg.norm(mean)) if e.rows else 0.0


@register
class LMHead(ChunkedLinear):
    op_type = "LMHead"
    # routed (`--lm-head topk`) it chooses chunks per decode step and stays here on every engine; dense,
    # another engine may run it whole (its per-token head figures are then not counted)
    exports_whole = True

    def bind(self, node, ctx, env):
        super().bind(node, ctx, env)  # the dense product, its plan (every chunk at its tiers), stats
        e, attrs = self.entry, node.get("attrs", {})
        row_of, basis, mean = ctx.const(1), ctx.const(2), ctx.const(3)
        if row_of is None or basis is None or mean is None:
            raise BundleError(f"corrupt bundle: {node['name']}: the row map, basis and mean must be constants")
        self.row_of = checked_row_map(row_of, e.rows, node["name"])
        self.basis, self.mean = np.asarray(basis, np.float32), np.asarray(mean, np.float32)
        r = self.basis.shape[1] if self.basis.ndim == 2 else 0
        if self.basis.shape != (e.row_len, r) or r < 1 or self.mean.shape != (e.row_len,):
            raise BundleError(f"corrupt bundle: {node['name']}: basis or mean do not fit a [{e.rows}, {e.row_len}] head")
        self.stages = stages(r)
        self.softcap = float(attrs.get("softcap", 0.0))
        self.routed = env.policy.lm_head == "topk"
        self.k = max(1, min(env.policy.lm_head_k, e.n_chunks))
        self.cert = _Certificate(env.store, e, self.plan.tiers, self.basis, self.mean, self.stages) if self.routed else None

    def whole_tiers(self):
        return None if self.routed else super().whole_tiers()

    def output_dim(self) -> int:
        return len(self.row_of)  # one logit per vocabulary entry

    def count_whole(self, x_shape, y_shape, macs=None):
        """A dense head computed by another engine counts as the dense call here would."""
        macs = self.macs_for(x_shape, y_shape) if macs is None else macs
        super().count_whole(x_shape, y_shape, macs)
        hc = callstats.state_for(self, HeadCounters)
        hc.calls += 1
        hc.chunks_read += self.entry.n_chunks
        hc.macs += macs
        hc.dense_macs += macs

    # -- the output in token order --------------------------------------------------------------
    def _cap(self, y):
        if self.softcap:
            cap = np.float32(self.softcap)
            y = np.tanh(y / cap) * cap
        return y

    def __call__(self, x, *_):
        hc = callstats.state_for(self, HeadCounters)
        hc.calls += 1
        positions = x.size // self.entry.row_len
        if self.routed and positions == 1:
            return self._routed(x, hc)
        before = self.counters().chunks_read, self.counters().macs
        y = self._cap(self.run(x, None)[..., self.row_of])
        lc = self.counters()
        hc.chunks_read += lc.chunks_read - before[0]
        hc.macs += lc.macs - before[1]
        hc.dense_macs += self._macs(x, self.entry.rows)
        return y

    # -- routed ---------------------------------------------------------------------------------
    def _routed(self, x, hc):
        e, bounds, cert, store = self.entry, self.entry.bounds, self.cert, self.env.store
        before = callstats.bytes_read()
        h = x.reshape(-1).astype(np.float32)
        K, V = e.row_len, e.rows
        u = self.basis.T @ h
        base = float(h @ self.mean)
        hn = float(np.linalg.norm(h))
        r = self.basis.shape[1]
        # Worst-case float32 rounding of both sides, doubled: the exact logit (K terms), and the bound
        # (u = Bᵀx: K terms per coordinate, whose errors reach u·a through up to √r·‖a‖; then r more).
        slack = 4 * (K + r) * (1 + math.sqrt(r)) * _EPS32 * hn * cert.row_norm_max + 1e-6
        m0 = self.stages[0]
        est = cert.blocks[0] @ u[:m0] + base
        bound = est + self._tail(h, u, 0, slice(None)) + slack
        macs = K * r + V * m0
        starts = bounds[:-1]
        exact = np.full(V, -np.inf, np.float32)
        done = np.zeros(e.n_chunks, bool)

        full = store.cache.peek(store.key(e.name, tuple(self.plan.tiers), "full"))  # after a dense fallback

        def read(ids):
            nonlocal macs
            ids = np.sort(np.asarray(ids, np.int64))
            blocks = ((full[bounds[i]:bounds[i + 1]] for i in ids) if full is not None
                      else store.chunks(e, ids, self.plan.tiers))
            for i, w in zip(ids, blocks):
                exact[bounds[i]:bounds[i + 1]] = w.reshape(-1, K) @ h
                macs += (bounds[i + 1] - bounds[i]) * K
            done[ids] = True

        first = np.argsort(-np.maximum.reduceat(est, starts), kind="stable")[: self.k]
        read(first)
        best = float(exact.max())
        temperature = _TEMPERATURE.get()
        # Rows that can still matter: for greedy, those whose bound reaches the best logit; for
        # sampling, also those within T·ln(V/ε) below it (each of the others adds < ε/V of the mass).
        reach = best - (temperature * math.log(V / self.env.policy.lm_head_epsilon) if temperature > 0 else 0.0)
        rows_done = np.repeat(done, np.diff(bounds))
        for s in range(1, len(self.stages)):  # refine the bound of those rows with more sketch dimensions
            cand = np.flatnonzero((bound >= reach) & ~rows_done)
            lo, hi = self.stages[s - 1], self.stages[s]
            block = cert.blocks[s]
            if 2 * len(cand) > V:  # most rows: one product over the block beats gathering its rows
                est[cand] += (block @ u[lo:hi])[cand]
                macs += V * (hi - lo) + K * hi
            else:
                est[cand] += block[cand] @ u[lo:hi]
                macs += len(cand) * (hi - lo) + K * hi
            bound[cand] = est[cand] + self._tail(h, u, s, cand) + slack
        extra, batch = False, _BATCH
        while True:
            cb = np.maximum.reduceat(bound, starts)
            cb[done] = -np.inf
            if temperature > 0:
                tail = self._tail_mass(exact, bound, np.repeat(done, np.diff(bounds)), temperature)
                if tail <= self.env.policy.lm_head_epsilon or done.all():
                    hc.tail_mass_max = max(hc.tail_mass_max, tail)
                    break
                want = np.argsort(-cb, kind="stable")[:batch]
                batch *= 2
            else:
                want = np.flatnonzero(cb >= best)
                if len(want) == 0:
                    break
                if len(want) * _FALLBACK > e.n_chunks:  # the bound excludes little: the dense product
                    extra = True
                    if store.fits(e):
                        exact[:] = linear(h, store.full(e, self.plan.tiers).T, None)
                        done[:] = True
                        macs += V * K
                    else:
                        read(np.flatnonzero(~done))
                    break
                # highest bounds first; at least half of what is left each round, so a loose bound
                # costs a few rounds, not one per chunk
                want = want[np.argsort(-cb[want], kind="stable")][:max(_BATCH, len(want) // 2)]
            extra = True
            read(want)
            best = float(exact.max())
        hc.routed_calls += 1
        hc.certified += not extra
        n_read = int(done.sum())
        hc.chunks_read += n_read
        hc.macs += macs
        hc.dense_macs += V * K
        self.count(before, n_read, macs, V * K)
        live = np.isfinite(exact)
        exact[live] = self._cap(exact[live])
        return exact[self.row_of].reshape(x.shape[:-1] + (V,))

    def _tail(self, h, u, s, rows):
        """The bound on x·t_i + u_m·(B_mᵀ t_i) at stage s for `rows`."""
        m = self.stages[s]
        perp = float(np.linalg.norm(h - self.basis[:, :m] @ u[:m]))
        return perp * self.cert.t_norm[s][rows] + float(np.linalg.norm(u[:m])) * self.cert.in_norm[s][rows]

    def _tail_mass(self, exact, bound, rows_done, temperature) -> float:
        """An upper bound on the softmax probability of the rows not computed."""
        z_in = self._cap(exact[rows_done]).astype(np.float64) / temperature
        z_out = self._cap(bound[~rows_done]).astype(np.float64) / temperature
        if z_out.size == 0:
            return 0.0
        top = max(z_in.max(), z_out.max())
        s_in, s_out = np.exp(z_in - top).sum(), np.exp(z_out - top).sum()
        return float(s_out / (s_in + s_out))

    # -- session-level ---------------------------------------------------------------------------
    @classmethod
    def check_policy(cls, policy, bundle) -> None:
        if policy.lm_head == "topk" and not any(n.get("op") == cls.op_type for n in bundle.read_graph().get("nodes", [])):
            raise InputError("--lm-head topk needs a bundle whose LM head is routed by vocabulary chunk "
                             "(compile the language model again with this version)")

    @classmethod
    def extra_stats(cls, ops, call) -> dict | None:
        heads = [call.states.get(op) for op in ops]
        hc = next((h for h in heads if h is not None), None)
        if hc is None:
            return None
        return {"lm_head": {"mode": ops[0].env.policy.lm_head, "calls": hc.calls, "routed_calls": hc.routed_calls,
                            "chunks_read": hc.chunks_read, "chunks_total": ops[0].entry.n_chunks,
                            "certified_calls": hc.certified, "tail_mass_max": hc.tail_mass_max, "macs": hc.macs,
                            "dense_macs": hc.dense_macs}}

    @classmethod
    def export(cls, node, ex):
        ins, name = node["inputs"], node["attrs"]["weight"]
        cap = float(node["attrs"].get("softcap", 0.0))
        out = ex.fresh("logits_raw") if cap else node["outputs"][0]
        row_of = ex.constants.get(ins[1])
        if row_of is not None:  # the weight's rows put in vocabulary order once: no Gather of every logit per call
            ex.linear(ins[0], name, "", out, rows=checked_row_map(row_of, ex.bundle.tensors[name].rows, node["name"]))
        else:
            raw = ex.fresh("logits_stored")
            ex.linear(ins[0], name, "", raw)
            ex.add("Gather", [raw, ins[1]], [out], axis=-1)
        if cap:
            c = ex.constant(cap)
            d, t = ex.fresh("div"), ex.fresh("tanh")
            ex.add("Div", [out, c], [d])
            ex.add("Tanh", [d], [t])
            ex.add("Mul", [t, c], node["outputs"])
