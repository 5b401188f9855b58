"""Run-time policies: which chunks of each weight tensor an input uses, and at which precision.

- `dense`: every chunk, one tier (8, 4, 2 bits, or float when the bundle keeps it) — the reference.
- `topk`: on each *routable* layer (decided at compile time from calibration evidence) keep the k
  (or fraction k) most active chunks; activity comes from a low-rank sketch of the layer fitted at
  compile time (`sketch`, per input, ~10 % of the layer's MACs), the calibration profile (`static`,
  the same chunks for every input), or the exact product (`oracle`, which reads everything and
  exists to measure the others' recall).
  A layer whose activity is spread out (profile concentration below `fallback`) stays dense.
- `tau`: boundary pruning at run time: |w| < tau·max|W| is dropped, and chunks whose largest weight
  is below that are never read.
- `bits="alloc"`: the per-chunk tiers chosen at compile time under a bits/weight budget.
- `bits="source"`: each tensor at the tier that holds the precision its source file stored it at
  (a GGUF's Q8_0 at 8 bits, Q5_0 at 5, …; runtime/tiers.py SOURCE_BITS).
- `bits="auto"`: precision by activity: the hottest quarter of a layer's chunks at 8 bits, the
  coldest quarter at 2, the rest at 4.
- `bits_for`: per-tensor precision over `bits`, "PATTERN=BITS,..." with shell-style patterns over
  tensor names (`nadoo info` lists them), e.g. `embed=8` keeps a language model's embedding (and the
  LM head tied to it) at 8 bits under `bits="4"`, as llama.cpp's Q4_K_M does. The first match wins.
- Mixture-of-experts layers: `disable_experts` / `only_experts` ("LAYER:EXPERT,...") mask experts out
  of routing, `prefetch` loads the next layer's likely experts ahead of use; under `bits="auto"` a
  token's expert runs at 8 bits when its routing weight is >= `auto_threshold`, else at 4.
- `ffn_sparsity`: MLPs (gated `GatedFFN`, fused `ChunkedFFN`) skip the down-projection neurons whose |activation| is at or below
  a calibrated per-layer threshold, the thresholds allocated to this model-wide share (ffn_sparsity.py).
- `neuron_window`: under a memory budget a gated MLP keeps the down-projection neuron groups the last W
  tokens used, so a token reads only the groups it needs that are not held (LLM in a Flash; gated_ffn.py).
- `lm_head="topk"`: a language model's head computes exact logits only for the vocabulary chunks
  that can matter (the `lm_head_k` most likely first; certified argmax for greedy decoding, all but
  `lm_head_epsilon` of the probability mass for sampling; runtime/chunked/lm_head.py).
Embedding (gather) layers always read only the rows an input looks up: exact, free savings.

Every op asks `plan` (chunked tensors) or `expert_tiers` (experts) and decides nothing of this itself.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .ffn_sparsity import check_fallback, check_target
from .tiers import BITS_TO_TIER, FLOAT_TIER, NEAREST, QUANT_TIERS, source_tier, tier_within

HI, MID, LO = "q8", "q4", "q2"  # --bits auto: the hot, the ordinary and the cold chunks' tiers
MODES = ("dense", "subset", "predict", "oracle", "empty")


@dataclass
class LayerPlan:
    """How one chunked layer runs, decided once when the session opens.

    mode: `dense` every chunk; `subset` the chunks `keep` on every call; `predict` per input, the
    top `k` by the stored sketch; `oracle` per input, the top `k` by the exact product; `empty`
    no chunk (every one pruned away: the bias alone is left)."""

    tiers: list[str]  # tier of each chunk
    mode: str
    keep: np.ndarray | None  # subset: the chunk ids read on every call
    k: int  # predict / oracle: chunks kept per input
    dense_fallback: bool  # a routable layer kept dense by `fallback`
    skip: np.ndarray  # chunks never read (empty after pruning): predict / oracle drop them too


@dataclass
class Policy:
    kind: str = "dense"  # "dense" | "topk"
    bits: str = "8"  # "8" | "4" | "2" | "float" | "auto"
    topk: float | int | None = None  # per routable layer: an int is a chunk count, a float a fraction
    predictor: str = "auto"  # "auto" (sketch where the bundle has one, else static) | "sketch" | "static" | "oracle"
    tau: float = 0.0
    fallback: float = 0.0  # concentration below which a routable layer runs dense
    # experts: "0:3,1:5" or [(layer, expert)], layer = MoE layer index (graph order) or name
    disable_experts: str | list = field(default_factory=list)
    only_experts: str | list = field(default_factory=list)  # in each layer named, only these
    prefetch: bool = False
    auto_threshold: float = 0.5
    # per-tensor tiers over `bits`: "embed=8,layers.0.*=float" or [(pattern, bits)] or {pattern: bits}
    bits_for: str | list | dict = field(default_factory=list)
    # which cached keys a language model's attention reads (sparse_attention.AttentionPolicy, or its fields as a dict)
    attention: object = None
    # which key blocks an encoder's attention reads (block_attention.BlockAttentionPolicy, or its fields as a dict)
    encoder_attention: object = None
    # FFN activation sparsity (runtime/ffn_sparsity.py): model-wide share of down-projection neurons
    # skipped per token (0 = dense), and the share below which a position's layer computes dense
    ffn_sparsity: float = 0.0
    ffn_fallback: float = 0.05
    # under a memory budget: keep the neuron groups of down used by the last W tokens (0 = none held)
    neuron_window: int = 0
    # a language model's head routed by vocabulary chunk (runtime/chunked/lm_head.py): "dense" | "topk",
    # the chunks scored exactly first, and the probability mass sampling may leave out
    lm_head: str = "dense"
    lm_head_k: int = 4
    lm_head_epsilon: float = 1e-3

    def __post_init__(self):
        from .sparse_attention import AttentionPolicy

        if self.attention is None or isinstance(self.attention, dict):
            self.attention = AttentionPolicy(**(self.attention or {}))
        elif not isinstance(self.attention, AttentionPolicy):
            raise InputError(f"attention must be an AttentionPolicy, got {type(self.attention).__name__}")
        from .block_attention import BlockAttentionPolicy

        if self.encoder_attention is None or isinstance(self.encoder_attention, dict):
            self.encoder_attention = BlockAttentionPolicy(**(self.encoder_attention or {}))
        elif not isinstance(self.encoder_attention, BlockAttentionPolicy):
            raise InputError("encoder_attention must be a BlockAttentionPolicy, "
                             f"got {type(self.encoder_attention).__name__}")
        self.bits = str(self.bits)
        self.bits_for = _overrides(self.bits_for)
        self.disable_experts = _pairs(self.disable_experts)
        self.only_experts = _pairs(self.only_experts)
        if self.kind not in ("dense", "topk"):
            raise InputError(f"unknown policy {self.kind!r} (dense or topk)")
        if self.bits not in ("auto", "alloc", "source") and self.bits not in BITS_TO_TIER:
            raise InputError(f"unknown --bits {self.bits!r} (8, 6, 5, 4, 3, 2, float, auto, alloc or source)")
        if self.predictor not in ("auto", "sketch", "static", "oracle"):
            raise InputError(f"unknown predictor {self.predictor!r} (auto, sketch, static or oracle)")
        if self.kind == "topk":
            if self.topk is None:
                raise InputError("--policy topk needs --topk N or a fraction like 0.5")
            ok = 0 < self.topk <= 1 if isinstance(self.topk, float) else int(self.topk) >= 1
            if not ok:
                raise InputError(f"--topk must be a chunk count >= 1 or a fraction in (0, 1], got {self.topk}")
        if not 0 <= self.tau < 1:
            raise InputError(f"--tau must be in [0, 1), got {self.tau}")
        self.ffn_sparsity = check_target(self.ffn_sparsity)
        self.ffn_fallback = check_fallback(self.ffn_fallback)
        if type(self.neuron_window) is not int or self.neuron_window < 0:
            raise InputError(f"--neuron-window must be a token count >= 0, got {self.neuron_window!r}")
        if self.lm_head not in ("dense", "topk"):
            raise InputError(f"unknown --lm-head {self.lm_head!r} (dense or topk)")
        if type(self.lm_head_k) is not int or self.lm_head_k < 1:
            raise InputError(f"--lm-head-k must be a chunk count >= 1, got {self.lm_head_k!r}")
        eps = self.lm_head_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise InputError(f"--lm-head-epsilon must be in (0, 1), got {eps!r}")

    def k_for(self, n_chunks: int) -> int:
        t = self.topk
        k = math.ceil(t * n_chunks) if isinstance(t, float) else int(t)
        return max(1, min(n_chunks, k))

    def skipped(self, entry) -> np.ndarray:
        """Chunks never read: empty in the bundle, or whose largest |w| is below tau·max|W| (all zero
        after pruning)."""
        cm = entry.meta.get("chunk_absmax")
        empty = np.asarray(next(iter(entry.tiers.values()))) < 0
        if self.tau <= 0 or cm is None:
            return empty
        return empty | (np.asarray(cm) < self.tau * float(entry.meta["absmax"]))

    def plan(self, entry, profile: dict, predictor_available: bool = False, skip_of=None,
             can_route: bool = True) -> LayerPlan:
        """The plan of a chunked layer. `profile`: its calibration record ({} without one);
        `predictor_available`: the bundle stores a sketch for it; `skip_of`: the tensor whose empty
        chunks make a chunk of this layer worthless (default: its own; an FFN neuron group adds
        nothing only when its *down* rows are empty); `can_route`: False for ops that read what their
        input names (a gather's rows) or everything (a conv), whatever the profile says."""
        n = entry.n_chunks
        activity = np.asarray(profile["chunk_activity"]) if "chunk_activity" in profile else None
        tiers = self.tiers_for(entry, set(entry.tiers), activity)
        skip = self.skipped(entry if skip_of is None else skip_of)
        routed = (self.kind == "topk" and can_route
                  and bool(entry.meta.get("routable", profile.get("routable", False))))
        dense_fallback = routed and profile.get("concentration", 1.0) < self.fallback
        k = n
        if routed and not dense_fallback:
            k = self.k_for(n)
            predictor = self.predictor
            if predictor == "auto":
                predictor = "sketch" if predictor_available else "static"
            if predictor == "oracle" or (predictor == "sketch" and predictor_available):
                return LayerPlan(tiers, "oracle" if predictor == "oracle" else "predict", None, k, False, skip)
            # static: the profile's most active chunks among those that are read at all
            ranked = np.where(skip, -np.inf, activity if activity is not None else np.ones(n)).astype(float)
            keep = np.sort(np.argsort(-ranked, kind="stable")[:k])
            keep = keep[~skip[keep]]
        else:
            keep = np.flatnonzero(~skip)
        mode = "dense" if len(keep) == n else "empty" if len(keep) == 0 else "subset"
        return LayerPlan(tiers, mode, keep if mode == "subset" else None, k, dense_fallback, skip)

    def tiers_for(self, entry, available: set[str], activity: np.ndarray | None) -> list[str]:
        """The tier of each chunk of a tensor."""
        n = entry.n_chunks
        override = self.tier_override(entry.name)
        if override is not None:
            return [_stored(override, available, entry.name)] * n
        if self.bits == "alloc":  # the compile-time mixed-precision allocation (--bits-per-weight)
            alloc = entry.meta.get("alloc")
            if alloc is None or len(alloc) != n:
                if entry.kind not in ("linear", "conv", "gather", "ffn_up", "ffn_down"):
                    return [sorted(available)[0]] * n
                raise InputError(f"bundle stores no allocation for {entry.name} (compile with --bits-per-weight)")
            if any(t not in available for t in alloc):
                raise InputError(f"allocation of {entry.name} names a tier the bundle does not store")
            return list(alloc)
        if self.bits == "source":  # the precision the source file stored the tensor at (a GGUF's format)
            fmt = entry.meta.get("source_format")
            if fmt is None:
                raise InputError(f"bundle records no source format for {entry.name} (--bits source is for "
                                 "bundles compiled from a GGUF file)")
            return [_stored(source_tier(fmt), available, entry.name)] * n
        if self.bits != "auto":
            return [_stored(BITS_TO_TIER[self.bits], available, entry.name)] * n
        order = np.argsort(-activity) if activity is not None else np.arange(n)
        tiers = [MID] * n
        q = max(1, n // 4) if n >= 4 else 0
        for i in order[:q]:
            tiers[int(i)] = HI
        for i in order[n - q :] if q else []:
            tiers[int(i)] = LO
        return [next(x for x in NEAREST[t] if x in available) for t in tiers]

    # -- experts ----------------------------------------------------------------------------------
    def expert_tiers(self, entry, weights: np.ndarray, alloc: dict | None = None) -> list[str]:
        """The tier of each (token, expert) pair by its routing weight. `alloc`: the bundle's `alloc`
        index entry (for --bits alloc)."""
        override = self.tier_override(entry.name)
        if override is not None:
            return [_stored(override, set(entry.tiers), f"MoE layer {entry.name}")] * len(weights)
        if self.bits == "auto":
            hi = HI if HI in entry.tiers else entry.tiers[-1]
            lo = MID if MID in entry.tiers else entry.tiers[-1]
            return np.where(weights >= self.auto_threshold, hi, lo).tolist()
        if self.bits == "source":  # MoE GGUFs are refused at compile: experts never carry a source format
            raise InputError(f"--bits source: MoE layer {entry.name} records no source format")
        t = self._alloc_expert_tier(entry, alloc) if self.bits == "alloc" else BITS_TO_TIER[self.bits]
        return [_stored(t, set(entry.tiers), f"MoE layer {entry.name}")] * len(weights)

    # -- per-tensor overrides ---------------------------------------------------------------------
    def tier_override(self, name: str) -> str | None:
        """The tier `bits_for` sets for tensor `name` (the first pattern that matches), else None."""
        return next((BITS_TO_TIER[b] for pat, b in self.bits_for if fnmatch.fnmatchcase(name, pat)), None)

    def check_overrides(self, names) -> None:
        """Every `bits_for` pattern names some tensor of the bundle (a typo would silently do nothing)."""
        names = list(names)
        for pat, _ in self.bits_for:
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                raise InputError(f"--bits-for {pat!r} matches no tensor of the bundle (it has {names[:4]}…; "
                                 "`nadoo info` lists them)")

    @staticmethod
    def _alloc_expert_tier(entry, alloc) -> str:
        """The compile-time allocation (--bits-per-weight B) covers the chunked tensors, not experts:
        under --bits alloc experts run at the largest quantized tier the layer stores whose bits fit B (q8 from 8
        bits/weight, q4 from 4 when no q6/q5 is stored, …), else its lowest."""
        budget = alloc.get("bits_per_weight") if isinstance(alloc, dict) else None
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise InputError("bundle stores no allocation (compile with --bits-per-weight)")
        want = tier_within(budget, entry.tiers)
        return next((t for t in NEAREST[want] if t in entry.tiers and t in QUANT_TIERS), want)

    def check_experts(self, layers: dict) -> None:
        """Every (layer, expert) the options name exists; `layers` = {name: n_experts} in index order."""
        names = list(layers)
        for layer, e in self.disable_experts + self.only_experts:
            name = names[layer] if isinstance(layer, int) and 0 <= layer < len(names) else layer
            if name not in layers:
                raise InputError(f"no MoE layer {layer!r} (the bundle has {len(names)}: 0..{len(names) - 1} or {names[:3]}…)")
            if not 0 <= e < layers[name]:
                raise InputError(f"MoE layer {layer}: expert {e} out of range 0..{layers[name] - 1}")

    def experts_enabled(self, idx: int, name: str, n_experts: int) -> np.ndarray:
        """Which experts of MoE layer `idx` (graph order) called `name` routing may pick."""
        keys = (idx, name)
        on = np.ones(n_experts, bool)
        only = [e for layer, e in self.only_experts if layer in keys]
        if only:
            on[:] = False
            on[only] = True
        for layer, e in self.disable_experts:
            if layer in keys:
                on[e] = False
        if not on.any():
            raise InputError(f"MoE layer {idx} ({name}): every expert is disabled")
        return on

    def expert_options_set(self) -> bool:
        return bool(self.disable_experts or self.only_experts or self.prefetch)


def _stored(tier: str, available: set, what: str) -> str:
    """`tier` if the bundle stores it for `what`, else one clear error."""
    if tier not in available:
        hint = " (compile with --keep-float)" if tier == FLOAT_TIER else ""
        raise InputError(f"bundle stores no {tier} tier for {what}{hint}")
    return tier


def _overrides(value) -> list[tuple[str, str]]:
    """'embed=8,layers.*.mlp.*=4' (or such strings, (pattern, bits) pairs or a dict) →
    [('embed', '8'), ('layers.*.mlp.*', '4')]."""
    if not value:
        return []
    if isinstance(value, dict):
        value = list(value.items())
    elif isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    out = []
    for raw in value:
        pair = raw
        if isinstance(raw, str):
            pat, sep, bits = raw.rpartition("=")
            pair = (pat, bits) if sep else None
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)
                and pair[0].strip()):
            raise InputError(f"--bits-for {raw!r}: use PATTERN=BITS, e.g. embed=8")
        pat, bits = pair[0].strip(), str(pair[1]).strip()
        if bits not in BITS_TO_TIER:
            raise InputError(f"--bits-for {pat}={bits}: bits must be 8, 6, 5, 4, 3, 2 or float")
        out.append((pat, bits))
    return out


def _pairs(value) -> list:
    """'0:3,1:5' or 'model.layers.0.mlp:3' (or such pairs already split) → [(0, 3), (1, 5)]."""
    if not value:
        return []
    if not isinstance(value, str):
        out = []
        for pair in value:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and type(pair[1]) is int):
                raise InputError(f"expert {pair!r}: use (LAYER, EXPERT), e.g. (0, 3)")
            out.append((pair[0], pair[1]))
        return out
    out = []
    for part in value.split(","):
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


def parse_size(text) -> int | None:
    """'16MB', '512k', '1.5GiB', '1000' → bytes (decimal for kB/MB/GB, binary for KiB/MiB/GiB)."""
    if text is None:
        return None
    s = str(text).strip().lower().replace(" ", "")
    units = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 10**6, "mb": 10**6, "mib": 2**20,
             "g": 10**9, "gb": 10**9, "gib": 2**30}
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    bad = InputError(f"cannot read size {text!r} (use e.g. 16MB, 512KiB)")
    try:
        value = int(num) if num.isdigit() else float(num)  # whole numbers exactly, however large
    except ValueError:
        raise bad from None
    # float() takes "inf", "nan" and 1e400 (= inf), none of which is a byte count
    if unit not in units or not math.isfinite(value) or value < 0:
        raise bad
    total = value * units[unit]  # 1e308GiB overflows to inf here
    if not total <= MAX_SIZE:
        raise InputError(f"size {text!r} is larger than any memory (at most {MAX_SIZE} bytes)")
    return int(total)


MAX_SIZE = 2**63 - 1  # what a byte count in the OS's terms (ssize_t) can hold
