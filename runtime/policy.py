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
- `bits="auto"`: precision by activity: the hottest quarter of a layer's chunks at 8 bits, the
  coldest quarter at 2, the rest at 4.
Embedding (gather) layers always read only the rows an input looks up: exact, free savings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InputError

BITS_TO_TIER = {"8": "q8", "4": "q4", "2": "q2", "float": "f32", "32": "f32", "f32": "f32"}


@dataclass
class Policy:
    kind: str = "dense"  # "dense" | "topk"
    bits: str = "8"  # "8" | "4" | "2" | "float" | "auto"
    topk: float | int | None = None  # per routable layer: an int is a chunk count, a float a fraction
    predictor: str = "auto"  # "auto" (sketch where the bundle has one, else static) | "sketch" | "static" | "oracle"
    tau: float = 0.0
    fallback: float = 0.0  # concentration below which a routable layer runs dense

    def __post_init__(self):
        self.bits = str(self.bits)
        if self.kind not in ("dense", "topk"):
            raise InputError(f"unknown policy {self.kind!r} (dense or topk)")
        if self.bits not in ("auto", "alloc") and self.bits not in BITS_TO_TIER:
            raise InputError(f"unknown --bits {self.bits!r} (8, 4, 2, float, auto or alloc)")
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

    def k_for(self, n_chunks: int) -> int:
        t = self.topk
        k = math.ceil(t * n_chunks) if isinstance(t, float) else int(t)
        return max(1, min(n_chunks, k))

    def tiers_for(self, entry, available: set[str], activity: np.ndarray | None) -> list[str]:
        """The tier of each chunk of a tensor."""
        n = entry.n_chunks
        if self.bits == "alloc":  # [#5] the compile-time mixed-precision allocation (--bits-per-weight)
            alloc = entry.meta.get("alloc")
            if alloc is None or len(alloc) != n:
                if entry.kind not in ("linear", "conv", "gather", "ffn_up", "ffn_down"):
                    return [sorted(available)[0]] * n
                raise InputError(f"bundle stores no allocation for {entry.name} (compile with --bits-per-weight)")
            if any(t not in available for t in alloc):
                raise InputError(f"allocation of {entry.name} names a tier the bundle does not store")
            return list(alloc)
        if self.bits != "auto":
            tier = BITS_TO_TIER[self.bits]
            if tier not in available:
                hint = " (compile with --keep-float)" if tier == "f32" else ""
                raise InputError(f"bundle stores no {tier} tier for {entry.name}{hint}")
            return [tier] * n
        order = np.argsort(-activity) if activity is not None else np.arange(n)
        tiers = ["q4"] * n
        q = max(1, n // 4) if n >= 4 else 0
        for i in order[:q]:
            tiers[int(i)] = "q8"
        for i in order[n - q :] if q else []:
            tiers[int(i)] = "q2"
        # a tier the bundle lacks falls back to the nearest one it has (never silently to float32)
        near = {"q8": ("q8", "q4", "q2", "f32"), "q4": ("q4", "q8", "q2", "f32"), "q2": ("q2", "q4", "q8", "f32")}
        return [next(x for x in near[t] if x in available) for t in tiers]


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
