"""The nadoo graph engine: plan once, run many.

A *nadoo graph* is a JSON-serializable dict (see compiler/onnx_to_graph.py)::

    {"opset": {"": 18}, "inputs": [{"name", "dtype", "shape"}], "outputs": [...],
     "nodes": [{"op", "domain", "name", "inputs", "outputs", "attrs"}], "constants": [names]}

:class:`Plan` resolves every node to a Python callable once (custom ops first, then the built-in NumPy ops in
``nadoo.runtime.ops``, then - only if needed, and only where ``onnx`` is installed - a per-node
``onnx.reference`` fallback), assigns every value an integer slot, and computes after which node each
intermediate can be released. :meth:`Plan.run` is then a tight loop over precomputed steps.

This module imports NumPy only (never onnx at import time, never torch).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from .errors import BundleError, InputError, UnsupportedError
from .ops import REGISTRY, Fallback
from .ops.shape import decode_tensor_attr

Builder = Callable[[dict, "BuildContext"], Callable[..., Any]]

__all__ = ["Plan", "BuildContext", "Builder", "build_node"]


class BuildContext:
    """What a builder may look at: the node, its attributes, which inputs are constants, the opset."""

    __slots__ = ("node", "attrs", "_consts", "opset", "opsets", "n_inputs", "n_outputs")

    def __init__(self, node: dict, consts: list, opsets: Mapping[str, int]):
        self.node = node
        self.attrs = node.get("attrs") or {}
        self._consts = consts
        self.opsets = dict(opsets)
        dom = node.get("domain", "") or ""
        if dom == "ai.onnx":
            dom = ""
        self.opset = int(self.opsets.get(dom) or (18 if dom == "" else 1))
        self.n_inputs = len(node.get("inputs", []))
        self.n_outputs = len(node.get("outputs", []))

    def attr(self, name: str, default: Any = ...) -> Any:
        """Attribute value; tensor attributes come back as np.ndarray. Missing & no default -> UnsupportedError."""
        if name in self.attrs:
            v = self.attrs[name]
            if isinstance(v, dict) and "tensor" in v:
                return decode_tensor_attr(v)
            return v
        if default is ...:
            raise UnsupportedError(f"operator {self.node.get('op')} node {self.node.get('name', '')!r} "
                                   f"misses required attribute {name!r}")
        return default

    def has_input(self, i: int) -> bool:
        ins = self.node.get("inputs", [])
        return i < len(ins) and ins[i] != ""

    def const(self, i: int) -> np.ndarray | None:
        """The constant array bound to input i, or None if that input is dynamic or omitted."""
        if i < len(self._consts):
            return self._consts[i]
        return None

    def input_name(self, i: int) -> str:
        ins = self.node.get("inputs", [])
        return ins[i] if i < len(ins) else ""


# ---------------------------------------------------------------------------------------------- fallback
def _to_onnx_attr(name, v):
    from onnx import helper, numpy_helper, AttributeProto

    if isinstance(v, dict) and "tensor" in v:
        return helper.make_attribute(name, numpy_helper.from_array(decode_tensor_attr(v)))
    if isinstance(v, np.ndarray):
        return helper.make_attribute(name, numpy_helper.from_array(v))
    if isinstance(v, (list, tuple)) and len(v) == 0:
        return helper.make_attribute(name, [], attr_type=AttributeProto.INTS)
    return helper.make_attribute(name, v)


def reference_available(op: str, domain: str = "", version: int | None = None) -> bool:
    """Whether onnx.reference implements (domain, op). False if onnx is not installed."""
    try:
        from onnx.reference.ops import load_op
    except Exception:  # pragma: no cover - runtime-only machines
        return False
    try:
        load_op(domain or "", op, version)
        return True
    except Exception:
        return False


def _fallback_builder(node: dict, ctx: BuildContext):
    """Run a single node through onnx.reference.ReferenceEvaluator (lazy: onnx imported here only)."""
    op, domain = node["op"], node.get("domain", "") or ""
    try:
        import onnx  # noqa: F401
        from onnx import helper, TensorProto  # noqa: F401
        from onnx.reference import ReferenceEvaluator
    except Exception:
        raise UnsupportedError(f"unsupported operator {op} (domain {domain!r}); the onnx.reference "
                               "fallback needs the onnx package") from None
    if not reference_available(op, domain, ctx.opset if domain == "" else None):
        raise UnsupportedError(f"unsupported operator {op} (domain {domain!r})")

    attrs = [_to_onnx_attr(k, v) for k, v in (node.get("attrs") or {}).items()]
    in_names = [f"i{k}" if n else "" for k, n in enumerate(node.get("inputs", []))]
    out_names = [f"o{k}" if n else "" for k, n in enumerate(node.get("outputs", []))]
    opsets = dict(ctx.opsets) or {"": 18}
    opsets.setdefault("", 18)
    cache: dict = {}

    def make(args):
        from onnx import helper

        ins = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), None)
               for n, a in zip(in_names, args) if n]
        outs = [helper.make_tensor_value_info(n, 0, None) for n in out_names if n]
        nd = helper.make_node(op, in_names, out_names, domain=domain)
        nd.attribute.extend(attrs)
        g = helper.make_graph([nd], "fallback", ins, outs)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, int(v)) for d, v in opsets.items()])
        return ReferenceEvaluator(m)

    n_out = len(out_names)

    def f(*args):
        args = [np.asarray(a) if a is not None else None for a in args]
        key = tuple(None if a is None else a.dtype.str for a in args)
        ev = cache.get(key)
        if ev is None:
            ev = cache[key] = make(args)
        feeds = {n: a for n, a in zip(in_names, args) if n}
        res = ev.run(None, feeds)
        res = [np.asarray(r) for r in res]
        return res[0] if n_out == 1 else tuple(res)
    f.onnx_reference = True  # marks the callable for Plan.fallback_nodes
    return f


def build_node(node: dict, consts: list, opsets: Mapping[str, int],
               custom_ops: Mapping[tuple[str, str], Builder] | None = None) -> Callable:
    """Resolve one node to a callable: custom ops, then built-ins, then the onnx.reference fallback."""
    op = node["op"]
    domain = node.get("domain", "") or ""
    if domain == "ai.onnx":
        domain = ""
    ctx = BuildContext(node, consts, opsets)
    if custom_ops:
        b = custom_ops.get((domain, op))
        if b is not None:
            return b(node, ctx)
    b = REGISTRY.get((domain, op))
    if b is not None:
        try:
            return b(node, ctx)
        except Fallback:
            pass
    return _fallback_builder(node, ctx)


# ---------------------------------------------------------------------------------------------- plan
_INT_KINDS = "iu"


class Plan:
    """A graph resolved to callables. ``Plan(graph, constants).run({name: array}) -> [outputs]``."""

    def __init__(self, graph: dict, constants: Mapping[str, np.ndarray],
                 custom_ops: dict[tuple[str, str], Builder] | None = None):
        self.graph = graph
        opsets = {("" if k == "ai.onnx" else k): int(v) for k, v in (graph.get("opset") or {}).items()}
        self._inputs = [dict(i) for i in graph.get("inputs", [])]
        self._outputs = [dict(o) for o in graph.get("outputs", [])]
        nodes = graph.get("nodes", [])

        const_names = list(graph.get("constants", []))
        missing = [n for n in const_names if n not in constants]
        if missing:
            raise BundleError(f"constant tensor {missing[0]!r} is missing ({len(missing)} missing in total)")

        slots: dict[str, int] = {}

        def slot(name):
            s = slots.get(name)
            if s is None:
                s = slots[name] = len(slots)
            return s

        slot("")  # slot 0: omitted optional input -> always None
        init: dict[int, np.ndarray] = {}
        const_set = set()
        for n in const_names:
            init[slot(n)] = constants[n]
            const_set.add(n)
        in_names = [i["name"] for i in self._inputs]
        for n in in_names:
            if n in const_set:
                raise BundleError(f"graph input {n!r} is also a constant")
            slot(n)

        # which value is produced where (to validate references)
        known = set(const_set) | set(in_names) | {""}
        for k, nd in enumerate(nodes):
            for n in nd.get("inputs", []):
                if n not in known:
                    raise BundleError(f"node {nd.get('name') or k} ({nd['op']}) uses {n!r} before it is defined")
            for n in nd.get("outputs", []):
                if n:
                    known.add(n)
        for o in self._outputs:
            if o["name"] not in known:
                raise BundleError(f"graph output {o['name']!r} is never produced")

        # liveness: last node index that reads each value
        last_use: dict[str, int] = {}
        for k, nd in enumerate(nodes):
            for n in nd.get("inputs", []):
                if n:
                    last_use[n] = k
        keep = set(o["name"] for o in self._outputs) | const_set | set(in_names)

        # consumers per value (for in-place reuse of fresh, single-use intermediates)
        n_consumers: dict[str, int] = {}
        for nd in nodes:
            for n in set(nd.get("inputs", [])):
                if n:
                    n_consumers[n] = n_consumers.get(n, 0) + 1
        fresh: set[str] = set()

        steps = []
        for k, nd in enumerate(nodes):
            ins = list(nd.get("inputs", []))
            # trailing omitted inputs are dropped, so builders' default args kick in
            while ins and ins[-1] == "":
                ins.pop()
            consts = [constants[n] if n in const_set else None for n in ins]
            node_view = dict(nd)
            node_view["inputs"] = ins
            fn = build_node(node_view, consts, opsets, custom_ops)
            dom = nd.get("domain", "") or ""
            if not (custom_ops and (dom, nd["op"]) in custom_ops):
                if dom == "" and nd["op"] in _INPLACE_UFUNCS and len(ins) == 2:
                    cand = [j for j, n in enumerate(ins) if n in fresh and n not in keep
                            and n_consumers.get(n) == 1]
                    if cand:
                        fn = _inplace_binary(_INPLACE_UFUNCS[nd["op"]], cand[0], fn)
                if dom == "" and nd["op"] in _FRESH_OPS:
                    fresh.update(o for o in nd.get("outputs", []) if o)
            in_slots = tuple(slot(n) for n in ins)
            outs = list(nd.get("outputs", []))
            out_slots = tuple(slot(n) if n else -1 for n in outs)
            frees = tuple(sorted({slot(n) for n in ins if n and n not in keep and last_use.get(n) == k}
                                 | {slot(n) for n in outs if n and n not in keep and n not in last_use}))
            single = len(outs) == 1
            steps.append((fn, in_slots, out_slots[0] if single else out_slots, single, frees,
                          nd.get("name") or f"{nd['op']}_{k}", nd["op"]))

        self._n_slots = len(slots)
        self._init = [None] * self._n_slots
        for s, v in init.items():
            self._init[s] = v
        self._slots = slots
        self._steps = steps
        self._fast_steps = [(fn, ins, out, single, frees) for fn, ins, out, single, frees, _, _ in steps]
        self._in_slots = [slots[n] for n in in_names]
        self._out_slots = [slots[o["name"]] for o in self._outputs]
        self._input_specs = []
        for i in self._inputs:
            dt = np.dtype(i["dtype"]) if i.get("dtype") else None
            self._input_specs.append((i["name"], dt, i.get("shape")))

    # ------------------------------------------------------------------ properties
    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self._inputs]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self._outputs]

    @property
    def inputs(self) -> list[dict]:
        return [dict(i) for i in self._inputs]

    @property
    def outputs(self) -> list[dict]:
        return [dict(o) for o in self._outputs]

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def fallback_nodes(self) -> list[str]:
        """Names of the nodes that run through the onnx.reference fallback."""
        return [s[5] for s in self._steps if getattr(s[0], "onnx_reference", False)]

    # ------------------------------------------------------------------ validation
    def _check_inputs(self, feeds: Mapping[str, Any]) -> list[np.ndarray]:
        if not isinstance(feeds, Mapping):
            raise InputError(f"inputs must be a mapping name -> array, got {type(feeds).__name__}")
        names = set(self.input_names)
        for k in feeds:
            if k not in names:
                raise InputError(f"unknown input {k!r}; expected inputs: {', '.join(self.input_names)}")
        arrays = []
        symbols: dict[str, tuple[int, str]] = {}
        for name, dt, shape in self._input_specs:
            if name not in feeds:
                raise InputError(f"missing input {name!r} (expected {dt}{_fmt_shape(shape)})")
            a = feeds[name]
            if not isinstance(a, np.ndarray):
                try:
                    a = np.asarray(a)
                except Exception as e:
                    raise InputError(f"input {name!r}: cannot convert to an array ({e})") from None
            if dt is not None and a.dtype != dt:
                a = _safe_cast(name, a, dt)
            if shape is not None:
                if a.ndim != len(shape):
                    raise InputError(f"input {name!r}: expected rank {len(shape)} {_fmt_shape(shape)}, "
                                     f"got rank {a.ndim} {tuple(a.shape)}")
                for ax, (want, got) in enumerate(zip(shape, a.shape)):
                    if isinstance(want, int) and want >= 0 and want != got:
                        raise InputError(f"input {name!r}: dimension {ax} must be {want} "
                                         f"{_fmt_shape(shape)}, got {tuple(a.shape)}")
                    if isinstance(want, str) and want:
                        prev = symbols.get(want)
                        if prev is None:
                            symbols[want] = (got, name)
                        elif prev[0] != got:
                            raise InputError(f"input {name!r}: dimension {ax} ({want!r}) is {got} but input "
                                             f"{prev[1]!r} has {want!r} = {prev[0]}")
            arrays.append(a)
        return arrays

    # ------------------------------------------------------------------ run
    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run the graph; returns the outputs in graph["outputs"] order."""
        arrays = self._check_inputs(feeds)
        env = self._init.copy()
        for s, a in zip(self._in_slots, arrays):
            env[s] = a
        try:
            for fn, ins, out, single, frees in self._fast_steps:
                r = fn(*[env[i] for i in ins])
                if single:
                    env[out] = r
                else:
                    for o, v in zip(out, r):
                        if o >= 0:
                            env[o] = v
                for f in frees:
                    env[f] = None
        except (InputError, UnsupportedError):
            raise
        except Exception as e:
            step = self._locate_failure(fn)
            raise InputError(f"model failed at node {step}: {type(e).__name__}: {e}") from e
        return [_finalize(env[s]) for s in self._out_slots]

    def _locate_failure(self, fn) -> str:
        for step in self._steps:
            if step[0] is fn:
                return f"{step[5]} ({step[6]})"
        return "?"

    def run_profile(self, feeds: Mapping[str, np.ndarray], by: str = "op") -> tuple[list[np.ndarray], dict[str, float]]:
        """Like run, but also returns total seconds spent per op type (by="node": per node name)."""
        import time

        arrays = self._check_inputs(feeds)
        env = self._init.copy()
        for s, a in zip(self._in_slots, arrays):
            env[s] = a
        prof: dict[str, float] = {}
        for fn, ins, out, single, frees, name, op in self._steps:
            t = time.perf_counter()
            r = fn(*[env[i] for i in ins])
            key = name if by == "node" else op
            prof[key] = prof.get(key, 0.0) + time.perf_counter() - t
            if single:
                env[out] = r
            else:
                for o, v in zip(out, r):
                    if o >= 0:
                        env[o] = v
            for f in frees:
                env[f] = None
        return [_finalize(env[s]) for s in self._out_slots], prof


# ops whose (first) output is always a newly allocated array that no other value aliases
_FRESH_OPS = {"MatMul", "Gemm", "Conv", "Add", "Sub", "Mul", "Div", "Softmax", "LayerNormalization", "Gelu",
              "Tanh", "Exp", "Sqrt", "Sigmoid", "Erf", "Relu", "Where"}
_INPLACE_UFUNCS = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}


def _inplace_binary(ufunc, j, fallback):
    """Write the result into operand j (a fresh float intermediate with no other reader) when shapes allow."""
    def f(a, b):
        t, o = (a, b) if j == 0 else (b, a)
        if type(t) is np.ndarray and t.dtype.kind == "f" and t.dtype == o.dtype and t.ndim >= o.ndim:
            try:
                return ufunc(a, b, out=t)
            except ValueError:  # broadcasting would need a bigger output
                pass
        return fallback(a, b)
    return f


def _finalize(a):
    a = np.asarray(a)
    if not a.flags.writeable or not a.flags.c_contiguous:
        a = np.array(a, copy=True, order="C")
    return a


def _fmt_shape(shape) -> str:
    if shape is None:
        return ""
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _safe_cast(name: str, a: np.ndarray, dt: np.dtype) -> np.ndarray:
    k_from, k_to = a.dtype.kind, dt.kind
    if k_from in _INT_KINDS and k_to in _INT_KINDS:
        if a.size:
            info = np.iinfo(dt)
            lo, hi = a.min(), a.max()
            if lo < info.min or hi > info.max:
                raise InputError(f"input {name!r}: expected {dt}, got {a.dtype} with values out of range")
        return a.astype(dt)
    if k_from == "f" and k_to == "f" and (dt.itemsize <= a.dtype.itemsize):
        # float64 -> float32 (and float32 -> float16) are accepted
        return a.astype(dt)
    if k_from == "f" and k_to == "f":
        return a.astype(dt)  # widening is always safe
    if k_from == "b" and k_to == "b":
        return a
    if k_from in _INT_KINDS and k_to == "f" and a.dtype.itemsize < dt.itemsize:
        return a.astype(dt)  # small ints (e.g. uint8 pixels) fit exactly
    raise InputError(f"input {name!r}: expected dtype {dt}, got {a.dtype}")
