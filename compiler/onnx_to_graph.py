"""ONNX -> nadoo graph.

``onnx_to_graph(model) -> (graph, constants)`` where ``graph`` is the JSON-serializable nadoo graph dict
(opset / inputs / outputs / nodes / constants) and ``constants`` maps every constant name the graph uses to its
NumPy array.

Steps: inline local functions, load external data, turn initializers and ``Constant`` nodes into constants,
fold constant subgraphs with the runtime's own ops (skipping nodes whose output would be much bigger than their
inputs, e.g. Expand/ConstantOfShape), drop dead nodes, and check every remaining op can be executed (built-in,
or onnx.reference as a fallback).
"""
from __future__ import annotations

import os
from typing import Iterable

import numpy as np
import onnx
from onnx import AttributeProto, numpy_helper

from nadoo.runtime.engine import build_node, reference_available
from nadoo.runtime.errors import CompileError, UnsupportedError
from nadoo.runtime.ops import REGISTRY

__all__ = ["onnx_to_graph", "FOLD_MAX_BYTES"]

#: a folded constant bigger than this (and more than twice its inputs) stays a runtime node
FOLD_MAX_BYTES = 1 << 20

# never folded: nondeterministic or side-effecting
_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
            "Bernoulli"}


def _np_dtype_name(elem_type: int) -> str:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except Exception:
        raise UnsupportedError(f"unsupported tensor element type {onnx.TensorProto.DataType.Name(elem_type)}") \
            from None


def value_info(vi: onnx.ValueInfoProto) -> dict:
    """{"name", "dtype" (numpy dtype name, None if unset), "shape" (None if unknown; per axis an int,
    the dim_param's name or None)} of a graph input or output (compiler/load reads input specs so)."""
    t = vi.type
    if not t.HasField("tensor_type"):
        raise UnsupportedError(f"graph input/output {vi.name!r} is not a tensor (sequences/maps unsupported)")
    tt = t.tensor_type
    dtype = _np_dtype_name(tt.elem_type) if tt.elem_type else None
    shape = None
    if tt.HasField("shape"):
        shape = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                shape.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param:
                shape.append(str(d.dim_param))
            else:
                shape.append(None)
    return {"name": vi.name, "dtype": dtype, "shape": shape}


def _tensor_json(arr: np.ndarray) -> dict:
    arr = np.asarray(arr)
    return {"tensor": {"dtype": arr.dtype.name, "shape": [int(s) for s in arr.shape],
                       "data": arr.reshape(-1).tolist()}}


def _attr_value(a: onnx.AttributeProto, op: str):
    T = AttributeProto
    if a.type == T.INT:
        return int(a.i)
    if a.type == T.FLOAT:
        return float(a.f)
    if a.type == T.STRING:
        return a.s.decode("utf-8", errors="replace")
    if a.type == T.INTS:
        return [int(v) for v in a.ints]
    if a.type == T.FLOATS:
        return [float(v) for v in a.floats]
    if a.type == T.STRINGS:
        return [s.decode("utf-8", errors="replace") for s in a.strings]
    if a.type == T.TENSOR:
        return _tensor_json(numpy_helper.to_array(a.t))
    if a.type in (T.GRAPH, T.GRAPHS):
        raise UnsupportedError(f"unsupported operator {op}: graph-valued attribute {a.name!r} "
                               "(control flow If/Loop/Scan is not supported)")
    raise UnsupportedError(f"unsupported operator {op}: attribute {a.name!r} of type "
                           f"{T.AttributeType.Name(a.type)}")


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    raise UnsupportedError(f"unsupported Constant node {node.name!r} "
                           f"({', '.join(a.name for a in node.attribute)})")


def _to_array(t: onnx.TensorProto, base_dir: str | None) -> np.ndarray:
    try:
        return numpy_helper.to_array(t, base_dir or "")
    except Exception as e:
        raise CompileError(f"cannot load tensor {t.name!r} (external data? pass base_dir): {e}") from None


def onnx_to_graph(model: onnx.ModelProto, base_dir: str | os.PathLike | None = None,
                  fold_max_bytes: int = FOLD_MAX_BYTES) -> tuple[dict, dict[str, np.ndarray]]:
    """Convert an ONNX model to (nadoo graph dict, constants).

    base_dir: folder of the .onnx file, to resolve external-data tensors that were not loaded yet.
    """
    if not isinstance(model, onnx.ModelProto):
        raise CompileError(f"expected an onnx.ModelProto, got {type(model).__name__}")
    if model.functions:
        from onnx import inliner
        model = inliner.inline_local_functions(model)
    g = model.graph
    opset = {}
    for o in model.opset_import:
        opset["" if o.domain in ("", "ai.onnx") else o.domain] = int(o.version)
    opset.setdefault("", 18)
    base_dir = str(base_dir) if base_dir is not None else None

    constants: dict[str, np.ndarray] = {}
    for t in g.initializer:
        constants[t.name] = _to_array(t, base_dir)
    for st in g.sparse_initializer:
        raise UnsupportedError(f"sparse initializer {st.values.name!r} is not supported")

    inputs = [value_info(vi) for vi in g.input if vi.name not in constants]
    outputs = [value_info(vi) for vi in g.output]

    # ---------------------------------------------------------- nodes -> dicts (+ Constant nodes -> constants)
    nodes: list[dict] = []
    for k, n in enumerate(g.node):
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            constants[n.output[0]] = _constant_node_value(n)
            continue
        attrs = {a.name: _attr_value(a, n.op_type) for a in n.attribute}
        nodes.append({"op": n.op_type, "domain": "" if n.domain == "ai.onnx" else n.domain,
                      "name": n.name or f"{n.op_type}_{k}", "inputs": list(n.input),
                      "outputs": list(n.output), "attrs": attrs})

    # ---------------------------------------------------------- support check (before folding, clear message)
    for nd in nodes:
        _check_supported(nd, opset)

    # ---------------------------------------------------------- constant folding
    kept: list[dict] = []
    origin: dict[str, str] = {}
    # onnxscript's optimizer (used by torch's exporter) records which weight it folded a value from.
    for vi in model.graph.value_info:
        for prop in vi.metadata_props:
            if prop.key == "pkg.onnxscript.optimizer.folded_from":
                srcs = [x.strip(" '\"") for x in prop.value.strip("[]").split(",") if x.strip()]
                if len(srcs) == 1:
                    origin[vi.name] = srcs[0]
    for nd in nodes:
        ins = [i for i in nd["inputs"] if i]
        foldable = (nd["op"] not in _NO_FOLD and nd["domain"] in ("",) and
                    all(i in constants for i in ins) and len(ins) > 0)
        if foldable:
            vals = _try_fold(nd, constants, opset)
            if vals is not None:
                in_bytes = sum(constants[i].nbytes for i in ins)
                out_bytes = sum(v.nbytes for v in vals)
                if out_bytes <= fold_max_bytes or out_bytes <= 2 * in_bytes:
                    big = [i for i in ins if constants[i].size > 1]
                    for name, v in zip(nd["outputs"], vals):
                        if name:
                            constants[name] = v
                            if len(big) == 1:  # e.g. Transpose(weight): remember which weight it was
                                origin[name] = origin.get(big[0], big[0])
                    continue
        kept.append(nd)

    # ---------------------------------------------------------- dead-node elimination
    needed = {o["name"] for o in outputs}
    live: list[dict] = []
    for nd in reversed(kept):
        if any(o and o in needed for o in nd["outputs"]):
            live.append(nd)
            needed.update(i for i in nd["inputs"] if i)
    live.reverse()
    input_names = {i["name"] for i in inputs}
    used_consts = [n for n in constants if n in needed and n not in input_names]
    # keep the initializer order stable (nice for on-disk layout), then folded ones
    const_out = {n: np.asarray(constants[n]) for n in used_consts}
    # A folded weight (Transpose/Cast of an initializer) takes back its source's name when the source
    # itself is gone, so users see "encoder.layer.0.intermediate.dense.weight", not "val_149".
    taken = set(const_out) | input_names | {o for nd in live for o in nd["outputs"]} | {o["name"] for o in outputs}
    rename = {}
    for n in list(const_out):
        src = origin.get(n)
        if src and src not in taken:
            rename[n] = src
            taken.add(src)
    if rename:
        const_out = {rename.get(n, n): a for n, a in const_out.items()}
        for nd in live:
            nd["inputs"] = [rename.get(i, i) for i in nd["inputs"]]

    for o in outputs:
        if o["name"] not in const_out and o["name"] not in input_names and \
                not any(o["name"] in nd["outputs"] for nd in live):
            raise CompileError(f"graph output {o['name']!r} is never produced")

    graph = {
        "opset": opset,
        "inputs": inputs,
        "outputs": outputs,
        "nodes": live,
        "constants": list(const_out),
    }
    return graph, const_out


def _check_supported(nd: dict, opset: dict) -> None:
    dom = nd["domain"]
    if (dom, nd["op"]) in REGISTRY:
        return
    if reference_available(nd["op"], dom, opset.get(dom) if dom == "" else None):
        return
    if dom == "nadoo":
        return  # nadoo's own ops are provided by custom_ops at run time
    raise UnsupportedError(f"unsupported operator {nd['op']} (domain {dom!r}) in node {nd['name']!r}")


def _try_fold(nd: dict, constants: dict, opset: dict) -> list[np.ndarray] | None:
    ins = list(nd["inputs"])
    while ins and ins[-1] == "":
        ins.pop()
    args = [constants[i] if i else None for i in ins]
    view = dict(nd)
    view["inputs"] = ins
    try:
        fn = build_node(view, args, opset)
        r = fn(*args)
    except UnsupportedError:
        raise
    except Exception:
        return None  # leave it to run time; it may still work there (or fail with a clear error)
    outs = [r] if len(nd["outputs"]) == 1 else list(r)
    return [np.array(v, order="C") if not isinstance(v, np.ndarray) or not v.flags.writeable
            or v.base is not None or not v.flags.c_contiguous else v for v in outs]


def iter_ops(graph: dict) -> Iterable[tuple[str, str]]:
    """(domain, op) pairs used by a nadoo graph, in first-use order."""
    seen = set()
    for nd in graph["nodes"]:
        k = (nd["domain"], nd["op"])
        if k not in seen:
            seen.add(k)
            yield k
