"""Turn a bundle back into a plain ONNX model (weights dequantized at one tier), for ONNX Runtime,
Netron, or any other ONNX tool. Needs the `onnx` package (the `ort` extra); imported lazily.

The nadoo ops become their standard equivalents: ChunkedLinear → MatMul (+ Add), ChunkedGather →
Gather, ChunkedConv → Conv, ChunkedFFN → MatMul, Add, Relu / GELU, MatMul, Add.
"""

from __future__ import annotations

import numpy as np

from .errors import NadooError, UnsupportedError
from .reader import Bundle

_SQRT1_2 = 0.7071067811865476


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
        import onnx

        return helper.make_attribute(k, [], attr_type=onnx.AttributeProto.INTS)
    return helper.make_attribute(k, v)


def bundle_to_onnx(b: Bundle, tier: str = "q8"):
    """An onnx.ModelProto computing what the bundle computes densely at `tier` ('f32', 'q8', 'q4', 'q2')."""
    onnx, helper, numpy_helper = _onnx()
    graph = b.read_graph()
    consts = dict(b.read_constants())
    inits: dict[str, np.ndarray] = {}
    nodes = []
    counter = [0]

    def weight(name, transposed=False):
        e = b.tensors[name]
        if tier not in e.tiers:
            raise NadooError(f"bundle stores no {tier} tier for {name}")
        w = b.read_weight(name, tier)
        return np.ascontiguousarray(w.reshape(e.rows, e.row_len).T if transposed else w)

    def fresh(base):
        counter[0] += 1
        return f"{base}__nadoo{counter[0]}"

    def add(op, ins, outs, **attrs):
        nodes.append(helper.make_node(op, ins, outs, name=fresh(op), **attrs))

    def linear(x, wname, w, bias, out):
        inits[wname] = w
        if bias:
            mid = fresh("mm")
            add("MatMul", [x, wname], [mid])
            add("Add", [mid, bias], [out])
        else:
            add("MatMul", [x, wname], [out])

    for n in graph["nodes"]:
        op, dom, ins, outs, attrs = n["op"], n.get("domain", ""), n["inputs"], n["outputs"], n.get("attrs", {})
        if dom != "nadoo":
            nodes.append(_node_with_attrs(helper, numpy_helper, op, ins, outs, n.get("name") or fresh(op), dom, attrs))
            continue
        if op == "ChunkedLinear":
            linear(ins[0], attrs["weight"], weight(attrs["weight"], transposed=True), ins[1] if len(ins) > 1 else "", outs[0])
        elif op == "ChunkedGather":
            inits[attrs["weight"]] = weight(attrs["weight"])
            add("Gather", [attrs["weight"], ins[0]], outs, axis=0)
        elif op == "ChunkedConv":
            inits[attrs["weight"]] = weight(attrs["weight"]).reshape(b.tensors[attrs["weight"]].shape)
            conv_attrs = {k: v for k, v in attrs.items() if k != "weight"}
            nodes.append(_node_with_attrs(helper, numpy_helper, "Conv", [ins[0], attrs["weight"]] + ins[1:2], outs,
                                          fresh("Conv"), "", conv_attrs))
        elif op == "ChunkedFFN":
            up, down = attrs["up"], attrs["down"]
            z, h = fresh("z"), fresh("h")
            linear(ins[0], up, weight(up, transposed=True), ins[1] if len(ins) > 1 else "", z)
            if attrs["activation"] == "Relu":
                add("Relu", [z], [h])
            else:  # GELU = 0.5·z·(1 + erf(z/√2)), in ops every opset has
                c, half, one = fresh("c"), fresh("half"), fresh("one")
                inits[c], inits[half], inits[one] = (np.array(v, np.float32) for v in (_SQRT1_2, 0.5, 1.0))
                t1, t2, t3, t4 = (fresh("g") for _ in range(4))
                add("Mul", [z, c], [t1])
                add("Erf", [t1], [t2])
                add("Add", [t2, one], [t3])
                add("Mul", [z, t3], [t4])
                add("Mul", [t4, half], [h])
            linear(h, down, weight(down), ins[2] if len(ins) > 2 else "", outs[0])
        else:
            raise UnsupportedError(f"nadoo.{op} has no plain-ONNX equivalent yet; export is not possible for this bundle")

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
            raise NadooError("--engine ort needs onnxruntime (pip install 'nadoo[ort]')") from None
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
