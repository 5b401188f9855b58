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

Run-time caps hold in segments as in the plan: for each new combination of input shapes, ONNX shape
inference gives every value of the segment its shape, and the plan's size rules and element cap are
checked on them before ORT runs. A shape inference cannot settle runs the segment's nodes in NumPy
for that input shape (same results, the plan's own checks). The same layer statistics are counted.

onnxruntime and onnx are imported only when this engine is chosen.
"""
from __future__ import annotations

import importlib.util
import threading

import numpy as np

from . import callstats, onnx_proto
from .errors import InputError, NadooError, UnsupportedError, one_line
from .export_onnx import Exporter, _node_with_attrs
from .onnx_types import in_opset, infer_types
from .tiers import MATMUL_NBITS_BITS, TIER_BITS

ENGINES = ("auto", "numpy", "ort")

# Their output size is the value of these inputs: with a non-constant one the node stays in NumPy,
# whose size rule checks that value before the kernel allocates.
_VALUE_SIZED = {"Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2), "OneHot": (1,),
                "Pad": (1, 2, 3), "Resize": (1, 2, 3), "Upsample": (1,), "TopK": (1,)}
# Never in ORT: random numbers would differ between engines; subgraph attributes are not converted.
_NUMPY_ONLY = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
               "If", "Loop", "Scan"}
_SMALL_CONST = 256  # constants up to this many elements stay data in the shape-inference model (shape values)
_SHAPE_READERS = {"Shape", "Size"}  # their output is a function of their input's shape alone
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


# ---------------------------------------------------------------------------------------------- building
class SegmentExporter(Exporter):
    """An Exporter whose chunked weights come at the tier each layer's plan reads, linear layers as
    MatMulNBits over the stored codes where the bundle has them in that layout."""

    def __init__(self, bundle, tiers: dict[str, str], int8: bool, shapes_only: bool = False,
                 constants: dict | None = None):
        super().__init__(bundle, None, constants, proto=onnx_proto)
        self.tiers, self.int8, self.shapes_only = tiers, int8, shapes_only
        self.uses_ms = False

    def weight(self, name: str, transposed: bool = False) -> np.ndarray:
        e = self.bundle.tensors[name]
        if self.shapes_only:  # the graph for shape inference: weights of the right shape, nothing read
            return np.broadcast_to(np.zeros((), np.float32), (e.row_len, e.rows) if transposed else tuple(e.shape))
        w = self.bundle.read_weight(name, self.tiers[name])
        return np.ascontiguousarray(w.reshape(e.rows, e.row_len).T if transposed else w)

    def linear(self, x: str, name: str, bias: str, out: str, rows: np.ndarray | None = None) -> None:
        if self.shapes_only:  # a row permutation leaves every shape as it is (and would copy the zeros)
            rows = None
        if not self._nbits(x, name, bias, out, of_transpose=False, rows=rows):
            super().linear(x, name, bias, out, rows)

    def linear_transposed(self, x: str, name: str, bias: str, out: str) -> None:
        if not self._nbits(x, name, bias, out, of_transpose=True):
            super().linear_transposed(x, name, bias, out)

    def gather(self, name: str, idx: str, out: str) -> None:
        """Rows of an embedding table as com.microsoft GatherBlockQuantized over the stored codes (the
        table stays at its tier's bytes in ORT) where the bundle stores them in that layout and ORT's
        kernel takes it (4 or 8 bits, whole bytes of zero points per row); else a float Gather."""
        p = self._packed(name, of_transpose=False, bits=(4, 8))
        if p is None or p.row_len % p.block_size or (p.row_len // p.block_size * p.bits) % 8 or p.block_size < 16:
            return super().gather(name, idx, out)
        codes, scales, zps = self._pack_inits(name, p, lambda a: a)
        self.inits[codes] = self.inits[codes].reshape(p.rows, -1)
        self.inits[scales] = self.inits[scales].reshape(p.rows, -1)
        self.inits[zps] = self.inits[zps].reshape(p.rows, -1)
        self.nodes.append(self.helper.make_node(
            "GatherBlockQuantized", [codes, idx, scales, zps], [out], name=self.fresh("GatherBlockQuantized"),
            domain="com.microsoft", bits=int(p.bits), block_size=int(p.block_size), gather_axis=0, quantize_axis=1))
        self.uses_ms = True

    def _packed(self, name: str, of_transpose: bool, bits) -> "PackedWeight | None":
        """The stored codes of `name` at its tier when they are zp-coded in the `of_transpose` layout at one
        of `bits` (never for the shape graph: ONNX shape inference knows no com.microsoft op)."""
        read = getattr(self.bundle, "read_packed", None)
        tier = self.tiers[name]
        if read is None or self.shapes_only or TIER_BITS.get(tier) not in bits:
            return None
        p = read(name, tier)
        return p if p is not None and p.of_transpose == of_transpose else None

    def _pack_inits(self, name: str, p, pick) -> tuple[str, str, str]:
        """Initializers of codes, scales and zero points (flat, as MatMulNBits takes them) of `p`, their rows
        chosen by `pick`; their names."""
        codes, scales, zps = (self.fresh(f"{name}_{s}") for s in ("codes", "scales", "zero_points"))
        self.inits[codes] = np.ascontiguousarray(pick(p.codes), np.uint8)
        self.inits[scales] = np.ascontiguousarray(pick(p.scales), np.float32).reshape(-1)
        self.inits[zps] = np.ascontiguousarray(pick(p.zero_points), np.uint8).reshape(-1)
        return codes, scales, zps

    def _nbits(self, x: str, name: str, bias: str, out: str, of_transpose: bool, rows=None) -> bool:
        """out = the product as MatMulNBits over the stored codes, if the bundle stores them in the layout
        this product takes (x·Wᵀ: groups along W's rows' length; x·W: along its rows) and the product is
        fast; False when the caller must hand the weight over as float32. `rows`: output j is stored row
        rows[j] (x·Wᵀ only)."""
        # MatMulNBits' exact path (accuracy level 0) is fast at 4 bits only (8 and 2 bits measured ~80x
        # slower than a float MatMul, ORT 1.32): exact 8- and 2-bit layers are handed over dequantized.
        p = self._packed(name, of_transpose, MATMUL_NBITS_BITS if self.int8 else (4,))
        if p is None:
            return False
        pick = (lambda a: a) if rows is None else (lambda a: a[rows])  # codes, scales, zero points are per row
        codes, scales, zps = self._pack_inits(name, p, pick)
        mid = self.fresh("mm") if bias else out
        self.nodes.append(self.helper.make_node(
            "MatMulNBits", [x, codes, scales, zps], [mid], name=self.fresh("MatMulNBits"), domain="com.microsoft",
            K=int(p.row_len), N=int(p.rows), bits=int(p.bits), block_size=int(p.block_size),
            accuracy_level=4 if self.int8 else 0))
        self.uses_ms = True
        if bias:
            self.add("Add", [mid, bias], [out])
        return True


def _np_type(onnx, elem: int):
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))


def value_types(graph: dict, constants) -> dict[str, np.dtype]:
    """dtype of every value of the graph ONNX type inference settles: nadoo nodes' outputs are float32
    (all of them compute in float32), constants and inputs as given. The rules of runtime/onnx_types.py
    where they cover the graph (no onnx import), else onnx's inference."""
    known = {i["name"]: np.dtype(i["dtype"]) for i in graph["inputs"] if i.get("dtype")}
    known.update({n: np.asarray(constants[n]).dtype for n in graph.get("constants", [])})
    for n in graph["nodes"]:
        if n.get("domain", "") == "nadoo":
            known.update({o: np.dtype(np.float32) for o in n["outputs"] if o})
    typed = infer_types(graph, known)
    if typed is not None:
        return typed
    import onnx
    from onnx import helper, numpy_helper

    nodes = []
    for n in graph["nodes"]:
        if n.get("domain", "") != "nadoo":
            nodes.append(_node_with_attrs(helper, numpy_helper, n["op"], n["inputs"], n["outputs"], n.get("name", ""),
                                          n.get("domain", ""), n.get("attrs") or {}))
    ins = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v), None) for k, v in known.items()]
    m = helper.make_model(helper.make_graph(nodes, "types", ins, []), opset_imports=_opsets(helper, graph))
    try:
        m = onnx.shape_inference.infer_shapes(m)
    except Exception:  # types stay those known above; a segment input of unknown type stays NumPy
        return known
    for vi in m.graph.value_info:
        if vi.type.tensor_type.elem_type:
            known.setdefault(vi.name, _np_type(onnx, vi.type.tensor_type.elem_type))
    return known


def _opsets(helper, graph: dict, extra: dict | None = None) -> list:
    ops = {("" if d == "ai.onnx" else d): int(v) for d, v in (graph.get("opset") or {}).items() if d != "nadoo"}
    ops.setdefault("", 18)
    ops.update(extra or {})
    return [helper.make_opsetid(d, v) for d, v in ops.items()]


def ort_able(node: dict, op, opsets: dict, const: set, types: dict) -> bool:
    """Whether ORT may run this node: a chunked op read whole at one tier, or a standard ONNX operator
    of the graph's opset that is not value-sized by a run-time value: its size inputs are in `const`,
    constants or values computed from shapes and constants alone (`shape_derived`; a segment settles
    those per input shape before ORT runs, see the module docstring)."""
    dom = node.get("domain", "") or ""
    if dom == "nadoo":
        return op is not None and op.whole_tiers() is not None and op.ort_types_ok(types)
    if dom not in ("", "ai.onnx") or node["op"] in _NUMPY_ONLY:
        return False
    if not in_opset(node["op"], int(opsets.get("", opsets.get("ai.onnx", 18)))):
        return False
    ins = node["inputs"]
    return all(i >= len(ins) or not ins[i] or ins[i] in const for i in _VALUE_SIZED.get(node["op"], ()))


def shape_derived(nodes: list[dict], const: set) -> set:
    """The constants and the values computed from shapes and constants alone (Shape, Size, then any
    standard operator over such values): for one set of input shapes each has one value, so a segment
    that settles it for a signature (`OrtSegment._settle`) has checked its size for every call with it.
    A value computed from an input's data (a ReduceMax of token ids, say) is not among them."""
    known = set(const)
    for n in nodes:
        if (n.get("domain", "") or "") not in ("", "ai.onnx") or n["op"] in _NUMPY_ONLY:
            continue
        if n["op"] in _SHAPE_READERS or (n["inputs"] and all(not i or i in known for i in n["inputs"])):
            known.update(o for o in n["outputs"] if o)
    return known


def runs_of(flags: list[bool]) -> list[tuple[int, int]]:
    """Maximal runs [first, end) of consecutive True flags."""
    out, start = [], None
    for k, f in enumerate(flags + [False]):
        if f and start is None:
            start = k
        elif not f and start is not None:
            out.append((start, k))
            start = None
    return out


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
    return [seg for _, _, seg in fused]


def _chunked_types():
    from . import chunked

    return chunked.REGISTRY


# ---------------------------------------------------------------------------------------------- segment
def _shape_value(a: np.ndarray) -> bool:
    """A few integers (a count, a shape, slice bounds): sizes downstream may depend on their value, so
    segments settle shapes per value of such an input, not per shape alone."""
    return a.dtype.kind in "iu" and a.size <= 8


_EMBED_BYTES = 4096  # initializers up to this size go into the model bytes, larger ones as external initializers


def _session(ort, options: OrtOptions, m, inits: dict, nodes, constants, embed_bytes: int = _EMBED_BYTES):
    """An InferenceSession over model `m` and its initializers `inits`, and the arrays it needs kept.

    Large initializers are not copied into the model: the model names them as external data and the
    session is given the arrays (SessionOptions.add_external_initializers), as initializers, so ORT
    still prepacks them. ORT may use such memory for the session's lifetime, so every array is kept,
    except a weight the installed ORT is seen to prepack (or copy) and never read again (`_prepacked`):
    dropped once the session exists (ORT 1.32 copies external initializers, then prepacks)."""
    from . import onnx_proto as helper
    from .onnx_proto import TensorProto

    numpy_helper = helper
    so = options.session_options(ort)  # one per session: it holds that session's initializers
    names, values, held = [], [], {}
    for k in list(inits):
        a = np.ascontiguousarray(inits.pop(k))
        if a.nbytes <= embed_bytes or a.dtype.hasobject:
            m.graph.initializer.append(numpy_helper.from_array(a, k))
            continue
        t = m.graph.initializer.add(name=k, data_type=helper.np_dtype_to_tensor_dtype(a.dtype), dims=a.shape,
                                    data_location=TensorProto.EXTERNAL)
        t.external_data.add(key="location", value="nadoo-memory")
        names.append(k)
        values.append(ort.OrtValue.ortvalue_from_numpy(a))
        held[k] = a
    if names:
        so.add_external_initializers(names, values)
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del so, values
    for k in _prepacked(ort, options, nodes, {k: a for k, a in held.items() if k not in constants}):
        del held[k]
    return sess, held


def _prepacked(ort, options: OrtOptions, nodes, held: dict) -> set:
    """The arrays of `held` whose only consumer is one node the installed ORT prepacks them for into a
    buffer of its own, never reading them again (`_prepacks`): a MatMulNBits' weight, scales and zero
    points, a float MatMul's 2-D weight, a GatherBlockQuantized's codes, scales and zero points (ORT
    1.32 copies external initializers; the probe says whether the installed one does)."""
    users: dict[str, list] = {}
    for nd in nodes:
        for i in nd.input:
            users.setdefault(i, []).append(nd)
    out = set()
    for k, a in held.items():
        nd = users.get(k, [])
        if len(nd) != 1 or list(nd[0].input).count(k) != 1:
            continue
        n, at = nd[0], list(nd[0].input).index(k)
        if n.op_type == "MatMulNBits" and n.domain == "com.microsoft" and at in (1, 2, 3):
            attrs = {x.name: x.i for x in n.attribute}
            kind = ("MatMulNBits", attrs.get("bits", 4), attrs.get("block_size", 0), attrs.get("accuracy_level", 0))
        elif n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and at == 1 and a.ndim == 2 and a.dtype == np.float32:
            kind = ("MatMul",)
        elif n.op_type == "GatherBlockQuantized" and n.domain == "com.microsoft" and at in (0, 2, 3):
            attrs = {x.name: x.i for x in n.attribute}
            kind = ("GatherBlockQuantized", attrs.get("bits", 4), attrs.get("block_size", 128))
        else:
            continue
        if _prepacks(ort, options, kind):
            out.add(k)
    return out


_PREPACKS: dict[tuple, bool] = {}
_PREPACKS_LOCK = threading.Lock()


def _prepacks(ort, options: OrtOptions, kind: tuple) -> bool:
    """Whether this ORT's node of `kind` (("MatMulNBits", bits, block_size, accuracy_level) or
    ("MatMul",)) reads its weight initializers only while the session is built: a small session over
    arrays handed over as external initializers must give the same product after the arrays are
    overwritten. Seen once per process and kind; whatever fails to show it keeps the arrays."""
    with _PREPACKS_LOCK:
        if kind not in _PREPACKS:
            _PREPACKS[kind] = _probe_prepack(ort, options, kind)
        return _PREPACKS[kind]


def _probe_prepack(ort, options: OrtOptions, kind: tuple) -> bool:
    from . import onnx_proto as helper
    from .onnx_proto import TensorProto

    try:
        rng = np.random.default_rng(0)
        if kind[0] == "MatMul":
            k, n = 64, 32
            arrays = {"b": rng.standard_normal((k, n)).astype(np.float32)}
            node, extra = helper.make_node("MatMul", ["x", "b"], ["y"]), []
            x = {"x": rng.standard_normal((1, k)).astype(np.float32)}
        elif kind[0] == "GatherBlockQuantized":  # x: row indices
            bits, block = kind[1:]
            n, k = 16, 2 * block
            arrays = {"b": rng.integers(0, 256, (n, k * bits // 8), dtype=np.uint8),
                      "s": rng.uniform(0.5, 1.0, (n, 2)).astype(np.float32),
                      "z": rng.integers(0, 256, (n, -(-(2 * bits) // 8)), dtype=np.uint8)}
            node = helper.make_node("GatherBlockQuantized", ["b", "x", "s", "z"], ["y"], domain="com.microsoft",
                                    bits=bits, block_size=block, gather_axis=0, quantize_axis=1)
            extra, x = [helper.make_opsetid("com.microsoft", 1)], {"x": np.array([[3, 0, 15]], np.int64)}
        else:
            bits, block, level = kind[1:]
            n, k = 16, 2 * block
            ng = k // block
            arrays = {"b": rng.integers(0, 256, (n, ng, block * bits // 8), dtype=np.uint8),
                      "s": rng.uniform(0.5, 1.0, n * ng).astype(np.float32),
                      "z": rng.integers(0, 256, n * -(-(ng * bits) // 8), dtype=np.uint8)}
            node = helper.make_node("MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n,
                                    bits=bits, block_size=block, accuracy_level=level)
            extra = [helper.make_opsetid("com.microsoft", 1)]
            x = {"x": rng.standard_normal((1, k)).astype(np.float32)}
        g = helper.make_graph([node], "probe", [helper.make_tensor_value_info(
                                  "x", helper.np_dtype_to_tensor_dtype(x["x"].dtype), list(x["x"].shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), *extra])
        m.ir_version = min(m.ir_version, 10)
        # every array as an external initializer (none embedded), none dropped (all named as constants)
        sess, held = _session(ort, options, m, dict(arrays), [], set(arrays), embed_bytes=0)
        if set(held) != set(arrays):
            return False
        before = sess.run(None, x)[0]
        for a in held.values():
            a[...] = rng.integers(0, 256, a.shape).astype(a.dtype) if a.dtype == np.uint8 else 7.0
        after = sess.run(None, x)[0]
        return bool(np.any(before != 0) and np.array_equal(before, after))
    except Exception:
        return False


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
        chunked layers' (op, x shape, y shape, multiply-adds)), or None when shape inference leaves a
        value open. Shape values computed from shapes (Shape, then arithmetic on it) are folded and
        inference rerun while that settles more of them: ONNX's data propagation stops at many ops."""
        shapes = {n: tuple(a.shape) for n, a in zip(self.inputs, args) if isinstance(a, np.ndarray)}
        folded = None
        for _ in range(_SETTLE_ROUNDS):
            more = self._fold(args, shapes)
            if folded is not None and more.keys() <= folded.keys():
                break
            folded = more
            inferred = self._infer(args, folded)
            if inferred is None:
                return None
            shapes.update(inferred)
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
        import onnx
        from onnx import numpy_helper

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

    def _fold(self, args, shapes: dict) -> dict:
        """The small integer values (`_shape_value`) computed from the segment's small integer inputs,
        constants and the known `shapes` (Shape and Size read only a shape) alone, by the plan's own
        kernels: ONNX's data propagation does not follow every operator (Neg of a count, say), so what it
        would miss is settled here. Each is a function of the segment's signature (input shapes and
        small integer values): what is settled for one signature holds for every call with it."""
        init = self.plan.initial_values
        known = {n: a for n, a in zip(self.inputs, args) if isinstance(a, np.ndarray) and _shape_value(a)}
        for n, (fn, in_slots, out, single, _, _) in zip(self.nodes, self.steps):
            if n.get("domain") == "nadoo" or not single:
                continue
            if n["op"] in _SHAPE_READERS:
                x = n["inputs"][0] if n["inputs"] else ""
                if x not in shapes:
                    continue
                vals = [np.broadcast_to(np.zeros((), np.float32), shapes[x])]  # the kernel reads .shape only
            else:
                vals = [init[s] if init[s] is not None else known.get(name) if name else None
                        for name, s in zip(n["inputs"], in_slots)]
                if any(name and v is None for name, v in zip(n["inputs"], vals)):
                    continue
            try:
                r = np.asarray(fn(*vals))
            except Exception:
                continue
            if _shape_value(r):
                known[n["outputs"][0]] = r
        return known

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
            outs = self.sess.run(self.outputs + self._probe, {n: np.ascontiguousarray(a) for n, a in zip(self.inputs, args)})
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
