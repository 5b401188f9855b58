"""The nadoo graph engine: plan once, run many.

A *nadoo graph* is a JSON-serializable dict (see compiler/onnx_to_graph.py)::

    {"opset": {"": 18}, "inputs": [{"name", "dtype", "shape"}], "outputs": [...],
     "nodes": [{"op", "domain", "name", "inputs", "outputs", "attrs"}], "constants": [names]}

validated by :class:`nadoo.runtime.schema.Graph` (the one place graphs are checked). :class:`Plan`
resolves every node to a Python callable once (custom ops first, then the built-in NumPy ops in
``nadoo.runtime.ops``, then - only if needed, and only where ``onnx`` is installed - a per-node
``onnx.reference`` fallback), assigns every value an integer slot, and computes after which node each
intermediate can be released. :meth:`Plan.run` is then a tight loop over precomputed steps, which
refuses any step that would exceed the run-time size caps (format.MIN_VALUE_CAP and friends) before
its kernel allocates: a small bundle cannot make a run allocate or compute without bound.

Every failure is a NadooError: a builder that cannot use a node's attributes or constant inputs raises
ModelError at plan build; a kernel that fails on the inputs raises InputError.

This module imports NumPy only (never onnx at import time, never torch).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .errors import InputError, ModelError, NadooError
from .format import MAX_ELEMENTS, MIN_VALUE_CAP, VALUE_CAP_PER_BYTE, WORK_PER_ELEMENT
from .node_build import BuildContext, Builder, build_node, reference_available, size_rule_of  # noqa: F401
from .schema import Graph

__all__ = ["Plan", "BuildContext", "Builder", "build_node"]  # the last three: runtime/node_build.py


def value_cap(model_bytes: int, input_bytes: int) -> int:
    """The most elements one value of a run may have (spec §5, running): a floor for small models,
    growing with the model's and the inputs' size."""
    return min(MAX_ELEMENTS, max(MIN_VALUE_CAP, VALUE_CAP_PER_BYTE * (model_bytes + input_bytes)))


# ---------------------------------------------------------------------------------------------- plan
_INT_KINDS = "iu"


class Plan:
    """A graph resolved to callables. ``Plan(graph, constants).run({name: array}) -> [outputs]``.

    model_bytes: the size of the model the graph belongs to (a Session passes the bundle's payload
    bytes; default: the constants' bytes); with the inputs' bytes it scales the run-time value cap
    (`value_cap`). max_elements: a fixed cap instead. weight_shapes: shapes of the chunked weights that
    nadoo nodes name, so their outputs are checked before they are computed too. state: per-sequence
    state of stateful ops (kv_cache.SequenceState), owned and reset by the caller."""

    def __init__(self, graph: dict | Graph, constants: Mapping[str, np.ndarray],
                 custom_ops: dict[tuple[str, str], Builder] | None = None, model_bytes: int | None = None,
                 max_elements: int | None = None, weight_shapes: Mapping[str, tuple] | None = None,
                 state: Any = None):
        g = Graph.from_json(graph.to_json() if isinstance(graph, Graph) else graph, constants=constants)
        self.graph = g.to_json()
        opsets = dict(g.opset)
        self._inputs = [i.to_json() for i in g.inputs]
        self._outputs = [o.to_json() for o in g.outputs]
        self.model_bytes = int(model_bytes if model_bytes is not None
                               else sum(int(np.asarray(constants[n]).nbytes) for n in g.constants))
        self.max_elements = max_elements

        slots: dict[str, int] = {}

        def slot(name):
            s = slots.get(name)
            if s is None:
                s = slots[name] = len(slots)
            return s

        slot("")  # slot 0: omitted optional input -> always None
        init: dict[int, np.ndarray] = {}
        const_set = set(g.constants)
        for n in g.constants:
            init[slot(n)] = constants[n]
        in_names = [i.name for i in g.inputs]
        for n in in_names:
            slot(n)

        # liveness: last node index that reads each value
        last_use: dict[str, int] = {}
        for k, nd in enumerate(g.nodes):
            for n in nd.inputs:
                if n:
                    last_use[n] = k
        keep = set(o.name for o in g.outputs) | const_set | set(in_names)

        # consumers per value (for in-place reuse of fresh, single-use intermediates)
        n_consumers: dict[str, int] = {}
        for nd in g.nodes:
            for n in set(nd.inputs):
                if n:
                    n_consumers[n] = n_consumers.get(n, 0) + 1
        fresh: set[str] = set()

        steps, labels = [], []
        for k, nd in enumerate(g.nodes):
            ins = list(nd.inputs)
            # trailing omitted inputs are dropped, so builders' default args kick in
            while ins and ins[-1] == "":
                ins.pop()
            consts = [constants[n] if n in const_set else None for n in ins]
            node_view = nd.to_json()
            node_view["inputs"] = ins
            fn = build_node(node_view, consts, opsets, custom_ops, state)
            need = size_rule_of(node_view, (consts, opsets, weight_shapes))
            dom, op = nd.domain, nd.op
            if not (custom_ops and (dom, op) in custom_ops):
                if dom == "" and op in _INPLACE_UFUNCS and len(ins) == 2:
                    cand = [j for j, n in enumerate(ins) if n in fresh and n not in keep
                            and n_consumers.get(n) == 1]
                    if cand:
                        fn = _inplace_binary(_INPLACE_UFUNCS[op], cand[0], fn)
                if dom == "" and op in _FRESH_OPS:
                    fresh.update(o for o in nd.outputs if o)
            in_slots = tuple(slot(n) for n in ins)
            outs = list(nd.outputs)
            out_slots = tuple(slot(n) if n else -1 for n in outs)
            frees = tuple(sorted({slot(n) for n in ins if n and n not in keep and last_use.get(n) == k}
                                 | {slot(n) for n in outs if n and n not in keep and n not in last_use}))
            single = len(outs) == 1
            steps.append((fn, in_slots, out_slots[0] if single else out_slots, single, frees, need))
            labels.append((f"{nd.name} ({op})", op, nd.name))

        self._n_slots = len(slots)
        self._init = [None] * self._n_slots
        for s, v in init.items():
            self._init[s] = v
        self._slots = slots
        self._steps = steps
        self._labels = labels
        self._in_slots = [slots[n] for n in in_names]
        self._out_slots = [slots[o.name] for o in g.outputs]
        self._input_specs = [(i.name, np.dtype(i.dtype) if i.dtype else None, i.shape) for i in g.inputs]

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
        return [lab[2] for s, lab in zip(self._steps, self._labels) if getattr(s[0], "onnx_reference", False)]

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
        return self._execute(feeds, None)

    def run_profile(self, feeds: Mapping[str, np.ndarray], by: str = "op") -> tuple[list[np.ndarray], dict[str, float]]:
        """Like run, but also returns total seconds spent per op type (by="node": per node name)."""
        prof: dict[str, float] = {}
        return self._execute(feeds, prof, 2 if by == "node" else 1), prof

    def _execute(self, feeds, prof: dict | None, label: int = 1) -> list[np.ndarray]:
        arrays = self._check_inputs(feeds)
        cap = self.max_elements or value_cap(self.model_bytes, sum(int(a.nbytes) for a in arrays))
        env = self._init.copy()
        for s, a in zip(self._in_slots, arrays):
            env[s] = a
        self.run_steps(self._steps, self._labels, env, cap, prof, label)
        return [_finalize(env[s]) for s in self._out_slots]

    def run_steps(self, steps: list, labels: list, env: list, cap: int, prof: dict | None = None,
                  label: int = 1) -> None:
        """Run `steps` over the value slots `env` under the run's element cap. A step whose `single`
        flag is None is a fused run of nodes (see `fuse`): it is called as `fn.run(args, cap, prof,
        label)` and returns its outputs, checked like any node's."""
        work_cap = WORK_PER_ELEMENT * cap
        clock = None
        if prof is not None:
            import time

            clock = time.perf_counter
        k = 0
        try:
            for k, (fn, ins, out, single, frees, need) in enumerate(steps):
                args = [env[i] for i in ins]
                if need is not None:
                    elements, macs = need(*args)
                    if elements > cap or macs > work_cap:
                        self.refuse(labels[k][0], elements, macs, cap)
                if clock is not None:
                    t = clock()
                r = fn(*args) if single is not None else fn.run(args, cap, prof, label)
                if clock is not None and single is not None:
                    key = labels[k][label]
                    prof[key] = prof.get(key, 0.0) + clock() - t
                if single:
                    if getattr(r, "size", 0) > cap:  # a broadcast view counts at its logical size
                        self.too_big(labels[k][0], r.size, cap)
                    env[out] = r
                else:
                    for o, v in zip(out, r):
                        if getattr(v, "size", 0) > cap:
                            self.too_big(labels[k][0], v.size, cap)
                        if o >= 0:
                            env[o] = v
                for f in frees:
                    env[f] = None
        except NadooError:
            raise
        except Exception as e:
            raise InputError(f"model failed at node {labels[k][0]}: {type(e).__name__}: {e}") from e

    @staticmethod
    def refuse(label: str, elements: int, macs: int, cap: int):
        if elements > cap:
            Plan.too_big(label, elements, cap)
        raise ModelError(f"node {label} would do {macs:,} multiply-adds, over the run's cap of "
                         f"{WORK_PER_ELEMENT * cap:,} (format_spec/NDC-v1.md §5)")

    @staticmethod
    def too_big(label: str, elements: int, cap: int):
        raise ModelError(f"node {label} would produce {elements:,} elements, over the run's cap of "
                         f"{cap:,} (format_spec/NDC-v1.md §5)")

    # ------------------------------------------------------------------ fused runs of nodes
    @property
    def nodes(self) -> list[dict]:
        """The graph's nodes, one per step of an unfused plan, in order."""
        return self.graph["nodes"]

    def slot_of(self, name: str) -> int:
        return self._slots[name]

    @property
    def initial_values(self) -> list:
        """The value slots before a run: constants filled in, everything else None."""
        return self._init

    def fuse(self, runs: list) -> None:
        """Replace runs of consecutive steps by one step each. `runs`: (first, end, fused) with steps
        first..end-1 of the current plan; `fused.bind(steps, labels, in_slots, out_slots)` receives
        the steps it replaces and the slots of `fused.inputs` / `fused.outputs` (value names), and
        `fused.run(args, cap, prof, label)` computes the outputs from the inputs' values. The values
        the replaced steps released are released after the fused step."""
        steps, labels, at = [], [], 0
        for first, end, fused in sorted(runs, key=lambda r: r[0]):
            steps += self._steps[at:first]
            labels += self._labels[at:first]
            sub, sub_labels = self._steps[first:end], self._labels[first:end]
            in_slots = tuple(self._slots[n] for n in fused.inputs)
            out_slots = tuple(self._slots[n] for n in fused.outputs)
            fused.bind(sub, sub_labels, in_slots, out_slots)
            frees = tuple(sorted({f for st in sub for f in st[4]}))
            steps.append((fused, in_slots, out_slots, None, frees, None))
            labels.append(fused.label)
            at = end
        self._steps = steps + self._steps[at:]
        self._labels = labels + self._labels[at:]


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
