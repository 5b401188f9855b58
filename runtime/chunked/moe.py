"""`nadoo.MoE`: dense router, then only the experts the router picks are read, decoded and computed.

Per call (tokens x [N, H]):
1. logits = x·Wrᵀ (+b) (the router is small and inline); experts the policy disables get −inf, so
   routing renormalises over the rest; top-k and softmax weights exactly as the source block
   (softmax before top-k with optional renormalisation, or softmax over the top-k logits).
2. The union of picked experts is looked up in the cache; the missing ones are read in one pass
   of merged positioned reads (an expert's matrices are adjacent in the file) and decoded once.
3. Each expert runs on its tokens only; outputs are combined with the routing weights.
4. Optionally (`Policy.prefetch`) the *next* MoE layer's router is applied to this layer's input and
   its likely experts are loaded into the cache ahead of use; that layer scores the guess.

Precision: `Policy.expert_tiers` (one tier for all experts, or by routing weight under --bits auto).
Experts are reused unevenly, so the session's cache evicts frequency-aware when the graph has MoE
nodes. Everything a call counts (usage, bytes, hits, prefetch guess and score) is that call's own.
"""

from __future__ import annotations

import numpy as np

from .. import callstats
from ..activations import activation
from ..cache import FrequencyAware
from ..errors import InputError
from .base import ChunkedOp, register, unique_ids


# -- the math (shared with the compiler's calibration and reference checks) -------------------------
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


def expert_hidden(x: np.ndarray, block: np.ndarray, act: str, gated: bool, b1=None, b3=None) -> np.ndarray:
    """An expert's hidden activations on tokens x [n, H]: act(x·w1ᵀ + b1) (· (x·w3ᵀ + b3) if gated);
    block = [w1, (w3,) w2ᵀ] each [F, H] (see MoEEntry.decode)."""
    if gated:
        F = block.shape[1]
        hu = x @ block[:2].reshape(2 * F, -1).T  # gate and up in one product
        h, u = hu[:, :F], hu[:, F:]
        if b1 is not None:
            h = h + b1
        if b3 is not None:
            u = u + b3
        return activation(act)(h) * u
    h = x @ block[0].T
    if b1 is not None:
        h = h + b1
    return activation(act)(h)


def expert_forward(x: np.ndarray, block: np.ndarray, act: str, gated: bool, b1=None, b3=None, b2=None) -> np.ndarray:
    """One expert on tokens x [n, H]."""
    y = expert_hidden(x, block, act, gated, b1, b3) @ block[-1]
    if b2 is not None:
        y += b2
    return y


class _Call:
    """What one call counted for one MoE layer."""

    __slots__ = ("usage", "tokens", "calls", "bytes_read", "bytes_needed", "hits", "misses", "predicted",
                 "pf_hits", "pf_total", "pf_needed", "pf_bytes", "tiers")

    def __init__(self, n_experts: int):
        self.usage = np.zeros(n_experts, np.int64)
        self.tokens = self.calls = self.bytes_read = self.bytes_needed = self.hits = self.misses = 0
        self.predicted = None  # experts the previous layer prefetched for this one, this call
        self.pf_hits = self.pf_total = self.pf_needed = self.pf_bytes = 0
        self.tiers: set = set()


@register
class MoE(ChunkedOp):
    op_type = "MoE"
    cache_victim = FrequencyAware

    def bind(self, node, ctx, env):
        name = node.get("attrs", {}).get("moe")
        entry = env.bundle.moe.get(name)
        if entry is None:
            raise InputError(f"graph names MoE layer {name!r}, which the bundle does not hold")
        self.entry = entry
        self.alloc = env.bundle.index.get("alloc")
        env.policy.expert_tiers(entry, np.ones(1, np.float32), self.alloc)  # a missing tier fails at open, not mid-run
        self.idx = sum(isinstance(op, MoE) for op in env.ops)  # MoE layer index, graph order
        self.router_w, self.router_b = ctx.const(1), ctx.const(2)  # inline constants: known before any call (prefetch)
        self.enabled = env.policy.experts_enabled(self.idx, entry.name, entry.n_experts)
        self.top_k = min(entry.top_k, int(self.enabled.sum()))

    def state(self) -> _Call:
        return callstats.state_for(self, lambda: _Call(self.entry.n_experts))

    def _logits(self, xf):
        z = xf @ self.router_w.T
        if self.router_b is not None:
            z = z + self.router_b
        if (~self.enabled).any():
            z = np.where(self.enabled, z, np.float32(-np.inf))
        return z

    def _route(self, xf):
        return route(self._logits(xf), self.top_k, self.entry.softmax_order, self.entry.normalize)

    def _fetch(self, wanted: list[tuple[int, str]], st: _Call, prefetch: bool = False) -> dict:
        """Decoded expert blocks for (expert, tier) pairs: cache first, then one merged read."""
        entry, store = self.entry, self.env.store
        before = callstats.bytes_read()
        blocks, missing = store.fetch([store.key(entry.name, t, ("expert", e)) for e, t in wanted],
                                      lambda j: entry.pids(*wanted[j]),
                                      lambda j, data: entry.decode(*wanted[j], data), peek=prefetch)
        got = callstats.bytes_read() - before
        st.bytes_read += got
        if prefetch:
            st.pf_bytes += got
        else:
            st.bytes_needed += sum(entry.expert_bytes(t) for _, t in wanted)
            st.misses += len(missing)
            st.hits += len(wanted) - len(missing)
        return dict(zip(wanted, blocks))

    def __call__(self, x, router_w, router_b=None, w1=None, w3=None, w2=None, b1=None, b3=None, b2=None):
        entry, H = self.entry, self.entry.hidden
        # The router is an inline constant (the same arrays on every call); recorded for a router that
        # is not, whose weights the previous layer's prefetch then learns from a call before.
        self.router_w, self.router_b = router_w, router_b
        if x.shape[-1] != H:
            raise InputError(f"{self.node['name']}: MoE input has {x.shape[-1]} features, expected {H}")
        st = self.state()
        xf = x.reshape(-1, H).astype(np.float32, copy=False)
        idx, wts = self._route(xf)
        used = unique_ids(idx)
        if st.predicted is not None:  # score the previous layer's prefetch guess
            st.pf_hits += len(st.predicted & set(used.tolist()))
            st.pf_total += len(st.predicted)
            st.pf_needed += len(used)
            st.predicted = None
        plan = []  # (expert, tier, token ids, weights)
        for e in used.tolist():
            tok, slot = np.nonzero(idx == e)
            w = wts[tok, slot]
            tiers = self.env.policy.expert_tiers(entry, w, self.alloc)
            for t in sorted(set(tiers)):
                sel = np.asarray([tt == t for tt in tiers])
                plan.append((e, t, tok[sel], w[sel]))
        blocks = self._fetch([(e, t) for e, t, _, _ in plan], st)
        out = np.zeros_like(xf)
        for e, t, tok, w in plan:
            y = expert_forward(xf[tok], blocks[(e, t)], entry.activation, entry.gated,
                               None if b1 is None else b1[e], None if b3 is None else b3[e],
                               None if b2 is None else b2[e])
            out[tok] += w[:, None] * y  # tokens are unique per expert: no index collisions
            st.tiers.add(t)
        st.usage += np.bincount(idx.reshape(-1), minlength=entry.n_experts)
        st.tokens += xf.shape[0]
        st.calls += 1
        if self.env.policy.prefetch:
            nxt = next((op for op in self.env.ops if isinstance(op, MoE) and op.idx == self.idx + 1), None)
            if nxt is not None:
                nxt._prefetch(xf)
        return out.reshape(x.shape)

    def _prefetch(self, xf) -> None:
        """Load the experts this layer's router would pick for the previous layer's input."""
        if self.router_w is None:  # a router that is not a constant is known after its first call
            return
        pidx, pw = self._route(xf)
        pred = unique_ids(pidx).tolist()
        tiers = [self.env.policy.expert_tiers(self.entry, np.array([pw[pidx == e].max()]), self.alloc)[0]
                 for e in pred]
        st = self.state()
        self._fetch(list(zip(pred, tiers)), st, prefetch=True)
        st.predicted = set(pred)

    # -- policy and statistics ------------------------------------------------------------------
    @classmethod
    def check_policy(cls, policy, bundle) -> None:
        if not bundle.moe:
            if policy.expert_options_set():
                raise InputError("--disable-experts/--only-experts/--prefetch need a bundle with MoE layers")
            return
        policy.check_experts({name: e.n_experts for name, e in bundle.moe.items()})

    @classmethod
    def extra_stats(cls, ops: list, call) -> dict:
        layers = {}
        tot = dict(tokens=0, bytes_read=0, bytes_needed=0, all_bytes=0, hits=0, misses=0, pf_hits=0, pf_total=0,
                   pf_needed=0, pf_bytes=0)
        for op in ops:
            e, L = op.entry, call.states.get(op) or _Call(op.entry.n_experts)
            tier = sorted(L.tiers)[0] if L.tiers else e.tiers[0]
            all_bytes = e.n_experts * e.expert_bytes(tier)  # every expert of the layer, once
            lk = L.hits + L.misses
            # bytes a token's own experts occupy (its k experts at the tiers used), from the usage counts
            per_tok = float((L.usage * e.expert_bytes(tier)).sum()) / max(L.tokens, 1)
            layers[e.name] = {
                "index": op.idx, "n_experts": e.n_experts, "top_k": op.top_k, "calls": L.calls, "tokens": L.tokens,
                "usage": L.usage.tolist(), "experts_used": int(np.count_nonzero(L.usage)),
                "enabled": op.enabled.tolist(), "tiers": sorted(L.tiers),
                "bytes_read": L.bytes_read,
                "all_expert_bytes": all_bytes,
                "cache_hit_rate": L.hits / lk if lk else None,
                "prefetch_precision": L.pf_hits / L.pf_total if L.pf_total else None,
                "prefetch_recall": L.pf_hits / L.pf_needed if L.pf_needed else None,
                "expert_bytes_per_token": per_tok,
            }
            tot["tokens"] = max(tot["tokens"], L.tokens)
            tot["bytes_read"] += L.bytes_read
            tot["bytes_needed"] += per_tok
            tot["all_bytes"] += all_bytes
            for k in ("hits", "misses", "pf_hits", "pf_total", "pf_needed", "pf_bytes"):
                tot[k] += getattr(L, k)
        lk = tot["hits"] + tot["misses"]
        return {"moe": {
            "layers": layers,
            "tokens": tot["tokens"],
            "expert_bytes_read": tot["bytes_read"],
            "expert_bytes_per_token": tot["bytes_needed"],
            "all_expert_bytes": tot["all_bytes"],
            "expert_fraction_per_token": tot["bytes_needed"] / tot["all_bytes"] if tot["all_bytes"] else None,
            "cache_lookups": lk,
            "cache_hit_rate": tot["hits"] / lk if lk else None,
            "prefetch": bool(ops) and ops[0].env.policy.prefetch,
            "prefetch_bytes": tot["pf_bytes"],
            "prefetch_precision": tot["pf_hits"] / tot["pf_total"] if tot["pf_total"] else None,
            "prefetch_recall": tot["pf_hits"] / tot["pf_needed"] if tot["pf_needed"] else None,
        }}

    @classmethod
    def summary(cls, stats: dict) -> str | None:
        m = stats.get("moe")
        if m is None:
            return None
        pct = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
        return (f"experts: {m['expert_bytes_per_token'] / 1024:.1f} KiB per token of {m['all_expert_bytes'] / 1024:.1f} KiB "
                f"({pct(m['expert_fraction_per_token'])}), read {m['expert_bytes_read'] / 1024:.1f} KiB, "
                f"cache hit rate {pct(m['cache_hit_rate'])}, prefetch precision {pct(m['prefetch_precision'])}")

    # -- nadoo info -----------------------------------------------------------------------------
    @classmethod
    def describe(cls, bundle, profile) -> dict | None:
        """Every MoE layer: its experts, stored bytes per tier, calibration usage per expert."""
        if not bundle.moe:
            return None
        usage = (profile or {}).get("moe", {})
        out = []
        for i, (name, e) in enumerate(bundle.moe.items()):
            u = usage.get(name, {})
            out.append({
                "index": i, "name": name, "n_experts": e.n_experts, "top_k": e.top_k, "hidden": e.hidden,
                "intermediate": e.intermediate, "gated": e.gated, "activation": e.activation,
                "softmax_order": e.softmax_order, "normalize": e.normalize,
                "expert_bytes": {t: e.expert_bytes(t) for t in e.tiers},
                "calibration_tokens": u.get("tokens"),
                "expert_frequency": u.get("expert_frequency"),  # share of tokens routed to each expert
                "mean_weight": u.get("mean_weight"),
            })
        return {"moe": out}

    @classmethod
    def format_description(cls, facts: dict) -> str | None:
        if not facts.get("moe"):
            return None
        out = ["mixture of experts (share of calibration tokens routed to each expert):"]
        for L in facts["moe"]:
            tiers = ", ".join(f"{t} {n / 1024:.1f} KiB" for t, n in L["expert_bytes"].items())
            out.append(f"  [{L['index']}] {L['name']}: {L['n_experts']} experts, top-{L['top_k']}, "
                       f"{'gated ' if L['gated'] else ''}{L['activation']}, {L['hidden']}x{L['intermediate']}; per expert: {tiers}")
            freq = L.get("expert_frequency")
            if freq:
                cells = " ".join(f"{e:>2}:{f:>5.1%}" for e, f in enumerate(freq))
                out.append(f"      usage over {L['calibration_tokens']} tokens  {cells}")
                never = [e for e, f in enumerate(freq) if f == 0]
                if never:
                    out.append(f"      never selected in calibration: {never}")
        return "\n".join(out)
