"""The typed schema of a bundle's JSON content: graph (§4.3), calibration profile (§4.4), constants
table and stats (§4). `from_json` is the one place these are validated; the reader, the engine and
`nadoo info` use the validated objects, so no consumer meets a missing key or a wrong type.

Every violation raises `BundleError` with one line naming what is wrong. Validation is strict about
what the runtime reads and ignores keys it does not know (minor versions add keys, spec §6).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Collection, Mapping

import numpy as np

from .errors import BundleError
from .qcodec import ZP_GROUPS
from .tiers import QUANT_TIERS
from .format import (
    DTYPES, MAX_DIM, MAX_ELEMENTS, MAX_JSON_CONTAINERS_FLOOR, MAX_NAME_LEN, MAX_RANK, JSON_BYTES_PER_CONTAINER,
)

ONNX_DOMAIN = ""  # canonical spelling of the ONNX domain; "ai.onnx" is accepted as an alias
MAX_OPSET = 10_000
_INT64 = 1 << 63

# Attributes the runtime's nadoo operators read, and their types (spec §4.3 table). Required: a graph
# whose nadoo node misses one cannot run.
NADOO_OP_ATTRS: dict[str, dict[str, type]] = {
    "ChunkedLinear": {"weight": str},
    "ChunkedGather": {"weight": str},
    "LMHead": {"weight": str},
    "ChunkedConv": {"weight": str},
    "ChunkedConvTranspose": {"weight": str},
    "ChunkedRecurrent": {"cell": str, "weight": str, "recurrence": str},
    "ChunkedFFN": {"up": str, "down": str, "activation": str},
    "GatedFFN": {"gate": str, "up": str, "down": str, "activation": str},
    "MoE": {"moe": str},
    "Attention": {"heads": int, "kv_heads": int, "head_dim": int, "max_positions": int},
}
_WEIGHT_ATTRS = ("weight", "recurrence", "up", "down", "gate")


def normalize_domain(domain: str) -> str:
    return ONNX_DOMAIN if domain in ("", "ai.onnx") else domain


class Where:
    """Where a value sits, for the one-line error: `Where("corrupt bundle: graph").fail("...")`."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str):
        self.prefix = prefix

    def fail(self, msg: str):
        raise BundleError(f"{self.prefix}: {msg}")


_INDEX = Where("corrupt bundle")


# ------------------------------------------------------------------------------------- scalars
def is_int(x) -> bool:
    return type(x) is int and -_INT64 <= x < _INT64


def is_number(x) -> bool:
    return (type(x) is int and -_INT64 <= x < _INT64) or type(x) is float


def check_name(x, what: str, w: Where = _INDEX) -> str:
    if not isinstance(x, str) or not 0 < len(x) <= MAX_NAME_LEN:
        w.fail(f"{what} must be a string of 1..{MAX_NAME_LEN} characters")
    return x


def check_shape(shape, what: str, w: Where = _INDEX) -> int:
    """A concrete shape: a list of at most MAX_RANK ints in [0, MAX_DIM]; returns its element count."""
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        w.fail(f"{what}: shape must be a list of at most {MAX_RANK} dims")
    n = 1
    for d in shape:
        if type(d) is not int or not 0 <= d <= MAX_DIM:
            w.fail(f"{what}: bad dimension {d!r}")
        n *= d
    if n > MAX_ELEMENTS:
        w.fail(f"{what}: {n} elements exceed the cap")
    return n


def check_dtype(dt, what: str, w: Where = _INDEX) -> np.dtype:
    if not isinstance(dt, str) or dt not in DTYPES:
        w.fail(f"{what}: unsupported dtype {dt!r}")
    return np.dtype(dt).newbyteorder("<")


def _int(x, lo: int, hi: int, what: str, w: Where) -> int:
    if type(x) is not int or not lo <= x <= hi:
        w.fail(f"{what} must be an int in [{lo}, {hi}], got {_short(x)}")
    return x


def _numbers(x, n: int | None, what: str, w: Where) -> list:
    if not isinstance(x, list) or not all(is_number(v) for v in x):
        w.fail(f"{what} must be a list of numbers")
    if n is not None and len(x) != n:
        w.fail(f"{what} has {len(x)} entries, expected {n}")
    return x


def _object(x, what: str, w: Where) -> dict:
    if not isinstance(x, dict):
        w.fail(f"{what} must be an object")
    return x


def _short(x) -> str:
    r = repr(x)
    return r if len(r) <= 60 else r[:57] + "..."


# ------------------------------------------------------------------------------------- JSON
def load_json(raw: bytes, what: str, max_bytes: int):
    """Parse canonical JSON within the spec's caps. Besides the byte cap, objects and arrays (the values
    that cost Python the most memory, ~25x their text) are limited to one per JSON_BYTES_PER_CONTAINER
    bytes on average; counting `{` and `[` bytes over-counts (brackets inside strings) and is cheap."""
    if len(raw) > max_bytes:
        _INDEX.fail(f"{what} is {len(raw)} bytes, over the cap of {max_bytes}")
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > MAX_JSON_CONTAINERS_FLOOR + len(raw) // JSON_BYTES_PER_CONTAINER:
        _INDEX.fail(f"{what} holds {containers} JSON objects/arrays in {len(raw)} bytes, more than the spec allows")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        _INDEX.fail(f"{what} is not valid UTF-8 JSON")


# ------------------------------------------------------------------------------------- graph
@dataclass(frozen=True)
class ValueInfo:
    """A graph input or output: dtype None = any; shape None = any rank; dim = int, symbol or None."""

    name: str
    dtype: str | None
    shape: tuple | None

    @classmethod
    def from_json(cls, d, what: str, w: Where) -> "ValueInfo":
        _object(d, what, w)
        name = check_name(d.get("name"), f"{what} name", w)
        dt = d.get("dtype")
        if dt is not None:
            check_dtype(dt, f"{what} {name!r}", w)
        shape = d.get("shape")
        if shape is not None:
            if not isinstance(shape, list) or len(shape) > MAX_RANK:
                w.fail(f"{what} {name!r}: shape must be a list of at most {MAX_RANK} dims")
            for s in shape:
                ok = s is None or (type(s) is int and 0 <= s <= MAX_DIM) or (isinstance(s, str) and len(s) <= MAX_NAME_LEN)
                if not ok:
                    w.fail(f"{what} {name!r}: bad dimension {_short(s)}")
            shape = tuple(shape)
        return cls(name, dt, shape)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": None if self.shape is None else list(self.shape)}


def _check_tensor_attr(t, what: str, w: Where) -> None:
    t = _object(t, what, w)
    dt = check_dtype(t.get("dtype"), what, w)
    n = check_shape(t.get("shape"), what, w)
    data = t.get("data")
    if not isinstance(data, list) or len(data) != n:
        w.fail(f"{what}: data must be a flat list of {n} values")
    if not all(is_number(v) or type(v) is bool for v in data):
        w.fail(f"{what}: data must hold numbers")
    try:
        np.array(data, dtype=dt)  # ints out of the dtype's range are refused here, not at run time
    except (OverflowError, ValueError, TypeError):
        w.fail(f"{what}: data does not fit dtype {dt.name}")


def _attr_scalar(v) -> bool:
    return is_number(v) or type(v) is bool or isinstance(v, str)


def _check_attr(v, what: str, w: Where) -> None:
    """Attribute values (spec §4.3): JSON ints, floats, strings (booleans too), flat lists of them, or a
    tensor {"tensor": {dtype, shape, data}}."""
    if _attr_scalar(v):
        return
    if isinstance(v, list):
        if not all(_attr_scalar(x) for x in v):
            w.fail(f"{what}: a list attribute must hold numbers or strings")
        return
    if isinstance(v, dict) and set(v) == {"tensor"}:
        _check_tensor_attr(v["tensor"], what, w)
        return
    w.fail(f"{what}: unsupported attribute value {_short(v)}")


@dataclass(frozen=True)
class Node:
    op: str
    domain: str  # normalised: "" for ONNX (also when written "ai.onnx")
    name: str
    inputs: tuple[str, ...]  # "" = omitted optional input
    outputs: tuple[str, ...]  # "" = omitted optional output
    attrs: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, d, k: int, w: Where) -> "Node":
        _object(d, f"node {k}", w)
        op = d.get("op")
        if not isinstance(op, str) or not 0 < len(op) <= MAX_NAME_LEN:
            w.fail(f"node {k}: 'op' must be a string of 1..{MAX_NAME_LEN} characters")
        name = d.get("name") or f"{op}_{k}"
        if not isinstance(name, str) or len(name) > MAX_NAME_LEN:
            w.fail(f"node {k} ({op}): 'name' must be a string of at most {MAX_NAME_LEN} characters")
        what = f"node {name} ({op})"
        domain = d.get("domain", "")
        if domain is None:
            domain = ""
        if not isinstance(domain, str) or len(domain) > MAX_NAME_LEN:
            w.fail(f"{what}: 'domain' must be a string")
        ios = []
        for key in ("inputs", "outputs"):
            v = d.get(key, [])
            if not isinstance(v, list) or not all(isinstance(x, str) and len(x) <= MAX_NAME_LEN for x in v):
                w.fail(f"{what}: '{key}' must be a list of value names")
            ios.append(tuple(v))
        attrs = d.get("attrs")
        if attrs is None:
            attrs = {}
        _object(attrs, f"{what} attrs", w)
        for a, v in attrs.items():
            if not 0 < len(a) <= MAX_NAME_LEN:
                w.fail(f"{what}: attribute names must be 1..{MAX_NAME_LEN} characters")
            _check_attr(v, f"{what} attribute {a!r}", w)
        domain = normalize_domain(domain)
        if domain == "nadoo" and op in NADOO_OP_ATTRS:
            for a, typ in NADOO_OP_ATTRS[op].items():
                if not isinstance(attrs.get(a), typ):
                    w.fail(f"{what}: attribute {a!r} must be a {typ.__name__}")
        return cls(op, domain, name, ios[0], ios[1], dict(attrs))

    def to_json(self) -> dict:
        return {"op": self.op, "domain": self.domain, "name": self.name, "inputs": list(self.inputs),
                "outputs": list(self.outputs), "attrs": self.attrs}


@dataclass(frozen=True)
class Graph:
    """A validated nadoo graph. References are resolved: every node input is "", a graph input, a
    constant or an earlier node's output; every value is defined once; every graph output is defined."""

    opset: dict[str, int]
    inputs: tuple[ValueInfo, ...]
    outputs: tuple[ValueInfo, ...]
    nodes: tuple[Node, ...]
    constants: tuple[str, ...]

    @classmethod
    def from_json(cls, g, *, where: str = "invalid graph", constants: Collection[str] | None = None,
                  weights: Collection[str] | None = None, moe: Collection[str] | None = None) -> "Graph":
        """`constants`: names the constants table holds (each graph constant must be one); `weights`, `moe`:
        the bundle's chunked tensors and MoE layers, which nadoo nodes must name. None = not checked."""
        w = Where(where)
        _object(g, "graph", w)
        opset: dict[str, int] = {}
        raw_opset = g.get("opset") or {}
        _object(raw_opset, "opset", w)
        for dom, ver in raw_opset.items():
            if len(dom) > MAX_NAME_LEN:
                w.fail("opset domain names must be at most 512 characters")
            _int(ver, 1, MAX_OPSET, f"opset of domain {dom!r}", w)
            dom = normalize_domain(dom)
            if opset.get(dom, ver) != ver:
                w.fail(f"opset of domain {dom!r} given twice with different versions")
            opset[dom] = ver
        lists = {}
        for key in ("inputs", "outputs", "nodes", "constants"):
            v = g.get(key, [])
            if not isinstance(v, list):
                w.fail(f"'{key}' must be a list")
            lists[key] = v
        inputs = tuple(ValueInfo.from_json(d, "graph input", w) for d in lists["inputs"])
        outputs = tuple(ValueInfo.from_json(d, "graph output", w) for d in lists["outputs"])
        consts = tuple(check_name(c, "graph constant", w) for c in lists["constants"])
        defined: set[str] = set()
        for kind, names in (("graph input", [i.name for i in inputs]), ("constant", consts)):
            for n in names:
                if n in defined:
                    w.fail(f"{kind} {n!r} is defined twice")
                defined.add(n)
        if constants is not None:
            missing = [c for c in consts if c not in constants]
            if missing:
                w.fail(f"constant tensor {missing[0]!r} is missing ({len(missing)} missing in total)")
        nodes = []
        for k, d in enumerate(lists["nodes"]):
            nd = Node.from_json(d, k, w)
            for n in nd.inputs:
                if n and n not in defined:
                    w.fail(f"node {nd.name} ({nd.op}) uses {n!r} before it is defined")
            for n in nd.outputs:
                if n:
                    if n in defined:
                        w.fail(f"node {nd.name} ({nd.op}) redefines {n!r}")
                    defined.add(n)
            if nd.domain == "nadoo":
                _check_nadoo_refs(nd, weights, moe, w)
            nodes.append(nd)
        seen = set()
        for o in outputs:
            if o.name not in defined:
                w.fail(f"graph output {o.name!r} is never produced")
            if o.name in seen:
                w.fail(f"graph output {o.name!r} is listed twice")
            seen.add(o.name)
        return cls(opset, inputs, outputs, tuple(nodes), consts)

    def to_json(self) -> dict:
        return {"opset": dict(self.opset), "inputs": [i.to_json() for i in self.inputs],
                "outputs": [o.to_json() for o in self.outputs], "nodes": [n.to_json() for n in self.nodes],
                "constants": list(self.constants)}


def _check_nadoo_refs(nd: Node, weights, moe, w: Where) -> None:
    if weights is not None and nd.op in NADOO_OP_ATTRS:
        for a in _WEIGHT_ATTRS:
            if a in NADOO_OP_ATTRS[nd.op] and nd.attrs[a] not in weights:
                w.fail(f"node {nd.name} ({nd.op}) names weight {nd.attrs[a]!r}, which the bundle does not hold")
    if moe is not None and nd.op == "MoE" and nd.attrs["moe"] not in moe:
        w.fail(f"node {nd.name} (MoE) names MoE layer {nd.attrs['moe']!r}, which the bundle does not hold")


# ------------------------------------------------------------------------------------- profile
_CHUNK_LISTS = ("chunk_activity", "chunk_active_frac", "chunk_peak")


@dataclass(frozen=True)
class LayerProfile:
    chunk_activity: tuple | None
    chunk_active_frac: tuple | None
    chunk_peak: tuple | None
    routable: bool | None
    concentration: float | None
    group_of: str | None


@dataclass(frozen=True)
class MoEUsage:
    tokens: int | None
    expert_frequency: tuple | None
    expert_count: tuple | None
    mean_weight: tuple | None


@dataclass(frozen=True)
class Profile:
    """The calibration profile (§4.4). `raw` is the validated JSON object, unknown keys included, for
    the consumers that take it whole (policies, `nadoo info --json`)."""

    samples: int | None
    source: str | None
    layers: dict[str, LayerProfile]
    moe: dict[str, MoEUsage]
    raw: dict

    @classmethod
    def from_json(cls, p, *, where: str = "corrupt bundle: profile", chunks: Mapping[str, int] | None = None,
                  experts: Mapping[str, int] | None = None) -> "Profile":
        """`chunks`: chunk count per chunked tensor (profile layers must name them, one entry per chunk);
        `experts`: expert count per MoE layer. None = not cross-checked."""
        w = Where(where)
        _object(p, "profile", w)
        samples = p.get("samples")
        if samples is not None:
            _int(samples, 0, _INT64 - 1, "samples", w)
        source = p.get("source")
        if source is not None and not isinstance(source, str):
            w.fail("source must be a string")
        layers = {}
        for name, L in _object(p.get("layers", {}), "layers", w).items():
            layers[name] = _layer_profile(name, L, chunks, w)
        moe = {}
        for name, u in _object(p.get("moe", {}), "moe", w).items():
            moe[name] = _moe_usage(name, u, experts, w)
        return cls(samples, source, layers, moe, p)

    def to_json(self) -> dict:
        return self.raw


def _record_of(what: str, rec, name: str, sizes, kind: str, w: Where) -> int | None:
    """Check that profile record `rec` is an object about a `kind` the bundle has; its list length."""
    _object(rec, what, w)
    if sizes is None:
        return None
    if name not in sizes:
        w.fail(f"{what} is not {kind} of the bundle")
    return sizes[name]


def _lists(rec: dict, keys, n, what: str, w: Where) -> dict:
    return {k: tuple(_numbers(rec[k], n, f"{what} {k}", w)) if k in rec else None for k in keys}


def _layer_profile(name: str, L, chunks, w: Where) -> LayerProfile:
    what = f"layer {name}"
    n = _record_of(what, L, name, chunks, "a chunked tensor", w)
    lists = _lists(L, _CHUNK_LISTS, n, what, w)
    routable = L.get("routable")
    if routable is not None and not isinstance(routable, bool):
        w.fail(f"{what} routable must be a boolean")
    conc = L.get("concentration")
    if conc is not None and not is_number(conc):
        w.fail(f"{what} concentration must be a number")
    group_of = L.get("group_of")
    if group_of is not None:
        if not isinstance(group_of, str):
            w.fail(f"{what} group_of must be a tensor name")
        if chunks is not None and chunks.get(group_of) != n:
            w.fail(f"{what} group_of {group_of!r} is not a chunked tensor with the same chunks")
    return LayerProfile(lists["chunk_activity"], lists["chunk_active_frac"], lists["chunk_peak"], routable,
                        None if conc is None else float(conc), group_of)


def _moe_usage(name: str, u, experts, w: Where) -> MoEUsage:
    what = f"moe usage {name}"
    n = _record_of(what, u, name, experts, "an MoE layer", w)
    tokens = u.get("tokens")
    if tokens is not None:
        _int(tokens, 0, _INT64 - 1, f"{what} tokens", w)
    for k in ("n_experts", "top_k"):
        if k in u:
            _int(u[k], 0, _INT64 - 1, f"{what} {k}", w)
    vals = _lists(u, ("expert_frequency", "expert_count", "mean_weight"), n, what, w)
    return MoEUsage(tokens, vals["expert_frequency"], vals["expert_count"], vals["mean_weight"])


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
    def from_json(cls, c, blob_len: int, w: Where = _INDEX) -> "ConstantsTable":
        """`c["payload"]` must already be a checked payload id; blob_len is its raw length."""
        if not isinstance(c, dict) or not isinstance(c.get("tensors"), list):
            w.fail("'constants' must be an object with a 'tensors' list")
        specs, names = [], set()
        for t in c["tensors"]:
            _object(t, "constant entry", w)
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
    def from_json(cls, s, w: Where = _INDEX) -> "Stats":
        """`s`: the index's `stats` ({} when absent); null is refused like any non-object."""
        _object(s, "'stats'", w)
        for k in _STAT_INTS:
            if k in s:
                _int(s[k], 0, _INT64 - 1, f"stats {k}", w)
        for k in _STAT_NUMBERS:
            if k in s and not (is_number(s[k]) and math.isfinite(s[k])):
                w.fail(f"stats {k} must be a finite number")
        return cls(s.get("dense_fp32_weight_bytes", 0), s)


# ------------------------------------------------------------------------------------- per-tensor facts
def check_tensor_facts(d: dict, n_chunks: int, tiers: Collection[str], what: str, w: Where = _INDEX) -> None:
    """The informational keys of a chunked tensor entry (§4.1) that the runtime reads: `errors` per
    tier and chunk, `routable`, `kept_ratio`, `absmax`, `chunk_absmax` (pruning at run time), `alloc`."""
    errors = d.get("errors", {})
    _object(errors, f"{what} errors", w)
    for t, e in errors.items():
        _object(e, f"{what} errors {t}", w)
        for k in ("mse", "out_err"):
            if k in e:
                _numbers(e[k], n_chunks, f"{what} errors {t} {k}", w)
    if d.get("routable") is not None and not isinstance(d["routable"], bool):
        w.fail(f"{what}: routable must be a boolean")
    for k in ("kept_ratio", "absmax", "prune_tau"):
        if d.get(k) is not None and not is_number(d[k]):
            w.fail(f"{what}: {k} must be a number")
    if d.get("chunk_absmax") is not None:
        _numbers(d["chunk_absmax"], n_chunks, f"{what} chunk_absmax", w)
        if d.get("absmax") is None:
            w.fail(f"{what}: chunk_absmax needs absmax")
    alloc = d.get("alloc")
    if alloc is not None and (not isinstance(alloc, list) or len(alloc) != n_chunks
                              or any(not isinstance(t, str) or t not in tiers for t in alloc)):
        w.fail(f"{what}: alloc must list one stored tier per chunk")


def check_zp_tiers(d: dict, what: str, w: Where = _INDEX, key: str = "zp") -> dict:
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
        w.fail(f"{what}: a {key}-coded tensor needs group_size in {ZP_GROUPS}, got {_short(g)}")
    if key == "zp_t" and any(type(x) is not int or x % g for x in (d.get("bounds") or [])[1:-1]):
        w.fail(f"{what}: a zp_t-coded tensor needs every chunk boundary but the last on a multiple of "
               f"group_size {g}")
    return zp


def check_index_info(ix: dict, w: Where = _INDEX) -> None:
    """Informational index keys that `nadoo info` prints: `producer` and `model` are objects."""
    for key in ("producer", "model"):
        if ix.get(key) is not None:
            _object(ix[key], f"'{key}'", w)


__all__ = [
    "ConstantSpec", "ConstantsTable", "Graph", "LayerProfile", "MoEUsage", "Node", "Profile", "Stats", "ValueInfo",
    "Where", "check_dtype", "check_index_info", "check_name", "check_shape", "check_tensor_facts", "check_zp_tiers",
    "load_json",
    "normalize_domain", "NADOO_OP_ATTRS",
]
