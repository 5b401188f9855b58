"""The typed schema of a bundle's JSON content: graph (§4.3) and calibration profile (§4.4) here, constants
table, stats and per-tensor facts (§4, §4.1) in index_schema.py, the checks they are built from in
schema_checks.py; this module re-exports them all. `from_json` is the one place these are validated;
the reader, the engine and `nadoo info` use the validated objects, so no consumer meets a missing key
or a wrong type.

Every violation raises `BundleError` with one line naming what is wrong. Validation is strict about
what the runtime reads and ignores keys it does not know (minor versions add keys, spec §6).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Mapping

import numpy as np

from .format import MAX_DIM, MAX_NAME_LEN, MAX_RANK
from .index_schema import (ConstantSpec, ConstantsTable, Stats, check_index_info, check_tensor_facts,  # noqa: F401
                           check_zp_tiers)  # (re-exported: the schema's one import point)
from .schema_checks import (INDEX, INT64, Where, check_dtype, check_int, check_name, check_numbers,  # noqa: F401
                            check_object, check_shape, is_int, is_number, load_json, short)

ONNX_DOMAIN = ""  # canonical spelling of the ONNX domain; "ai.onnx" is accepted as an alias
MAX_OPSET = 10_000

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


# ------------------------------------------------------------------------------------- graph
@dataclass(frozen=True)
class ValueInfo:
    """A graph input or output: dtype None = any; shape None = any rank; dim = int, symbol or None."""

    name: str
    dtype: str | None
    shape: tuple | None

    @classmethod
    def from_json(cls, d, what: str, w: Where) -> "ValueInfo":
        check_object(d, what, w)
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
                    w.fail(f"{what} {name!r}: bad dimension {short(s)}")
            shape = tuple(shape)
        return cls(name, dt, shape)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": None if self.shape is None else list(self.shape)}


def _check_tensor_attr(t, what: str, w: Where) -> None:
    t = check_object(t, what, w)
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
    w.fail(f"{what}: unsupported attribute value {short(v)}")


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
        check_object(d, f"node {k}", w)
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
        check_object(attrs, f"{what} attrs", w)
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
        check_object(g, "graph", w)
        opset: dict[str, int] = {}
        raw_opset = g.get("opset") or {}
        check_object(raw_opset, "opset", w)
        for dom, ver in raw_opset.items():
            if len(dom) > MAX_NAME_LEN:
                w.fail("opset domain names must be at most 512 characters")
            check_int(ver, 1, MAX_OPSET, f"opset of domain {dom!r}", w)
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
        check_object(p, "profile", w)
        samples = p.get("samples")
        if samples is not None:
            check_int(samples, 0, INT64 - 1, "samples", w)
        source = p.get("source")
        if source is not None and not isinstance(source, str):
            w.fail("source must be a string")
        layers = {}
        for name, L in check_object(p.get("layers", {}), "layers", w).items():
            layers[name] = _layer_profile(name, L, chunks, w)
        moe = {}
        for name, u in check_object(p.get("moe", {}), "moe", w).items():
            moe[name] = _moe_usage(name, u, experts, w)
        return cls(samples, source, layers, moe, p)

    def to_json(self) -> dict:
        return self.raw


def _record_of(what: str, rec, name: str, sizes, kind: str, w: Where) -> int | None:
    """Check that profile record `rec` is an object about a `kind` the bundle has; its list length."""
    check_object(rec, what, w)
    if sizes is None:
        return None
    if name not in sizes:
        w.fail(f"{what} is not {kind} of the bundle")
    return sizes[name]


def _lists(rec: dict, keys, n, what: str, w: Where) -> dict:
    return {k: tuple(check_numbers(rec[k], n, f"{what} {k}", w)) if k in rec else None for k in keys}


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
        check_int(tokens, 0, INT64 - 1, f"{what} tokens", w)
    for k in ("n_experts", "top_k"):
        if k in u:
            check_int(u[k], 0, INT64 - 1, f"{what} {k}", w)
    vals = _lists(u, ("expert_frequency", "expert_count", "mean_weight"), n, what, w)
    return MoEUsage(tokens, vals["expert_frequency"], vals["expert_count"], vals["mean_weight"])


__all__ = [
    "ConstantSpec", "ConstantsTable", "Graph", "LayerProfile", "MoEUsage", "Node", "Profile", "Stats", "ValueInfo",
    "Where", "check_dtype", "check_index_info", "check_name", "check_shape", "check_tensor_facts", "check_zp_tiers",
    "load_json",
    "normalize_domain", "NADOO_OP_ATTRS",
]
