"""The `nadoo` domain operators, which fetch only the chunks a policy selects.

`WeightStore` turns (tensor, chunk, tier) requests into decoded float32 blocks through the reader
(merged positioned reads) and the budgeted cache; `ChunkedOps` binds the graph's nadoo nodes to it
under a `Policy` and counts, per layer and per call (callstats), chunks used, bytes read and
multiply-accumulates.
"""

from __future__ import annotations

import numpy as np

from . import callstats
from .cache import ChunkCache
from .errors import InputError
from .policy import Policy
from .reader import Bundle, TensorEntry


# -- the math, shared with the compiler's calibration (float weights in memory) ---------------------
def linear(x: np.ndarray, wt: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """x[..., K] @ wt[K, R] (+ bias[R]); wt is the transposed weight (a view is fine)."""
    y = np.matmul(x, wt)
    if bias is not None:
        y += bias
    return y


def activation(name: str):
    """The elementwise activation of a fused FFN, as the graph's own nodes would compute it."""
    if name == "Relu":
        return lambda z: np.maximum(z, 0, out=z)
    if name == "Gelu":
        from .ops.elementwise import gelu

        return gelu
    raise InputError(f"unknown FFN activation {name!r}")


def gather_rows(table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    idx = np.asarray(idx)
    n = table.shape[0]
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise InputError(f"index out of range for a table of {n} rows")
    return table[np.where(idx < 0, idx + n, idx)]


def conv_fn(attrs: dict):
    """ONNX Conv taking its weight as an argument (the engine's implementation), built once per node."""
    from .engine import build_node

    node = {"op": "Conv", "domain": "", "name": "conv", "inputs": ["x", "w", "b"], "outputs": ["y"],
            "attrs": {k: v for k, v in attrs.items() if k != "weight"}}
    f = build_node(node, [None, None, None], {"": 18})
    return lambda x, w, bias=None: f(x, w, bias) if bias is not None else f(x, w)


class LayerCounters:
    """One layer's counters. The session's own record of a layer (`ChunkedOps.layers`) holds what is
    fixed at build time (kind, tiers, fallback) and zero counts; each call counts in a copy of its
    own (`ChunkedOps.counters`), so concurrent calls never mix."""

    __slots__ = ("kind", "chunks_total", "chunks_read", "bytes_read", "macs", "dense_macs", "calls", "tiers",
                 "dense_fallback", "selected")

    def __init__(self, kind: str, chunks_total: int):
        self.kind = kind
        self.chunks_total = chunks_total
        self.chunks_read = 0
        self.bytes_read = 0
        self.macs = 0
        self.dense_macs = 0
        self.calls = 0
        self.tiers: set = set()
        self.dense_fallback = False
        self.selected = None  # chunk ids chosen (routed layers), for recall measurements

    def for_call(self) -> "LayerCounters":
        c = LayerCounters(self.kind, self.chunks_total)
        c.tiers, c.dense_fallback = self.tiers, self.dense_fallback
        return c

    def as_dict(self) -> dict:
        return {"kind": self.kind, "chunks_read": self.chunks_read, "chunks_total": self.chunks_total * max(self.calls, 1),
                "bytes_read": self.bytes_read, "macs": self.macs, "dense_macs": self.dense_macs,
                "tiers": sorted(self.tiers), "dense_fallback": self.dense_fallback}


class WeightStore:
    def __init__(self, bundle: Bundle, cache: ChunkCache, tau: float = 0.0):
        self.b = bundle
        self.cache = cache
        self.tau = tau

    def _prune(self, e: TensorEntry, a: np.ndarray) -> np.ndarray:
        if self.tau <= 0:
            return a
        absmax = e.meta.get("absmax")
        cut = self.tau * float(absmax if absmax is not None else np.abs(a).max())
        return np.where(np.abs(a) < cut, np.float32(0), a)

    def skipped_by_tau(self, e: TensorEntry) -> np.ndarray:
        """Chunks whose largest |w| is below tau·max|W|: all zero after pruning, never read."""
        cm = e.meta.get("chunk_absmax")
        empty = np.asarray(next(iter(e.tiers.values()))) < 0
        if self.tau <= 0 or cm is None:
            return empty
        return empty | (np.asarray(cm) < self.tau * float(e.meta["absmax"]))

    def chunks(self, e: TensorEntry, ids, tiers: list[str]) -> list[np.ndarray]:
        """Decoded blocks [rows_c, K] for chunk ids, each at tiers[id]; missing ones read in one pass."""
        keys = [(e.name, tiers[i], int(i), self.tau) for i in ids]
        out: list = [self.cache.get(k) for k in keys]
        missing = [j for j, a in enumerate(out) if a is None]
        if missing:
            pids = {}
            for j in missing:
                i = int(ids[j])
                pids[j] = e.chunk_pids(tiers[i], i)  # one payload, or a nested chunk's planes (#5)
            data = self.b.read_payloads([p for ps in pids.values() for p in ps]) if pids else {}
            for j in missing:
                i = int(ids[j])
                a = self._prune(e, self.b.decode_chunk(e, i, tiers[i], data))
                self.cache.put(keys[j], a)
                out[j] = a
        return out

    def slices(self, e: TensorEntry, ids, extra: TensorEntry | None = None):
        """`ids` in consecutive slices whose decoded chunks (of `e`, and of `extra` beside it) fit the
        budget: all at once when unbounded, so fetching stays one merged read in the common case."""
        ids = np.asarray(ids)
        if self.cache.budget is None:
            yield ids
            return
        room = max(self.cache.budget - self.cache.pinned_bytes, 1)
        per_row = 4 * (e.row_len + (extra.row_len if extra is not None else 0))
        start, used = 0, 0
        for j, i in enumerate(ids):
            n = per_row * int(e.bounds[i + 1] - e.bounds[i])
            if j > start and used + n > room:
                yield ids[start:j]
                start, used = j, 0
            used += n
        if start < len(ids):
            yield ids[start:]

    def fits(self, e: TensorEntry) -> bool:
        """Whether the whole decoded tensor fits in the cache beside what is pinned."""
        return self.cache.budget is None or 4 * e.rows * e.row_len <= self.cache.budget - self.cache.pinned_bytes

    def full(self, e: TensorEntry, tiers: list[str]) -> np.ndarray:
        """The whole weight as one cached block in its stored shape ([R, K] for linear: use `.T` in
        products; BLAS takes the transposed view at the same speed, so no transposed copy is made)."""
        key = (e.name, "full", tuple(tiers), self.tau)
        a = self.cache.get(key)
        if a is None:
            data = self.b.read_payloads([p for i in range(e.n_chunks) for p in e.chunk_pids(tiers[i], i)])
            # Decode chunk by chunk straight into the result, dropping each payload once decoded:
            # the peak is the result plus one chunk, not three copies of the layer.
            a = np.empty((e.rows, e.row_len), np.float32)
            for i in range(e.n_chunks):
                a[e.bounds[i] : e.bounds[i + 1]] = self._prune(e, self.b.decode_chunk(e, i, tiers[i], data))
                for p in e.chunk_pids(tiers[i], i):
                    data.pop(p, None)
            a = a.reshape(e.shape)
            self.cache.put(key, a)
        return a


class ChunkedOps:
    """Builders for the nadoo ops of one session (see engine.Plan custom_ops)."""

    def __init__(self, bundle: Bundle, policy: Policy, cache: ChunkCache, profile: dict | None):
        self.b = bundle
        self.policy = policy
        self.store = WeightStore(bundle, cache, policy.tau)
        self.profile = (profile or {}).get("layers", {})
        self.layers: dict[str, LayerCounters] = {}
        self.tiers_of: dict[str, list[str]] = {}

    def builders(self) -> dict:
        return {("nadoo", "ChunkedLinear"): self._linear, ("nadoo", "ChunkedGather"): self._gather,
                ("nadoo", "ChunkedConv"): self._conv, ("nadoo", "ChunkedFFN"): self._ffn}

    def _entry(self, node, key: str = "weight") -> tuple[TensorEntry, LayerCounters, list[str], dict]:
        e = self.b.tensors.get(node["attrs"][key])
        if e is None:
            raise InputError(f"graph names weight {node['attrs'][key]!r}, which the bundle does not hold")
        prof = self.profile.get(e.name, {})
        act = np.asarray(prof["chunk_activity"]) if "chunk_activity" in prof else None
        tiers = self.policy.tiers_for(e, set(e.tiers), act)
        c = self.layers.get(e.name)  # a tied LM head reads the embedding's tensor: one record per tensor
        if c is None:
            c = self.layers[e.name] = LayerCounters(e.kind, e.n_chunks)
        c.tiers = set(tiers)
        self.tiers_of[e.name] = tiers
        return e, c, tiers, prof

    def pin_hot(self, budget_bytes: int) -> int:
        """Load the calibration profile's hottest chunks of routed layers into the cache for good
        (they are needed by most inputs), hottest first, until `budget_bytes` are pinned."""
        cands = []
        for name, c in self.layers.items():
            e, prof = self.b.tensors[name], self.profile.get(name, {})
            if not prof.get("routable") or "chunk_activity" not in prof:
                continue
            act = np.asarray(prof["chunk_activity"], dtype=float)
            share = act / max(act.sum(), 1e-30)
            group = [e] + [self.b.tensors[d] for d, p in self.profile.items() if p.get("group_of") == name]
            cands += [(share[i], i, group) for i in range(e.n_chunks)]
        pinned = 0
        for _, i, group in sorted(cands, key=lambda t: -t[0]):
            for e in group:
                tiers = self.tiers_of.get(e.name) or self.tiers_of[group[0].name]
                key = (e.name, tiers[i], int(i), self.store.tau)
                a = self.store.chunks(e, [i], tiers)[0]
                if pinned + a.nbytes > budget_bytes or not self.store.cache.pin(key, a):
                    return pinned
                pinned += a.nbytes
        return pinned

    @staticmethod
    def counters(c: LayerCounters) -> LayerCounters:
        """The current call's counters of layer `c` (a throwaway copy outside a call)."""
        cs = callstats.current()
        if cs is None:
            return c.for_call()
        lc = cs.layers.get(c)
        if lc is None:
            lc = cs.layers[c] = c.for_call()
        return lc

    def _count(self, c: LayerCounters, before: int, n_chunks: int, macs: int, dense_macs: int) -> None:
        lc = self.counters(c)
        lc.calls += 1
        lc.chunks_read += n_chunks
        lc.bytes_read += callstats.bytes_read() - before
        lc.macs += macs
        lc.dense_macs += dense_macs

    def _selection(self, e: TensorEntry, prof: dict, c: LayerCounters):
        """Static part of the choice: None = dense, else the chunk ids kept on every call."""
        skip = self.store.skipped_by_tau(e)
        routable = bool(e.meta.get("routable", prof.get("routable", False)))
        if self.policy.kind == "topk" and routable:
            if prof.get("concentration", 1.0) < self.policy.fallback:
                c.dense_fallback = True
            elif self.policy.predictor != "oracle":  # linear layers have no sketch: static profile
                act = np.asarray(prof.get("chunk_activity", np.ones(e.n_chunks)), dtype=float)
                act = np.where(skip, -np.inf, act)
                keep = np.sort(np.argsort(-act, kind="stable")[: self.policy.k_for(e.n_chunks)])
                return keep[~skip[keep]]
            else:
                return "oracle"
        if skip.any():
            return np.flatnonzero(~skip)
        return None

    def _linear(self, node, ctx):
        e, c, tiers, prof = self._entry(node)
        sel = self._selection(e, prof, c)
        store, b, bounds, K, R = self.store, self.b, e.bounds, e.row_len, e.rows
        policy = self.policy

        def rows_of(ids):
            return np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i in ids])

        fits = store.fits(e)

        def dense(x, bias=None):
            if not fits:  # larger than the budget: stream it, a budget-sized slice of chunks at a time
                return partial(x, np.arange(e.n_chunks), bias, callstats.bytes_read())
            before = callstats.bytes_read()
            y = linear(x, store.full(e, tiers).T, bias)
            pos = x.size // K
            self._count(c, before, e.n_chunks, pos * R * K, pos * R * K)
            return y

        def partial(x, ids, bias, before):
            # Skipped rows output their bias alone: exact for pruned (all-zero) chunks. Each kept
            # block writes its own output columns (no per-call concatenation of weights).
            y = np.zeros(x.shape[:-1] + (R,), np.float32)
            if bias is not None:
                y += bias
            for part in store.slices(e, ids):
                for i, w in zip(part, store.chunks(e, part, tiers)):
                    y[..., bounds[i] : bounds[i + 1]] += np.matmul(x, w.T)
            pos = x.size // K
            rows = int(sum(bounds[i + 1] - bounds[i] for i in ids))
            self._count(c, before, len(ids), pos * rows * K, pos * R * K)
            return y

        if sel is None or (not isinstance(sel, str) and len(sel) == e.n_chunks):
            return dense
        if isinstance(sel, str):  # oracle: exact product, then keep the k chunks with most energy
            def oracle(x, bias=None):
                before = callstats.bytes_read()
                full = linear(x, store.full(e, tiers).T, bias)
                fb = full.reshape(full.shape[0] if full.ndim > 1 else 1, -1, R)
                energy = np.add.reduceat(np.einsum("bpr,bpr->br", fb, fb), bounds[:-1], axis=1)
                keep = np.unique(np.argsort(-energy, axis=1, kind="stable")[:, : policy.k_for(e.n_chunks)])
                y = np.zeros_like(full) if bias is None else np.broadcast_to(bias, full.shape).copy()
                rows = rows_of(keep)
                y[..., rows] = full[..., rows]
                c.selected = self.counters(c).selected = keep  # the layer's: the last call's, any thread
                pos = x.size // K
                self._count(c, before, e.n_chunks, pos * R * K, pos * R * K)
                return y
            return oracle
        if len(sel) == 0:
            def zeros(x, bias=None):
                self._count(c, callstats.bytes_read(), 0, 0, (x.size // K) * R * K)
                y = np.zeros(x.shape[:-1] + (R,), np.float32)
                return y + bias if bias is not None else y  # every chunk pruned away: only the bias is left
            return zeros
        return lambda x, bias=None: partial(x, sel, bias, callstats.bytes_read())

    def _gather(self, node, ctx):
        e, c, tiers, _ = self._entry(node)
        store, b, bounds, n = self.store, self.b, e.bounds, e.rows

        def run(idx):
            before = callstats.bytes_read()
            idx = np.asarray(idx)
            if idx.dtype.kind not in "iu":
                raise InputError(f"{node['name']}: indices must be integers, got {idx.dtype}")
            if idx.size and (idx.min() < -n or idx.max() >= n):
                raise InputError(f"{node['name']}: index out of range for {n} rows")
            if idx.size == 0:
                self._count(c, before, 0, 0, 0)
                return np.empty(idx.shape + e.shape[1:], np.float32)
            flat = np.where(idx < 0, idx + n, idx).reshape(-1)
            chunk_of = np.searchsorted(bounds, flat, side="right") - 1
            ids = np.unique(chunk_of)
            blocks = store.chunks(e, ids, tiers)
            table = np.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0]
            base = np.zeros(e.n_chunks, np.int64)
            base[ids] = np.concatenate([[0], np.cumsum(np.diff(bounds)[ids])[:-1]])
            out = table[flat - bounds[chunk_of] + base[chunk_of]]
            self._count(c, before, len(ids), 0, 0)
            return out.reshape(idx.shape + e.shape[1:])
        return run

    def _conv(self, node, ctx):
        e, c, tiers, _ = self._entry(node)
        store, b = self.store, self.b
        conv = conv_fn(node["attrs"])

        def run(x, bias=None):
            before = callstats.bytes_read()
            y = conv(x, store.full(e, tiers), bias)
            macs = int(y.size) * e.row_len  # N·P·Cout output values, each a K-long dot product
            self._count(c, before, e.n_chunks, macs, macs)
            return y
        return run

    def _ffn(self, node, ctx):
        """act(x·Upᵀ + b1)·Down + b2 over neuron groups. Inputs: x, b1, b2, and (constants written by
        the compiler) the predictor sketch P [K, r], Q [r, R] and each neuron's |down row|² E [R]."""
        up, c, tiers, prof = self._entry(node, "up")
        down = self.b.tensors[node["attrs"]["down"]]
        act_prof = np.asarray(prof["chunk_activity"]) if "chunk_activity" in prof else None
        tiers_d = self.policy.tiers_for(down, set(down.tiers), act_prof)  # its own tiers (e.g. --bits alloc)
        self.tiers_of[down.name] = tiers_d
        c.tiers |= set(tiers_d)
        if not np.array_equal(up.bounds, down.bounds):
            raise InputError(f"{node['name']}: up and down projections are chunked differently")
        act = activation(node["attrs"]["activation"])
        store, b, bounds, policy = self.store, self.b, up.bounds, self.policy
        K, R, N, n = up.row_len, up.rows, down.row_len, up.n_chunks
        P, Q, E = ctx.const(3), ctx.const(4), ctx.const(5)
        if P is not None:  # stored as float16; computed in float32 (converted once, here)
            P, Q = P.astype(np.float32), Q.astype(np.float32)
        E = np.ones(R, np.float32) if E is None else E
        # A group contributes nothing only when its *down* chunk is empty: an emptied up chunk still
        # adds act(b1)·down for its neurons (its up rows decode to zeros, so computing it is exact).
        skip = store.skipped_by_tau(down)
        routable = bool(up.meta.get("routable", prof.get("routable", False)))
        routed = policy.kind == "topk" and routable
        if routed and prof.get("concentration", 1.0) < policy.fallback:
            c.dense_fallback, routed = True, False
        k = policy.k_for(n) if routed else n
        predictor = policy.predictor
        if predictor == "auto":
            predictor = "sketch" if P is not None else "static"

        fits = store.fits(up) and store.fits(down)
        all_ids = np.arange(n)

        def dense(x, b1=None, b2=None, *_):
            if not fits:  # the layer is larger than the budget: stream it group by group
                return groups(x, all_ids, b1, b2, 0, callstats.bytes_read())
            before = callstats.bytes_read()
            h = act(linear(x, store.full(up, tiers).T, b1))
            y = linear(h, store.full(down, tiers_d), b2)
            pos = x.size // K
            self._count(c, before, n, pos * R * (K + N), pos * R * (K + N))
            return y

        def groups(x, ids, b1, b2, extra_macs, before):
            ids = ids[~skip[ids]]
            pos = x.size // K
            c.selected = self.counters(c).selected = ids  # the layer's: the last call's, any thread
            if len(ids) == 0:
                self._count(c, before, 0, extra_macs, pos * R * (K + N))
                y = np.zeros(x.shape[:-1] + (N,), np.float32)
                return y + b2 if b2 is not None else y
            if len(ids) == n and fits:  # every group selected (e.g. a batch's union): the dense path is the same, faster
                y = dense(x, b1, b2)
                self.counters(c).macs += extra_macs
                return y
            # Group by group, accumulating: concatenating the selected blocks first would copy
            # every selected weight on every call (measured: most of a top-k call on a wide MLP).
            # Groups are fetched a budget-sized slice at a time, so a layer larger than the budget streams.
            y = None
            for sl in store.slices(up, ids, extra=down):
                for i, wu, wd in zip(sl, store.chunks(up, sl, tiers), store.chunks(down, sl, tiers_d)):
                    lo, hi = bounds[i], bounds[i + 1]
                    part = act(linear(x, wu.T, None if b1 is None else b1[lo:hi])) @ wd
                    y = part if y is None else np.add(y, part, out=y)
            if b2 is not None:
                y += b2
            rows = int(sum(bounds[i + 1] - bounds[i] for i in ids))
            self._count(c, before, len(ids), pos * rows * (K + N) + extra_macs, pos * R * (K + N))
            return y

        def chunk_scores(z):
            """Per sample (leading axis) and chunk: predicted output energy Σ act(z)²·|down row|²."""
            hz = act(z.reshape(z.shape[0], -1, R))
            return np.add.reduceat(np.einsum("bpr,bpr->br", hz, hz) * E, bounds[:-1], axis=1)

        def top_union(scores):
            """Each sample keeps its own k best groups; a batch reads the union of them."""
            top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            return np.unique(top)

        if not routed:
            if skip.any():  # tau emptied some groups: skip them, exactly
                keep_all = np.arange(n)
                return lambda x, b1=None, b2=None, *_: groups(x, keep_all, b1, b2, 0, callstats.bytes_read())
            return dense
        if predictor == "oracle":
            def oracle(x, b1=None, b2=None, *_):
                before = callstats.bytes_read()
                z = linear(x, store.full(up, tiers).T, b1)
                keep = top_union(chunk_scores(z))
                y = groups(x, keep, b1, b2, (x.size // K) * R * K, before)
                lc = self.counters(c)
                lc.chunks_read += n - len(lc.selected)  # deciding needed every up chunk
                return y
            return oracle
        if predictor == "static" or P is None:
            act_static = np.asarray(prof.get("chunk_activity", np.ones(n)), dtype=float)
            keep_static = np.sort(np.argsort(-act_static, kind="stable")[:k])
            return lambda x, b1=None, b2=None, *_: groups(x, keep_static, b1, b2, 0, callstats.bytes_read())

        def sketched(x, b1=None, b2=None, *_):
            before = callstats.bytes_read()
            z = (x @ P) @ Q
            if b1 is not None:
                z += b1
            keep = top_union(chunk_scores(z))
            return groups(x, keep, b1, b2, (x.size // K) * P.shape[1] * (K + R), before)
        return sketched
