"""The ONNX Runtime engine: the dense part of a plan runs in onnxruntime, the rest stays in NumPy.

After a session's Plan is built, every node is classified. ORT takes a standard ONNX operator (the
ai.onnx domain, defined at the graph's opset) and a chunked op whose policy reads every chunk at one
tier (`WeightOp.whole_tiers`: ChunkedLinear, ChunkedFFN, ChunkedConv, ChunkedConvTranspose,
ChunkedRecurrent, through their `export`; ChunkedGather under a dense policy, as GatherBlockQuantized
over its stored codes). NumPy keeps what selects per input (top-k layers, MoE, ChunkedGather under a
routed policy, which reads only the rows looked up), what holds state (nadoo.Attention and its KV
cache), chunked layers under a memory budget (they stream through the bounded cache), and generators whose output size is a run-time value
computed from an input's data (Expand, Range, ... with such a size input: the plan checks those before
they allocate); sized by constants or by shapes (`shape_derived`), they run in ORT.
Each maximal run of consecutive ORT nodes becomes one onnxruntime.InferenceSession (`OrtSegment`),
fused into the plan as one step; NumPy nodes and segments then run in graph order.

Weights are read once, when the session opens, and handed to ORT as initializers (never graph inputs:
ORT prepacks only initializers): a linear layer as com.microsoft MatMulNBits over its stored codes
with integer zero points where the bundle stores that layout (`Bundle.read_packed`) and the product
is fast (4 bits exact; every width with int8 activations), else dequantized float32 (MatMul).
Segments are built one at a time, largest first, and a weight reaches ORT without copies of its own
(no TensorProto, no serialized model holding it: `_session`); the MatMulNBits and float MatMul
weights ORT has prepacked are then dropped, so a weight is resident once. `resident_bytes` counts
what the sessions hold.

Run-time caps hold in segments as in the plan: for each new combination of input shapes (and small
integer input values), every value of the segment gets its shape — from our own rules
(runtime/segment_shapes.py) where they cover the segment, else from ONNX shape inference — and the
plan's size rules and element cap are checked on them before ORT runs. Shapes that cannot be settled
run the segment's nodes in NumPy for that signature (same results, the plan's own checks). The same
layer statistics are counted.

onnxruntime is imported only when this engine is chosen, onnx only for a segment our rules do not cover.
"""
from __future__ import annotations

import importlib.util
import threading

import numpy as np

from . import callstats
from .errors import InputError, NadooError, UnsupportedError, one_line
from .ort_build import (SegmentExporter, _opsets, ort_able, runs_of, shape_derived,  # noqa: F401
                        value_types)
from .ort_session import _prepacks, _session  # noqa: F401  (tests reach these through this module)
from .segment_shapes import covers, segment_shapes

ENGINES = ("auto", "numpy", "ort")

_SMALL_CONST = 256  # constants up to this many elements stay data in the shape-inference model (shape values)
_SETTLE_ROUNDS = 4  # fold, infer, fold what the inferred shapes settle, ...: shape chains are short
_UNSEEN = object()


def resolve(engine: str) -> str:
    """'numpy' or 'ort' for --engine auto|numpy|ort; `ort` without onnxruntime/onnx is one clear error."""
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r} (auto, numpy or ort)")
    if engine == "numpy":
        return "numpy"
    # onnx is found, not imported (~0.75 s of CPU): most plans build their segments without it
    # (runtime/onnx_proto.py, runtime/onnx_types.py); a graph its inference is needed for imports it then.
    missing = [m for m in ("onnxruntime", "onnx") if not _findable(m)]
    if missing:
        if engine == "ort":
            raise UnsupportedError(f"--engine ort needs onnxruntime and onnx (pip install 'nadoo[ort]'): "
                                   f"no module named {missing[0]!r}")
        return "numpy"
    import onnxruntime  # noqa: F401  (a broken install fails here, not in the middle of an open)

    return "ort"


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules holds None for it (import blocked)
        return False


class OrtOptions:
    """Session options of the ORT engine. threads: ORT's intra-op threads (None: ORT's default, one per
    core); int8: MatMulNBits with int8 activations (accuracy_level 4: faster, activations rounded
    per block as llama.cpp's quantized products do) instead of exact float products (level 0)."""

    def __init__(self, threads: int | None = None, int8: bool = False):
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise InputError(f"threads must be a positive integer, got {threads!r}")
        self.threads, self.int8 = threads, bool(int8)
        self.spin = False  # set when one segment is the whole plan (`hybridize`)

    def session_options(self, ort):
        so = ort.SessionOptions()
        so.inter_op_num_threads = 1
        if self.threads:
            so.intra_op_num_threads = self.threads
        # NumPy nodes run between segments: ORT's idle workers must not spin on the cores they need.
        # When ORT runs the whole plan nothing else runs there, and its workers spin between parallel
        # regions as in any ORT session (no wake-up per region).
        if not self.spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        return so


def hybridize(plan, session, options: OrtOptions) -> list["OrtSegment"]:
    """Fuse the ORT-able runs of `session.plan` into ORT segments; the segments built."""
    import onnxruntime as ort

    nodes, graph, bundle = plan.nodes, plan.graph, session.bundle
    const = set(graph.get("constants", []))
    opsets = {("" if d == "ai.onnx" else d): v for d, v in (graph.get("opset") or {}).items()}
    ops = iter(session.ops)
    op_of = [next(ops) if n.get("domain") == "nadoo" and n["op"] in _chunked_types() else None for n in nodes]
    derived = shape_derived(nodes, const)
    init = plan.initial_values
    constants = {n: init[plan.slot_of(n)] for n in const}
    types = value_types(graph, constants)
    flags = [ort_able(n, op, opsets, derived, types) for n, op in zip(nodes, op_of)]
    graph_outs = {o["name"] for o in graph["outputs"]}
    last_use = {}
    for k, n in enumerate(nodes):
        for i in n["inputs"]:
            if i:
                last_use[i] = k

    def weights(span) -> int:
        return sum(int(np.prod(bundle.tensors[k].shape)) for op in op_of[span[0]:span[1]] if op is not None
                   for k in op.whole_tiers() or {} if k in bundle.tensors)

    spans = runs_of(flags)
    if spans == [(0, len(nodes))]:
        options.spin = True
    # Largest first: building a segment takes transient memory (ORT prepacks beside our arrays), and the
    # open's peak is that transient on top of the segments already built.
    fused = []
    for first, end in sorted(spans, key=lambda span: -weights(span)):
        run = nodes[first:end]
        produced = {o for n in run for o in n["outputs"] if o}
        inputs = list(dict.fromkeys(i for n in run for i in n["inputs"] if i and i not in produced and i not in const))
        outputs = [o for n in run for o in n["outputs"] if o and (o in graph_outs or last_use.get(o, -1) >= end)]
        if not outputs or any(i not in types for i in inputs):
            continue
        try:
            seg = OrtSegment(run, op_of[first:end], inputs, outputs, types, bundle, constants, graph, options, ort,
                             (first, end))
        except NadooError:
            raise
        except Exception:  # ORT cannot build this run (an operator it lacks): it stays in NumPy
            continue
        seg.plan = plan
        fused.append((first, end, seg))
    fused.sort(key=lambda f: f[0])
    plan.fuse(fused)
    if any(not seg.own_shapes for _, _, seg in fused):
        # The segments are built without onnx (onnx_proto, onnx_types); a segment whose operators
        # segment_shapes does not cover settles its shapes at the first call of each input shape with
        # onnx's shape inference (`OrtSegment._infer`): import it now (~0.75 s of CPU, mostly ml_dtypes),
        # so an opened session's first call does not pay for it.
        try:
            import onnx  # noqa: F401
        except ImportError:  # resolve() found it; a broken install shows at the first settle instead
            pass
    return [seg for _, _, seg in fused]


def _chunked_types():
    from . import chunked

    return chunked.REGISTRY


# ---------------------------------------------------------------------------------------------- segment
def _shape_value(a: np.ndarray) -> bool:
    """A few integers (a count, a shape, slice bounds): sizes downstream may depend on their value, so
    segments settle shapes per value of such an input, not per shape alone."""
    return a.dtype.kind in "iu" and a.size <= 8


class OrtSegment:
    """One run of consecutive nodes computed by one onnxruntime.InferenceSession (a fused plan step)."""

    def __init__(self, run: list[dict], ops: list, inputs: list[str], outputs: list[str], types: dict, bundle,
                 constants: dict, graph: dict, options: OrtOptions, ort, span: tuple[int, int]):
        from . import onnx_proto as helper

        numpy_helper = helper

        self.inputs, self.outputs, self.nodes = inputs, outputs, run
        self.label = (f"ORT segment {span[0]}..{span[1] - 1} ({run[0]['name']} .. {run[-1]['name']}, "
                      f"{len(run)} nodes)", "OrtSegment", f"ort:{run[0]['name']}")
        self.whole = [op for op in ops if op is not None]
        used = {i for n in run for i in n["inputs"] if i}
        self._consts = {k: np.asarray(constants[k]) for k in used if k in constants}  # for segment_shapes
        self.own_shapes = all(covers(n, op) for n, op in zip(run, ops))
        tiers = {k: v for op in self.whole for k, v in op.whole_tiers().items()}
        # first inputs whose values the layer statistics count (a lookup's indices, `counts_values`): a
        # constant's is known, a segment input's is at hand, any other is one more output of the session
        probe = list(dict.fromkeys(op.node["inputs"][0] for op in self.whole if op.counts_values))
        self._known = {k: np.asarray(constants[k]) for k in probe if k in constants}
        self._probe = [k for k in probe if k not in self._known and k not in inputs and k not in outputs]

        def export(shapes_only: bool) -> SegmentExporter:
            ex = SegmentExporter(bundle, tiers, options.int8, shapes_only, constants)
            for n in run:
                ex.graph_node(n)
            used = {i for nd in ex.nodes for i in nd.input}
            for k in constants:
                if k in used and k not in ex.inits:
                    ex.inits[k] = np.asarray(constants[k])
            return ex

        ex = export(False)
        self.kernels = [(nd.domain or "", nd.op_type) for nd in ex.nodes]  # (domain, op) of each ORT node, in order
        # the chunked weights handed over (the plan's constants are held by the plan either way)
        self.resident_bytes = int(sum(np.asarray(a).nbytes for k, a in ex.inits.items() if k not in constants))
        in_vi = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(types[n]), None) for n in inputs]
        out_vi = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(types[n]) if n in types else 0, None)
                  for n in outputs + self._probe]
        extra = {"com.microsoft": 1} if ex.uses_ms else None

        def model(ex, inits: dict, as_inputs: dict, outs: list):
            g = helper.make_graph(ex.nodes, "nadoo_segment", in_vi + [
                helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
                for k, a in as_inputs.items()], outs, [numpy_helper.from_array(np.asarray(a), k) for k, a in inits.items()])
            m = helper.make_model(g, opset_imports=_opsets(helper, graph, extra), producer_name="nadoo")
            m.ir_version = min(m.ir_version, 10)
            return m

        self.sess, self._held = _session(ort, options, model(ex, {}, {}, out_vi), ex.inits, ex.nodes, constants)
        del ex

        def shape_model():
            # Shape inference needs the shape values (small constants), not the weights: they are typed
            # inputs there; it has no outputs (inference leaves a declared output's shape as declared).
            sx = export(True)
            big = {k: np.asarray(a) for k, a in sx.inits.items() if np.asarray(a).size > _SMALL_CONST}
            return model(sx, {k: a for k, a in sx.inits.items() if k not in big},
                         {k: np.broadcast_to(np.zeros((), a.dtype), a.shape) for k, a in big.items()}, [])

        self._build_shape_model, self._shape_model = shape_model, None  # built by the first shape check
        self._checked: dict = {}
        self._lock = threading.Lock()

    def bind(self, steps, labels, in_slots, out_slots) -> None:
        """The plan's steps this segment replaces (run when a shape cannot be settled), and its slots."""
        self.steps, self.step_labels, self.in_slots, self.out_slots = steps, labels, in_slots, out_slots

    # ------------------------------------------------------------------ per input shape
    def _check_for(self, sig, args):
        got = self._checked.get(sig, _UNSEEN)
        if got is _UNSEEN:  # a shape inference cannot settle is remembered too: it is not retried per call
            got = self._settle(args)
            with self._lock:
                self._checked[sig] = got
        return got

    def _settle(self, args):
        """For these inputs' shapes: (largest value and its node, most multiply-adds and its node, the
        chunked layers' (op, x shape, y shape, multiply-adds)), or None when a value's shape stays open.
        Our rules (runtime/segment_shapes.py) first; onnx's inference only where they do not settle."""
        try:
            own = self._own_shapes(args, partial=False) if self.own_shapes else None
            if own is None:  # an operator without a rule, or a value not settled: onnx's inference helps
                own = self._onnx_shapes(args)
        except ValueError:  # shapes the kernels would refuse: the plan's own steps report it
            return None
        if own is None:
            return None
        shapes, folded = own
        init = self.plan.initial_values
        worst_el, worst_macs, layers = (0, ""), (0, ""), []
        ops = iter(self.whole)
        for n, step, lab in zip(self.nodes, self.steps, self.step_labels):
            outs = [o for o in n["outputs"] if o]
            if any(o not in shapes for o in outs):
                return None
            for o in outs:
                worst_el = max(worst_el, (int(np.prod(shapes[o], dtype=np.int64)), lab[0]))
            need, in_slots = step[5], step[1]
            if need is not None:
                dummies = []
                for name, s in zip([i for i in n["inputs"]][: len(in_slots)], in_slots):
                    if init[s] is not None or name in folded:
                        dummies.append(init[s] if init[s] is not None else folded[name])
                    elif not name:
                        dummies.append(None)
                    elif name in shapes:
                        dummies.append(np.broadcast_to(np.zeros((), np.float32), shapes[name]))
                    else:
                        return None
                try:
                    el, macs = need(*dummies)
                except Exception:
                    return None  # the NumPy steps report what is wrong with these inputs
                worst_el, worst_macs = max(worst_el, (el, lab[0])), max(worst_macs, (macs, lab[0]))
            if n.get("domain") == "nadoo":
                x, y = n["inputs"][0], n["outputs"][0]
                if x not in shapes:
                    return None
                op = next(ops)
                layers.append((op, shapes[x], shapes.get(y), op.macs_for(shapes[x], shapes.get(y))))
        return worst_el, worst_macs, layers

    def _infer(self, args, folded: dict) -> dict | None:
        """Every value's shape ONNX shape inference settles with the inputs' shapes and the folded
        values as constants, or None when inference fails."""
        try:
            import onnx
            from onnx import numpy_helper
        except ImportError:
            return None
        m = onnx.ModelProto()
        with self._lock:
            if self._shape_model is None:  # written by onnx_proto: parsed once into onnx's message
                self._shape_model = onnx.ModelProto.FromString(self._build_shape_model().SerializeToString())
        m.CopyFrom(self._shape_model)
        for nd in list(m.graph.node):  # nodes computing only folded values: their values instead
            if all(o in folded for o in nd.output if o):
                m.graph.node.remove(nd)
        for name, a in folded.items():
            if name not in self.inputs:
                m.graph.initializer.append(numpy_helper.from_array(np.asarray(a), name))
        for vi, a in zip(list(m.graph.input[: len(args)]), args):
            if _shape_value(a):  # its value is part of the signature: a constant for inference's data propagation
                m.graph.initializer.append(numpy_helper.from_array(a, vi.name))
                m.graph.input.remove(vi)
                continue
            dims = vi.type.tensor_type.shape
            for d in a.shape:
                dims.dim.add().dim_value = int(d)
        try:
            m = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
        except Exception:
            return None
        shapes = {n: tuple(np.shape(a)) for n, a in folded.items()}
        for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input):
            t = vi.type.tensor_type
            if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
                shapes.setdefault(vi.name, tuple(int(d.dim_value) for d in t.shape.dim))
        return shapes

    def _own_shapes(self, args, partial: bool) -> tuple[dict, dict] | None:
        """(shapes, values) runtime/segment_shapes.py settles for these inputs: the small integer values
        (`_shape_value`) among them, the constants and the shapes computed from those by the plan's own
        kernels. Each is a function of the segment's signature (input shapes and small integer values):
        what is settled for one signature holds for every call with it."""
        shapes = {**{k: a.shape for k, a in self._consts.items()},
                  **{n: tuple(a.shape) for n, a in zip(self.inputs, args) if isinstance(a, np.ndarray)}}
        values = {**self._consts, **{n: a for n, a in zip(self.inputs, args)
                                     if isinstance(a, np.ndarray) and _shape_value(a)}}
        return segment_shapes(self.nodes, self.whole, shapes, values, self._evaluate, partial)

    def _evaluate(self, k: int, vals: list) -> list:
        """Node k's outputs by the plan's kernel from its inputs' values (constants from the plan)."""
        fn, in_slots, _, single, _, _ = self.steps[k]
        init = self.plan.initial_values
        r = fn(*[init[s] if init[s] is not None else v for s, v in zip(in_slots, vals)])
        return [r] if single else list(r)

    def _onnx_shapes(self, args) -> tuple[dict, dict] | None:
        """Our rules where they apply, onnx's shape inference for the rest: fold, infer, fold what the
        inferred shapes settle, ... (ONNX's data propagation stops at many ops; shape chains are short)."""
        shapes, values = self._own_shapes(args, partial=True)
        for _ in range(_SETTLE_ROUNDS):
            folded = {k: v for k, v in values.items() if k not in self._consts and _shape_value(v)}
            inferred = self._infer(args, folded)
            if inferred is None:
                return None
            more = segment_shapes(self.nodes, self.whole, {**inferred, **shapes}, values, self._evaluate, True)
            if more[0].keys() <= shapes.keys() and more[1].keys() <= values.keys():
                break
            shapes, values = more
        return shapes, values

    # ------------------------------------------------------------------ running
    def run(self, args, cap: int, prof, label: int):
        from .engine import WORK_PER_ELEMENT, Plan

        sig = tuple(None if not isinstance(a, np.ndarray) else (a.dtype.str, a.shape, a.tobytes() if _shape_value(a) else b"")
                    for a in args)
        checked = self._check_for(sig, args) if None not in sig else None
        if checked is None:  # shapes not settled: the NumPy steps, with the plan's own checks
            env = self.plan.initial_values.copy()
            for s, a in zip(self.in_slots, args):
                env[s] = a
            self.plan.run_steps(self.steps, self.step_labels, env, cap, prof, label)
            return [env[s] for s in self.out_slots]
        (el, el_node), (macs, macs_node), layers = checked
        if el > cap:
            Plan.too_big(el_node, el, cap)
        if macs > WORK_PER_ELEMENT * cap:
            Plan.refuse(macs_node, 0, macs, cap)
        clock = None
        if prof is not None:
            import time

            clock, t = time.perf_counter, time.perf_counter()
        try:
            outs = self.sess.run(self.outputs + self._probe, {n: np.asarray(a, order="C") for n, a in zip(self.inputs, args)})
        except Exception as e:
            raise InputError(f"model failed in {self.label[0]}: {one_line(e)}") from None
        if clock is not None:
            key = self.label[label]
            prof[key] = prof.get(key, 0.0) + clock() - t
        # The layer counts are made when the statistics are read (callstats.defer): shape-only ones are
        # fixed per signature; counts from values (a lookup's indices) get a copy of the call's values.
        callstats.defer(_count_shapes, layers)
        values = None
        for op, xs, ys, layer_macs in layers:
            if op.counts_values:
                if values is None:
                    values = {**self._known, **dict(zip(self.inputs, args)), **dict(zip(self.outputs + self._probe, outs))}
                callstats.defer(op.count_whole, xs, ys, layer_macs, np.array(values[op.node["inputs"][0]]))
        return outs[: len(self.outputs)]


def _count_shapes(layers) -> None:
    for op, xs, ys, layer_macs in layers:
        if not op.counts_values:
            op.count_whole(xs, ys, layer_macs)
