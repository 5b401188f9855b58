"""The typed index entries besides the graph and the profile (schema.py): the constants table, the
compile stats and the per-tensor facts the runtime reads (§4, §4.1), each validated in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Collection

import numpy as np

from .qcodec import ZP_GROUPS
from .schema_checks import (INDEX, INT64, Where, check_dtype, check_int, check_name, check_numbers, check_object,
                            check_shape, is_number, short)
from .tiers import QUANT_TIERS


# ------------------------------------------------------------------------------------- constants
@dataclass(frozen=True)
class ConstantSpec:
    name: str
    dtype: np.dtype  # little-endian
    shape: tuple[int, ...]
    offset: int  # inside the constants payload
    count: int  # elements
    reason: str | None = None  # (1.1) why a large float constant was not chunked, from the compiler

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


MAX_REASON = 512


@dataclass(frozen=True)
class ConstantsTable:
    """`constants` of the index: {payload, tensors: [{name, dtype, shape, offset, inline_reason?}]}; every
    tensor lies inside the payload (checked with exact integer arithmetic) and names are unique."""

    payload: int
    tensors: tuple[ConstantSpec, ...]

    @classmethod
    def from_json(cls, c, blob_len: int, w: Where = INDEX) -> "ConstantsTable":
        """`c["payload"]` must already be a checked payload id; blob_len is its raw length."""
        if not isinstance(c, dict) or not isinstance(c.get("tensors"), list):
            w.fail("'constants' must be an object with a 'tensors' list")
        specs, names = [], set()
        for t in c["tensors"]:
            check_object(t, "constant entry", w)
            name = check_name(t.get("name"), "constant name", w)
            if name in names:
                w.fail(f"constant {name} listed twice")
            names.add(name)
            dt = check_dtype(t.get("dtype"), f"constant {name}", w)
            n = check_shape(t.get("shape"), f"constant {name}", w)
            off = t.get("offset")
            if type(off) is not int or off < 0 or off + n * dt.itemsize > blob_len:
                w.fail(f"constant {name} lies outside the constants payload")
            reason = t.get("inline_reason")
            if reason is not None and (not isinstance(reason, str) or not 0 < len(reason) <= MAX_REASON):
                w.fail(f"constant {name}: inline_reason must be a string of 1..{MAX_REASON} characters")
            specs.append(ConstantSpec(name, dt, tuple(t["shape"]), off, n, reason))
        return cls(c["payload"], tuple(specs))

    @property
    def names(self) -> set[str]:
        return {s.name for s in self.tensors}


# ------------------------------------------------------------------------------------- stats
_STAT_INTS = ("dense_fp32_weight_bytes", "calibration_samples")
_STAT_NUMBERS = ("kept_params_ratio", "prune_tau")


@dataclass(frozen=True)
class Stats:
    """`stats` of the index: compile facts (informational; unknown keys kept in `raw`)."""

    dense_fp32_weight_bytes: int
    raw: dict

    @classmethod
    def from_json(cls, s, w: Where = INDEX) -> "Stats":
        """`s`: the index's `stats` ({} when absent); null is refused like any non-object."""
        check_object(s, "'stats'", w)
        for k in _STAT_INTS:
            if k in s:
                check_int(s[k], 0, INT64 - 1, f"stats {k}", w)
        for k in _STAT_NUMBERS:
            if k in s and not (is_number(s[k]) and math.isfinite(s[k])):
                w.fail(f"stats {k} must be a finite number")
        return cls(s.get("dense_fp32_weight_bytes", 0), s)


# ------------------------------------------------------------------------------------- per-tensor facts
def check_tensor_facts(d: dict, n_chunks: int, tiers: Collection[str], what: str, w: Where = INDEX) -> None:
    """The informational keys of a chunked tensor entry (§4.1) that the runtime reads: `errors` per
    tier and chunk, `routable`, `kept_ratio`, `absmax`, `chunk_absmax` (pruning at run time), `alloc`."""
    errors = d.get("errors", {})
    check_object(errors, f"{what} errors", w)
    for t, e in errors.items():
        check_object(e, f"{what} errors {t}", w)
        for k in ("mse", "out_err"):
            if k in e:
                check_numbers(e[k], n_chunks, f"{what} errors {t} {k}", w)
    if d.get("routable") is not None and not isinstance(d["routable"], bool):
        w.fail(f"{what}: routable must be a boolean")
    for k in ("kept_ratio", "absmax", "prune_tau"):
        if d.get(k) is not None and not is_number(d[k]):
            w.fail(f"{what}: {k} must be a number")
    if d.get("chunk_absmax") is not None:
        check_numbers(d["chunk_absmax"], n_chunks, f"{what} chunk_absmax", w)
        if d.get("absmax") is None:
            w.fail(f"{what}: chunk_absmax needs absmax")
    if d.get("source_format") is not None and not isinstance(d["source_format"], str):
        w.fail(f"{what}: source_format must be a string")
    alloc = d.get("alloc")
    if alloc is not None and (not isinstance(alloc, list) or len(alloc) != n_chunks
                              or any(not isinstance(t, str) or t not in tiers for t in alloc)):
        w.fail(f"{what}: alloc must list one stored tier per chunk")


def check_zp_tiers(d: dict, what: str, w: Where = INDEX, key: str = "zp") -> dict:
    """(1.2) `zp` of a chunked tensor or MoE expert matrix: {tier: payload ids} of its quantized tiers in the
    integer-zero-point codec (§4.2c), which needs a `group_size` in ZP_GROUPS. {} when absent; the ids
    themselves are the reader's to check. key="zp_t" (1.3, §4.2d, chunked tensors only): the same codec over
    each chunk's transpose, which also needs every chunk boundary but the last on a multiple of group_size."""
    zp = d.get(key)
    if zp is None:
        return {}
    if not isinstance(zp, dict) or not zp or any(t not in QUANT_TIERS for t in zp):
        w.fail(f"{what}: {key} must map some of the tiers {', '.join(QUANT_TIERS)} to payload ids")
    g = d.get("group_size")
    if g not in ZP_GROUPS:
        w.fail(f"{what}: a {key}-coded tensor needs group_size in {ZP_GROUPS}, got {short(g)}")
    if key == "zp_t" and any(type(x) is not int or x % g for x in (d.get("bounds") or [])[1:-1]):
        w.fail(f"{what}: a zp_t-coded tensor needs every chunk boundary but the last on a multiple of "
               f"group_size {g}")
    return zp


def check_index_info(ix: dict, w: Where = INDEX) -> None:
    """Informational index keys that `nadoo info` prints: `producer` and `model` are objects."""
    for key in ("producer", "model"):
        if ix.get(key) is not None:
            check_object(ix[key], f"'{key}'", w)
