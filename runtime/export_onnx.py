"""Turn a bundle back into a plain ONNX model (weights dequantized at one tier), for ONNX Runtime,
Netron, or any other ONNX tool. Needs the `onnx` package (the `ort` extra); imported lazily.

Standard nodes are copied; each nadoo node becomes its standard equivalent, written by its op class
(`ChunkedOp.export`: ChunkedLinear → MatMul (+ Add), ChunkedFFN → MatMul, Add, Relu / GELU, MatMul,
Add, ...); an op without one (MoE) makes the bundle not exportable yet.
"""

from __future__ import annotations

import numpy as np

from .chunked import REGISTRY, ChunkedOp
from .errors import NadooError, UnsupportedError
from .reader import Bundle


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        raise NadooError("exporting to ONNX needs the onnx package (pip install 'nadoo[ort]')") from None
    return onnx, helper, numpy_helper


def _attr(helper, numpy_helper, k, v):
    if isinstance(v, dict) and "tensor" in v:
        t = v["tensor"]
        return helper.make_attribute(k, numpy_helper.from_array(np.asarray(t["data"], dtype=t["dtype"]).reshape(t["shape"])))
    if isinstance(v, list) and not v:  # an empty list has no type of its own; ONNX's list attrs are ints
        return helper.make_attribute(k, [], attr_type=helper.AttributeProto.INTS)
    return helper.make_attribute(k, v)


class Exporter:
    """The plain-ONNX graph being built; `ChunkedOp.export` adds a node's equivalent through it."""

    def __init__(self, bundle: Bundle, tier: str, constants: dict | None = None, proto=None):
        """`proto`: a module with onnx.helper's builders (runtime/onnx_proto.py for the ORT engine's
        segments, which need no onnx import); onnx's own by default."""
        if proto is None:
            _, self.helper, self.numpy_helper = _onnx()
        else:
            self.helper = self.numpy_helper = proto
        self.bundle, self.tier = bundle, tier
        self.constants = constants or {}  # the graph's constant values, for ops whose export depends on one
        self.nodes: list = []
        self.inits: dict[str, np.ndarray] = {}
        self._counter = 0

    def weight(self, name: str, transposed: bool = False) -> np.ndarray:
        """Chunked tensor `name` dequantized at the export tier ([K, R] when `transposed`)."""
        e = self.bundle.tensors[name]
        if self.tier not in e.tiers:
            raise NadooError(f"bundle stores no {self.tier} tier for {name}")
        return self.bundle.read_weight(name, self.tier, transposed=transposed)

    def fresh(self, base: str) -> str:
        self._counter += 1
        return f"{base}__nadoo{self._counter}"

    def initializer(self, name: str, array: np.ndarray) -> None:
        self.inits[name] = array

    def constant(self, value: float) -> str:
        """A new float32 scalar initializer; its name."""
        name = self.fresh("c")
        self.inits[name] = np.array(value, np.float32)
        return name

    def add(self, op: str, ins: list, outs: list, **attrs) -> None:
        """A standard ONNX node with plain attribute values."""
        self.nodes.append(self.helper.make_node(op, ins, outs, name=self.fresh(op), **attrs))

    def add_node(self, op: str, ins: list, outs: list, attrs: dict, name: str | None = None, domain: str = "") -> None:
        """A node with attributes as a nadoo graph stores them (tensors, empty lists)."""
        self.nodes.append(_node_with_attrs(self.helper, self.numpy_helper, op, ins, outs, name or self.fresh(op), domain,
                                           attrs))

    def linear(self, x: str, name: str, bias: str, out: str, rows: np.ndarray | None = None) -> None:
        """out = x·Wᵀ (+ bias) for chunked tensor `name` stored [R, K] (rows = outputs); with `rows`, output j
        is stored row rows[j] (the rows reordered once here, not the outputs on every call)."""
        w = self.weight(name, transposed=True)
        self.matmul(x, self.fresh(name), w if rows is None else np.ascontiguousarray(w[:, rows]), bias, out)

    def linear_transposed(self, x: str, name: str, bias: str, out: str) -> None:
        """out = x·W (+ bias) for chunked tensor `name` stored transposed, [K, N] (rows = inputs)."""
        self.matmul(x, self.fresh(name), self.weight(name), bias, out)

    def gather(self, name: str, idx: str, out: str) -> None:
        """out = rows `idx` of chunked tensor `name` (ONNX Gather along axis 0)."""
        table = self.fresh(name)
        self.initializer(table, self.weight(name))
        self.add("Gather", [table, idx], [out], axis=0)

    def activation(self, name: str, z: str, out: str) -> None:
        """out = act(z) for an activation name of runtime/activations.py (any case)."""
        name = name.lower()
        if name == "relu":
            self.add("Relu", [z], [out])
        elif name == "gelu":  # 0.5·z·(1 + erf(z/√2)), in ops every opset has
            c, half, one = (self.constant(v) for v in (float(np.sqrt(0.5)), 0.5, 1.0))
            t1, t2, t3, t4 = (self.fresh("g") for _ in range(4))
            self.add("Mul", [z, c], [t1])
            self.add("Erf", [t1], [t2])
            self.add("Add", [t2, one], [t3])
            self.add("Mul", [z, t3], [t4])
            self.add("Mul", [t4, half], [out])
        elif name == "gelu_tanh":  # ONNX Gelu (opset >= 20; the language-model graphs are 23)
            self.add("Gelu", [z], [out], approximate="tanh")
        elif name == "silu":
            sig = self.fresh("sigmoid")
            self.add("Sigmoid", [z], [sig])
            self.add("Mul", [z, sig], [out])
        else:
            raise UnsupportedError(f"no ONNX form for activation {name!r}")

    def graph_node(self, n: dict) -> None:
        """A node of a nadoo graph: standard ones copied, nadoo ones as their op class exports them."""
        dom = n.get("domain", "")
        if dom != "nadoo":
            self.add_node(n["op"], n["inputs"], n["outputs"], n.get("attrs", {}), n.get("name") or self.fresh(n["op"]), dom)
        else:
            REGISTRY.get(n["op"], ChunkedOp).export(n, self)

    def matmul(self, x: str, wname: str, w: np.ndarray, bias: str, out: str) -> None:
        """out = x·w (+ bias), w an initializer named `wname`. Callers pass a fresh name, not the tensor's:
        a tensor may be named like a value of the graph (a tied embedding "embed" beside the lookup's output
        "embed"), and one read twice (lookup and head) is laid out differently for each."""
        self.inits[wname] = w
        if bias:
            mid = self.fresh("mm")
            self.add("MatMul", [x, wname], [mid])
            self.add("Add", [mid, bias], [out])
        else:
            self.add("MatMul", [x, wname], [out])


def bundle_to_onnx(b: Bundle, tier: str = "q8"):
    """An onnx.ModelProto computing what the bundle computes densely at `tier` ('f32', 'q8', 'q4', 'q2')."""
    onnx, helper, numpy_helper = _onnx()
    graph = b.read_graph()
    consts = dict(b.read_constants())
    ex = Exporter(b, tier, consts)
    for n in graph["nodes"]:
        ex.graph_node(n)
    nodes, inits = ex.nodes, ex.inits

    used = {i for nd in nodes for i in nd.input}
    for k, v in consts.items():
        if k in used and k not in inits:
            inits[k] = np.asarray(v)

    def vi(d):
        dt = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(d["dtype"]))
        return helper.make_tensor_value_info(d["name"], dt, [x if x is not None else None for x in d.get("shape", [])])

    g = helper.make_graph(nodes, "nadoo_export", [vi(i) for i in graph["inputs"]], [vi(o) for o in graph["outputs"]],
                          [numpy_helper.from_array(np.asarray(a), k) for k, a in inits.items()])
    opsets = [helper.make_opsetid(d if d != "ai.onnx" else "", v) for d, v in graph.get("opset", {}).items() if d != "nadoo"]
    if not any(o.domain == "" for o in opsets):
        opsets.append(helper.make_opsetid("", 18))
    m = helper.make_model(g, opset_imports=opsets, producer_name="nadoo")
    m.ir_version = min(m.ir_version, 10)  # readable by current ONNX Runtime releases
    return m


def _node_with_attrs(helper, numpy_helper, op, ins, outs, name, dom, attrs):
    n = helper.make_node(op, ins, outs, name=name, domain=dom or None)
    n.attribute.extend(_attr(helper, numpy_helper, k, v) for k, v in sorted(attrs.items()))
    return n


def save_onnx(model, path: str) -> None:
    """Atomic save; models over 2 GB go to external data beside the file."""
    import os

    from .files import atomic_write

    onnx, _, _ = _onnx()
    big = sum(t.ByteSize() for t in model.graph.initializer) > (1 << 31) - (1 << 26)
    with atomic_write(path) as out:
        if big:  # onnx writes external data by path: into the temporary file's inode, then the .data beside it
            onnx.save_model(model, out.tmp, save_as_external_data=True, location=os.path.basename(path) + ".data")
        else:
            onnx.save_model(model, out.file)


class OrtSession:
    """Dense runs through ONNX Runtime on the exported graph (the `ort` extra)."""

    def __init__(self, path, tier: str = "q8", threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise NadooError("OrtSession needs onnxruntime (pip install 'nadoo[ort]')") from None
        with Bundle.open(path) as b:
            model = bundle_to_onnx(b, tier)
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def get_inputs(self):
        return self.sess.get_inputs()

    def get_outputs(self):
        return self.sess.get_outputs()

    def run(self, output_names, feeds):
        return self.sess.run(output_names, feeds)
