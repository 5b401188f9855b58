"""What the ONNX Runtime engine builds before it runs: which nodes ORT may run (`ort_able`, `shape_derived`,
`runs_of`), every value's type (`value_types`), and each segment's ONNX nodes over the bundle's stored
weights (`SegmentExporter`: linear layers as MatMulNBits over the codes, lookups as GatherBlockQuantized).
The segments themselves, and what runs them, are runtime/ort_engine.py.
"""
from __future__ import annotations

import numpy as np

from . import onnx_proto
from .export_onnx import Exporter, _node_with_attrs
from .onnx_types import in_opset, infer_types
from .segment_shapes import SHAPE_READERS
from .tiers import MATMUL_NBITS_BITS, TIER_BITS, PackedWeight

# Their output size is the value of these inputs: with a non-constant one the node stays in NumPy,
# whose size rule checks that value before the kernel allocates.
_VALUE_SIZED = {"Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2), "OneHot": (1,),
                "Pad": (1, 2, 3), "Resize": (1, 2, 3), "Upsample": (1,), "TopK": (1,)}
# Never in ORT: random numbers would differ between engines; subgraph attributes are not converted.
_NUMPY_ONLY = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
               "If", "Loop", "Scan"}
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
        return self.bundle.read_weight(name, self.tiers[name], transposed=transposed)

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
        codes, scales, zps = self._pack_inits(name, p)
        self.inits[codes] = self.inits[codes].reshape(p.rows, -1)
        self.inits[scales] = self.inits[scales].reshape(p.rows, -1)
        self.inits[zps] = self.inits[zps].reshape(p.rows, -1)
        self.nodes.append(self.helper.make_node(
            "GatherBlockQuantized", [codes, idx, scales, zps], [out], name=self.fresh("GatherBlockQuantized"),
            domain="com.microsoft", bits=int(p.bits), block_size=int(p.block_size), gather_axis=0, quantize_axis=1))
        self.uses_ms = True

    def _packed(self, name: str, of_transpose: bool, bits, rows=None) -> "PackedWeight | None":
        """The stored codes of `name` at its tier when they are zp-coded in the `of_transpose` layout at one
        of `bits` (never for the shape graph: ONNX shape inference knows no com.microsoft op). `rows` (a
        permutation): packed row j is stored row rows[j]."""
        read = getattr(self.bundle, "read_packed", None)
        tier = self.tiers[name]
        # a width ORT's kernels lack (6, 5, 3 bits) goes in as 8-bit codes where 8 bits is asked for
        widen = 8 in bits and TIER_BITS.get(tier, 32) < 8 and TIER_BITS.get(tier) not in MATMUL_NBITS_BITS
        if read is None or self.shapes_only or (TIER_BITS.get(tier) not in bits and not widen):
            return None
        order = None
        if rows is not None:  # where each stored row goes: Gemma's head packed in vocabulary order, once
            order = np.empty(len(rows), np.intp)
            order[rows] = np.arange(len(rows))
        p = read(name, tier, order)
        if p is None or p.of_transpose != of_transpose:
            return None
        return p.widened() if widen else p

    def _pack_inits(self, name: str, p) -> tuple[str, str, str]:
        """Initializers of codes, scales and zero points (flat, as MatMulNBits takes them) of `p`; their names."""
        codes, scales, zps = (self.fresh(f"{name}_{s}") for s in ("codes", "scales", "zero_points"))
        self.inits[codes] = np.ascontiguousarray(p.codes, np.uint8)
        self.inits[scales] = np.ascontiguousarray(p.scales, np.float32).reshape(-1)
        self.inits[zps] = np.ascontiguousarray(p.zero_points, np.uint8).reshape(-1)
        return codes, scales, zps

    def _nbits(self, x: str, name: str, bias: str, out: str, of_transpose: bool, rows=None) -> bool:
        """out = the product as MatMulNBits over the stored codes, if the bundle stores them in the layout
        this product takes (x·Wᵀ: groups along W's rows' length; x·W: along its rows) and the product is
        fast; False when the caller must hand the weight over as float32. `rows`: output j is stored row
        rows[j] (x·Wᵀ only)."""
        # MatMulNBits' exact path (accuracy level 0) is fast at 4 bits only (8 and 2 bits measured ~80x
        # slower than a float MatMul, ORT 1.32): exact 8- and 2-bit layers are handed over dequantized.
        p = self._packed(name, of_transpose, MATMUL_NBITS_BITS if self.int8 else (4,), rows)
        if p is None:
            return False
        codes, scales, zps = self._pack_inits(name, p)  # already in the order of `rows`
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
        if n["op"] in SHAPE_READERS or (n["inputs"] and all(not i or i in known for i in n["inputs"])):
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
