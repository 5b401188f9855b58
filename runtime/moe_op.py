"""`nadoo.MoE`: dense router, then only the experts the router picks are read, decoded and computed.

Per call (tokens x [N, H]):
1. logits = x·Wrᵀ (+b) (the router is small and inline); experts disabled by the user get −inf, so
   routing renormalises over the rest; top-k and softmax weights exactly as the source block
   (softmax before top-k with optional renormalisation, or softmax over the top-k logits).
2. The union of picked experts is looked up in the expert cache; the missing ones are read in one pass
   of merged positioned reads (an expert's matrices are adjacent in the file) and decoded once.
3. Each expert runs on its tokens only; outputs are combined with the routing weights.
4. Optionally (`prefetch`) the *next* MoE layer's router is applied to this layer's input and its
   likely experts are loaded into the cache ahead of use; the next call scores that guess.

Precision: one tier for all experts (`--bits 8/4/2/float`; `--bits alloc`: the quantized tier that
fits the allocation's bits/weight budget), or with `--bits auto` each token's expert at 8 bits when
its routing weight is ≥ 0.5 and 4 bits otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .cache import ChunkCache
from .errors import InputError
from .policy import BITS_TO_TIER


# -- the math (shared with the compiler's calibration and reference checks) -------------------------
def activation(name: str, h: np.ndarray) -> np.ndarray:
    if name == "silu":
        return h / (1.0 + np.exp(-h))
    if name == "relu":
        return np.maximum(h, 0)
    if name == "gelu":
        from .ops.elementwise import erf  # the engine's float32 erf (NumPy has none)

        return 0.5 * h * (1.0 + erf(h * np.float32(np.sqrt(0.5))))
    if name == "gelu_tanh":
        c = np.float32(np.sqrt(2.0 / np.pi))
        return 0.5 * h * (1.0 + np.tanh(c * (h + np.float32(0.044715) * h * h * h)))
    raise InputError(f"unknown MoE activation {name!r}")


def softmax(z: np.ndarray) -> np.ndarray:
    m = np.max(z, axis=-1, keepdims=True)
    e = np.exp(z - m)
    return e / e.sum(-1, keepdims=True)


def route(logits: np.ndarray, top_k: int, softmax_order: str, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """(indices [N, k], weights [N, k] float32). Masked experts carry −inf logits."""
    logits = logits.astype(np.float32, copy=False)
    if softmax_order == "before":
        p = softmax(logits)
        idx = np.argsort(-p, axis=1, kind="stable")[:, :top_k]
        val = np.take_along_axis(p, idx, 1)
        if normalize:
            val = val / val.sum(-1, keepdims=True)
    else:
        idx = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
        val = softmax(np.take_along_axis(logits, idx, 1))
    return idx, val.astype(np.float32)


def expert_forward(x: np.ndarray, block: np.ndarray, act: str, gated: bool, b1=None, b3=None, b2=None) -> np.ndarray:
    """One expert on tokens x [n, H]; block = [w1, (w3,) w2ᵀ] each [F, H] (see MoEEntry.decode)."""
    if gated:
        F = block.shape[1]
        hu = x @ block[:2].reshape(2 * F, -1).T  # gate and up in one product
        h, u = hu[:, :F], hu[:, F:]
        if b1 is not None:
            h = h + b1
        if b3 is not None:
            u = u + b3
        h = activation(act, h) * u
    else:
        h = x @ block[0].T
        if b1 is not None:
            h = h + b1
        h = activation(act, h)
    y = h @ block[-1]
    if b2 is not None:
        y += b2
    return y


# -- cache ------------------------------------------------------------------------------------------
class ExpertCache(ChunkCache):
    """ChunkCache whose eviction weighs usage frequency: among the `window` least recently used
    entries, the least frequently used goes first (ties: the older). Frequencies survive eviction and
    halve every `decay` lookups, so a once-hot expert does not stay pinned forever. Same hard budget."""

    def __init__(self, budget_bytes: int | None = None, window: int = 8, decay: int = 4096):
        super().__init__(budget_bytes)
        self.window = window
        self.decay = decay
        self.freq: dict = {}
        self._ticks = 0

    def _touch(self, key) -> None:
        self.freq[key] = self.freq.get(key, 0.0) + 1.0
        self._ticks += 1
        if self._ticks >= self.decay:
            self._ticks = 0
            self.freq = {k: v / 2 for k, v in self.freq.items() if v >= 0.5}

    def get(self, key):
        with self.lock:  # the frequencies change with every lookup: same lock as the entries
            self._touch(key)
            return super().get(key)

    def _victim(self):
        oldest = []
        for k in self._items:  # OrderedDict: least recently used first
            oldest.append(k)
            if len(oldest) >= self.window:
                break
        return min(oldest, key=lambda k: self.freq.get(k, 0.0))  # min keeps the first (oldest) on ties


# -- options ----------------------------------------------------------------------------------------
@dataclass
class MoEOptions:
    disable: list = field(default_factory=list)  # [(layer, expert)]; layer = index in graph order or name
    only: list = field(default_factory=list)  # [(layer, expert)]: in each named layer, only these
    prefetch: bool = False
    auto_threshold: float = 0.5  # --bits auto: routing weight ≥ this → 8 bits, else 4

    @staticmethod
    def parse_pairs(text: str | None) -> list:
        """'0:3,1:5' or 'model.layers.0.mlp:3' → [(0, 3), (1, 5)]."""
        if not text:
            return []
        out = []
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            layer, sep, e = part.rpartition(":")
            if not sep or not layer:
                raise InputError(f"expert {part!r}: use LAYER:EXPERT, e.g. 0:3")
            try:
                ex = int(e)
            except ValueError:
                raise InputError(f"expert {part!r}: the expert must be an integer") from None
            out.append((int(layer) if layer.isdigit() else layer, ex))
        return out


class _Layer:
    __slots__ = ("entry", "idx", "node", "router_w", "router_b", "b1", "b3", "b2", "enabled", "top_k", "usage",
                 "tokens", "calls", "bytes_read", "bytes_needed", "hits", "misses", "predicted", "pf_hits", "pf_total",
                 "pf_needed", "tiers")

    def __init__(self, entry, idx):
        self.entry, self.idx = entry, idx
        self.predicted = None
        self.reset()

    def reset(self):
        E = self.entry.n_experts
        self.usage = np.zeros(E, np.int64)
        self.tokens = self.calls = self.bytes_read = self.bytes_needed = self.hits = self.misses = 0
        self.pf_hits = self.pf_total = self.pf_needed = 0
        self.tiers: set = set()


class MoEOps:
    """Builder of the `nadoo.MoE` op for one session, and its statistics."""

    def __init__(self, bundle, policy, cache: ChunkCache, options: MoEOptions | None = None):
        self.b = bundle
        self.policy = policy
        self.cache = cache
        self.opts = options or MoEOptions()
        self.layers: list[_Layer] = []
        self.prefetch_bytes = 0
        self._check_pairs()

    def builders(self) -> dict:
        return {("nadoo", "MoE"): self._build}

    def _check_pairs(self) -> None:
        names = list(self.b.moe)
        for layer, e in self.opts.disable + self.opts.only:
            name = names[layer] if isinstance(layer, int) and 0 <= layer < len(names) else layer
            if name not in self.b.moe:
                raise InputError(f"no MoE layer {layer!r} (the bundle has {len(names)}: 0..{len(names) - 1} or {names[:3]}…)")
            if not 0 <= e < self.b.moe[name].n_experts:
                raise InputError(f"MoE layer {layer}: expert {e} out of range 0..{self.b.moe[name].n_experts - 1}")

    def _enabled(self, entry, idx: int) -> np.ndarray:
        E = entry.n_experts
        keys = (idx, entry.name)
        on = np.ones(E, bool)
        only = [e for layer, e in self.opts.only if layer in keys]
        if only:
            on[:] = False
            on[only] = True
        for layer, e in self.opts.disable:
            if layer in keys:
                on[e] = False
        if not on.any():
            raise InputError(f"MoE layer {idx} ({entry.name}): every expert is disabled")
        return on

    def _tier_of(self, entry, weights: np.ndarray) -> list[str]:
        if self.policy.bits == "auto":
            hi, lo = ("q8" if "q8" in entry.tiers else entry.tiers[-1]), ("q4" if "q4" in entry.tiers else entry.tiers[-1])
            return np.where(weights >= self.opts.auto_threshold, hi, lo).tolist()
        return [self._fixed_tier(entry)] * len(weights)

    def _fixed_tier(self, entry) -> str:
        """The one tier of a layer's experts under --bits 8/4/2/float/alloc."""
        t = self._alloc_tier(entry) if self.policy.bits == "alloc" else BITS_TO_TIER[self.policy.bits]
        if t not in entry.tiers:
            hint = " (compile with --keep-float)" if t == "f32" else ""
            raise InputError(f"bundle stores no {t} tier for MoE layer {entry.name}{hint}")
        return t

    def _alloc_tier(self, entry) -> str:
        """The compile-time allocation (--bits-per-weight B) covers the chunked tensors, not experts:
        under --bits alloc experts run at the largest quantized tier whose bits fit B (q8 from 8
        bits/weight, q4 from 4, else q2), or the nearest one the layer stores."""
        alloc = self.b.index.get("alloc")
        budget = alloc.get("bits_per_weight") if isinstance(alloc, dict) else None
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise InputError("bundle stores no allocation (compile with --bits-per-weight)")
        want = "q8" if budget >= 8 else "q4" if budget >= 4 else "q2"
        near = {"q8": ("q8", "q4", "q2"), "q4": ("q4", "q8", "q2"), "q2": ("q2", "q4", "q8")}[want]
        return next((t for t in near if t in entry.tiers), want)

    def _fetch(self, L: _Layer, wanted: list[tuple[int, str]], prefetch: bool = False) -> dict:
        """Decoded expert blocks for (expert, tier) pairs: cache first, then one merged read."""
        entry = L.entry
        out, missing = {}, []
        for e, t in wanted:
            key = ("moe", entry.name, e, t)
            a = self.cache.get(key) if not prefetch else self.cache.peek(key)
            if a is None:
                missing.append((e, t))
            else:
                out[(e, t)] = a
            if not prefetch:
                L.bytes_needed += entry.expert_bytes(t)
                if a is None:
                    L.misses += 1
                else:
                    L.hits += 1
        if missing:
            before = self.b.bytes_read
            data = self.b.read_payloads([p for e, t in missing for p in entry.pids(e, t)])
            for e, t in missing:
                a = entry.decode(e, t, data)
                self.cache.put(("moe", entry.name, e, t), a)
                out[(e, t)] = a
            got = self.b.bytes_read - before
            if prefetch:
                self.prefetch_bytes += got
            L.bytes_read += got
        return out

    def _build(self, node, ctx):
        name = node.get("attrs", {}).get("moe")
        entry = self.b.moe.get(name)
        if entry is None:
            raise InputError(f"graph names MoE layer {name!r}, which the bundle does not hold")
        if self.policy.bits != "auto":
            self._fixed_tier(entry)  # a missing tier fails when the session opens, not mid-run
        L = _Layer(entry, len(self.layers))
        L.router_w, L.router_b = ctx.const(1), ctx.const(2)  # inline constants: known before any call (prefetch)
        self.layers.append(L)
        L.enabled = self._enabled(entry, L.idx)
        L.top_k = min(entry.top_k, int(L.enabled.sum()))
        masked = ~L.enabled
        layers = self.layers
        act, gated = entry.activation, entry.gated
        H = entry.hidden

        def logits_of(Lx: _Layer, xf):
            z = xf @ Lx.router_w.T
            if Lx.router_b is not None:
                z = z + Lx.router_b
            if (~Lx.enabled).any():
                z = np.where(Lx.enabled, z, np.float32(-np.inf))
            return z

        def run(x, router_w, router_b=None, w1=None, w3=None, w2=None, b1=None, b3=None, b2=None):
            L.router_w, L.router_b = router_w, router_b
            if x.shape[-1] != H:
                raise InputError(f"{node['name']}: MoE input has {x.shape[-1]} features, expected {H}")
            xf = x.reshape(-1, H).astype(np.float32, copy=False)
            idx, wts = route(logits_of(L, xf), L.top_k, entry.softmax_order, entry.normalize)
            used = np.unique(idx)
            if L.predicted is not None:  # score the previous layer's prefetch guess
                L.pf_hits += len(L.predicted & set(used.tolist()))
                L.pf_total += len(L.predicted)
                L.pf_needed += len(used)
                L.predicted = None
            plan = []  # (expert, tier, token ids, weights)
            for e in used.tolist():
                tok, slot = np.nonzero(idx == e)
                w = wts[tok, slot]
                tiers = self._tier_of(entry, w)
                for t in sorted(set(tiers)):
                    sel = np.asarray([tt == t for tt in tiers])
                    plan.append((e, t, tok[sel], w[sel]))
            blocks = self._fetch(L, [(e, t) for e, t, _, _ in plan])
            out = np.zeros_like(xf)
            for e, t, tok, w in plan:
                y = expert_forward(xf[tok], blocks[(e, t)], act, gated,
                                   None if b1 is None else b1[e], None if b3 is None else b3[e],
                                   None if b2 is None else b2[e])
                out[tok] += w[:, None] * y  # tokens are unique per expert: no index collisions
                L.tiers.add(t)
            L.usage += np.bincount(idx.reshape(-1), minlength=entry.n_experts)
            L.tokens += xf.shape[0]
            L.calls += 1
            if self.opts.prefetch and L.idx + 1 < len(layers):
                nxt = layers[L.idx + 1]
                if getattr(nxt, "router_w", None) is not None:  # known after its first call
                    pidx, pw = route(logits_of(nxt, xf), nxt.top_k, nxt.entry.softmax_order, nxt.entry.normalize)
                    pred = np.unique(pidx).tolist()
                    tiers = [self._tier_of(nxt.entry, np.array([pw[pidx == e].max()]))[0] for e in pred]
                    self._fetch(nxt, list(zip(pred, tiers)), prefetch=True)
                    nxt.predicted = set(pred)
            return out.reshape(x.shape)
        return run

    # -- statistics ---------------------------------------------------------------------------
    def reset(self) -> None:
        for L in self.layers:
            L.reset()
        self.prefetch_bytes = 0

    def stats(self) -> dict:
        layers = {}
        tot = dict(tokens=0, bytes_read=0, bytes_needed=0, all_bytes=0, hits=0, misses=0, pf_hits=0, pf_total=0,
                   pf_needed=0)
        for L in self.layers:
            e = L.entry
            tier = sorted(L.tiers)[0] if L.tiers else e.tiers[0]
            all_bytes = e.n_experts * e.expert_bytes(tier)  # every expert of the layer, once
            lk = L.hits + L.misses
            layers[e.name] = {
                "index": L.idx, "n_experts": e.n_experts, "top_k": L.top_k, "calls": L.calls, "tokens": L.tokens,
                "usage": L.usage.tolist(), "experts_used": int(np.count_nonzero(L.usage)),
                "enabled": L.enabled.tolist(), "tiers": sorted(L.tiers),
                "bytes_read": L.bytes_read,
                "all_expert_bytes": all_bytes,
                "cache_hit_rate": L.hits / lk if lk else None,
                "prefetch_precision": L.pf_hits / L.pf_total if L.pf_total else None,
                "prefetch_recall": L.pf_hits / L.pf_needed if L.pf_needed else None,
            }
            # bytes a token's own experts occupy (its k experts at the tiers used), from the usage counts
            per_tok = float((L.usage * e.expert_bytes(tier)).sum()) / max(L.tokens, 1)
            layers[e.name]["expert_bytes_per_token"] = per_tok
            tot["tokens"] = max(tot["tokens"], L.tokens)
            tot["bytes_read"] += L.bytes_read
            tot["bytes_needed"] += per_tok
            tot["all_bytes"] += all_bytes
            for k, v in (("hits", L.hits), ("misses", L.misses), ("pf_hits", L.pf_hits), ("pf_total", L.pf_total),
                         ("pf_needed", L.pf_needed)):
                tot[k] += v
        lk = tot["hits"] + tot["misses"]
        return {
            "layers": layers,
            "tokens": tot["tokens"],
            "expert_bytes_read": tot["bytes_read"],
            "expert_bytes_per_token": tot["bytes_needed"],
            "all_expert_bytes": tot["all_bytes"],
            "expert_fraction_per_token": tot["bytes_needed"] / tot["all_bytes"] if tot["all_bytes"] else None,
            "cache_lookups": lk,
            "cache_hit_rate": tot["hits"] / lk if lk else None,
            "prefetch": self.opts.prefetch,
            "prefetch_bytes": self.prefetch_bytes,
            "prefetch_precision": tot["pf_hits"] / tot["pf_total"] if tot["pf_total"] else None,
            "prefetch_recall": tot["pf_hits"] / tot["pf_needed"] if tot["pf_needed"] else None,
        }
