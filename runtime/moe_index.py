"""The `moe` index key of NDC 1.1 (format_spec/NDC-v1.md §4.5): experts stored as chunk groups.

Validated as strictly as the rest of the index, at open, before any payload is read: unique names,
counts in range, every expert complete and shaped alike, payload ids in range and referenced once,
every payload's raw length equal to its layout's length.
"""

from __future__ import annotations

import numpy as np

from .activations import ACTIVATIONS
from .errors import corrupt as _fail
from .format import MAX_DIM, MAX_NAME_LEN
from .schema import check_zp_tiers
from .tiers import TIERS, layouts_of

MAX_EXPERTS = 1 << 16


class ExpertMat:
    """One matrix of one expert, rows-first ([F, H] for w1/w3, [H, F] for w2)."""

    __slots__ = ("shape", "tiers", "layouts", "errors")

    def __init__(self, shape, md: dict, errors):
        self.shape = tuple(shape)
        self.tiers = {}  # tier -> payload id, filled as the reader checks them
        # experts store every tier separately (no nested planes): `tiers` and (1.2) `zp`
        self.layouts = {t: layout for t, (layout, _) in layouts_of(md).items()}
        self.errors = errors  # tier -> {"mse", "out_err"}

    def nbytes(self, tier: str, group_size: int) -> int:
        r, k = self.shape
        layout = self.layouts[tier]
        return layout.nbytes(tier, r, k, layout.group(k, group_size))

    def decode(self, tier: str, buf, group_size: int) -> np.ndarray:
        r, k = self.shape
        layout = self.layouts[tier]
        return layout.decode(tier, [buf], r, k, layout.group(k, group_size))


class MoEEntry:
    __slots__ = ("name", "n_experts", "top_k", "hidden", "intermediate", "gated", "activation", "softmax_order",
                 "normalize", "group_size", "experts", "mats", "tiers", "meta")

    def __init__(self, d: dict, experts: list[dict[str, ExpertMat]]):
        self.name = d["name"]
        self.n_experts = d["n_experts"]
        self.top_k = d["top_k"]
        self.hidden = d["hidden"]
        self.intermediate = d["intermediate"]
        self.gated = d["gated"]
        self.activation = d["activation"]
        self.softmax_order = d["softmax_order"]
        self.normalize = d["normalize"]
        self.group_size = d["group_size"]
        self.experts = experts
        self.mats = ("w1", "w3", "w2") if self.gated else ("w1", "w2")
        self.tiers = tuple(t for t in TIERS if t in experts[0]["w1"].tiers)
        self.meta = d

    def expert_bytes(self, tier: str) -> int:
        """Stored size of one expert at a tier (all its matrices)."""
        return sum(m.nbytes(tier, self.group_size) for m in self.experts[0].values())

    def pids(self, e: int, tier: str) -> list[int]:
        return [self.experts[e][m].tiers[tier] for m in self.mats]

    def decode(self, e: int, tier: str, data: dict) -> np.ndarray:
        """Expert e at a tier as one float32 block [n_mats, F, H]: w1, (w3,) w2ᵀ."""
        out = np.empty((len(self.mats), self.intermediate, self.hidden), np.float32)
        for j, m in enumerate(self.mats):
            mat = self.experts[e][m]
            a = mat.decode(tier, data[mat.tiers[tier]], self.group_size)
            out[j] = a.T if m == "w2" else a
        return out


def _int(d, key, lo, hi, what):
    v = d.get(key)
    if type(v) is not int or not lo <= v <= hi:
        _fail(f"{what}: {key} must be an int in [{lo}, {hi}], got {v!r}")
    return v


def validate_moe(bundle, items, used: set) -> dict[str, MoEEntry]:
    """Check the `moe` index list; `bundle.claim_payload` enforces id range and single reference."""
    if items is None:
        return {}
    if not isinstance(items, list):
        _fail("'moe' must be a list")
    out: dict[str, MoEEntry] = {}
    raw_len = bundle.table["raw"]
    for d in items:
        if not isinstance(d, dict):
            _fail("moe entry must be an object")
        name = d.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN:
            _fail(f"moe name must be a string of 1..{MAX_NAME_LEN} characters")
        if name in out:
            _fail(f"moe layer {name} listed twice")
        what = f"moe layer {name}"
        E = _int(d, "n_experts", 1, MAX_EXPERTS, what)
        _int(d, "top_k", 1, E, what)
        H = _int(d, "hidden", 1, MAX_DIM, what)
        F = _int(d, "intermediate", 1, MAX_DIM, what)
        G = _int(d, "group_size", 1, 1 << 16, what)
        if H * F > 1 << 34:
            _fail(f"{what}: expert matrices exceed the element cap")
        if not isinstance(d.get("gated"), bool) or not isinstance(d.get("normalize"), bool):
            _fail(f"{what}: gated and normalize must be booleans")
        if d.get("activation") not in ACTIVATIONS:
            _fail(f"{what}: unknown activation {d.get('activation')!r}")
        if d.get("softmax_order") not in ("before", "after"):
            _fail(f"{what}: softmax_order must be 'before' or 'after'")
        want = {"w1": [F, H], "w2": [H, F]}
        if d["gated"]:
            want["w3"] = [F, H]
        experts = d.get("experts")
        if not isinstance(experts, list) or len(experts) != E:
            _fail(f"{what}: experts must list n_experts = {E} entries")
        tier_set = None
        parsed = []
        for i, ex in enumerate(experts):
            t = ex.get("tensors") if isinstance(ex, dict) else None
            if not isinstance(t, dict) or set(t) != set(want):
                _fail(f"{what} expert {i}: tensors must be exactly {sorted(want)}")
            mats = {}
            for m, shape in want.items():
                md = t[m]
                if not isinstance(md, dict) or md.get("shape") != shape:
                    _fail(f"{what} expert {i} {m}: shape must be {shape}")
                tiers = md.get("tiers")
                zp = check_zp_tiers({**md, "group_size": G}, f"{what} expert {i} {m}")
                if (not isinstance(tiers, dict) or not (tiers or zp) or any(x not in TIERS for x in tiers)
                        or set(tiers) & set(zp)):
                    _fail(f"{what} expert {i} {m}: tiers must be a non-empty subset of {TIERS}, "
                          f"none also in zp")
                if tier_set is None:
                    tier_set = set(tiers) | set(zp)
                elif set(tiers) | set(zp) != tier_set:
                    _fail(f"{what} expert {i} {m}: every expert matrix must hold the same tiers")
                errors = md.get("errors", {})
                if not isinstance(errors, dict):
                    _fail(f"{what} expert {i} {m}: errors must be an object")
                mat = ExpertMat(shape, md, errors)
                for tier, pid in [*tiers.items(), *zp.items()]:
                    bundle.claim_payload(pid, f"{what} expert {i} {m} tier {tier}", used)
                    if int(raw_len[pid]) != mat.nbytes(tier, G):
                        _fail(f"{what} expert {i} {m} tier {tier}: payload length does not match the layout")
                    mat.tiers[tier] = pid
                mats[m] = mat
            parsed.append(mats)
        out[name] = MoEEntry(d, parsed)
    return out
