"""Find the weight-bearing operators of a nadoo graph and rewrite them into chunk-aware `nadoo` ops.

MatMul/Gemm with a constant weight → `ChunkedLinear`, Gather from a constant 2-D table (axis 0) →
`ChunkedGather`, Conv / ConvTranspose with a constant kernel → `ChunkedConv` / `ChunkedConvTranspose`,
LSTM / GRU / RNN with constant W and R → `ChunkedRecurrent`. Their weights leave the constants and
become chunked tensors in rows-first form (one row per output unit). Weights below `min_elements`
stay inline: chunking a tiny tensor costs more index than it can ever save.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from nadoo.runtime.chunked.conv_transpose import rows_first


@dataclass
class Weight:
    name: str
    kind: str  # "linear" | "gather" | "conv" | "conv_transpose" | "recurrent_input" (W) | "recurrent" (R)
    # float32, rows first: [out, in] / [vocab, dim] / [Cout, Cin/g, kh, kw] (both convs) / [D·G·H, K]
    array: np.ndarray
    node_name: str
    input_name: str  # the activation feeding the op (for calibration importance)
    output_name: str
    meta: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.array.shape[0]

    @property
    def row_len(self) -> int:
        return int(np.prod(self.array.shape[1:]))


def rewrite_weight_ops(graph: dict, constants: dict[str, np.ndarray], min_elements: int = 1024
                       ) -> tuple[dict, dict[str, np.ndarray], list[Weight]]:
    """Return (new graph, remaining inline constants, chunkable weights). Inputs are not modified."""
    uses = Counter(i for n in graph["nodes"] for i in n["inputs"] if i)
    uses.update(o["name"] for o in graph["outputs"])
    consts = dict(constants)
    nodes, weights = [], []

    def big_float(name, ndim=None):
        a = consts.get(name)
        return (a is not None and a.dtype.kind == "f" and a.size >= min_elements and uses[name] == 1
                and (ndim is None or a.ndim == ndim))

    for n in graph["nodes"]:
        op, dom, ins, attrs = n["op"], n.get("domain", ""), n["inputs"], n.get("attrs", {})
        new = None
        if dom == "" and op == "MatMul" and len(ins) == 2 and ins[0] not in consts and big_float(ins[1], 2):
            w = np.ascontiguousarray(consts.pop(ins[1]).T, dtype=np.float32)
            weights.append(Weight(ins[1], "linear", w, n["name"], ins[0], n["outputs"][0]))
            new = _node(n, "ChunkedLinear", [ins[0]], {"weight": ins[1]})
        elif (dom == "" and op == "Gemm" and ins[0] not in consts and big_float(ins[1], 2)
              and not attrs.get("transA", 0)):
            bias = ins[2] if len(ins) > 2 else ""
            b = consts.get(bias) if bias else None
            n_out = consts[ins[1]].shape[0 if attrs.get("transB", 0) else 1]
            if not bias or (b is not None and b.size == n_out):
                w = consts.pop(ins[1])
                w = w if attrs.get("transB", 0) else w.T
                w = np.ascontiguousarray(w * np.float32(attrs.get("alpha", 1.0)), dtype=np.float32)
                new_ins = [ins[0]]
                if bias:
                    b = (b.reshape(-1) * np.float32(attrs.get("beta", 1.0))).astype(np.float32)
                    if uses[bias] > 1 and (b.shape != consts[bias].shape or not np.array_equal(b, consts[bias])):
                        # exporters merge equal initializers: a shared bias this node changes becomes its own copy
                        uses[bias] -= 1
                        bias = f"{bias}.{ins[1]}"
                    consts[bias] = b
                    new_ins.append(bias)
                weights.append(Weight(ins[1], "linear", w, n["name"], ins[0], n["outputs"][0]))
                new = _node(n, "ChunkedLinear", new_ins, {"weight": ins[1]})
        elif dom == "" and op == "Gather" and attrs.get("axis", 0) == 0 and big_float(ins[0], 2) and ins[1] not in consts:
            w = np.ascontiguousarray(consts.pop(ins[0]), dtype=np.float32)
            weights.append(Weight(ins[0], "gather", w, n["name"], ins[1], n["outputs"][0]))
            new = _node(n, "ChunkedGather", [ins[1]], {"weight": ins[0]})
        elif dom == "" and op == "Conv" and ins[0] not in consts and big_float(ins[1]):
            w = np.ascontiguousarray(consts.pop(ins[1]), dtype=np.float32)
            # groups: a grouped conv's output channel o reads only input-channel group o // (Cout / groups)
            weights.append(Weight(ins[1], "conv", w, n["name"], ins[0], n["outputs"][0],
                                  {"groups": int(attrs.get("group", 1))}))
            new_attrs = dict(attrs, weight=ins[1])
            new_attrs.setdefault("kernel_shape", list(w.shape[2:]))
            new = _node(n, "ChunkedConv", [ins[0]] + ([ins[2]] if len(ins) > 2 and ins[2] else []), new_attrs)
        elif (dom == "" and op == "ConvTranspose" and ins[0] not in consts and big_float(ins[1])
              and consts[ins[1]].ndim >= 3 and consts[ins[1]].shape[0] % int(attrs.get("group", 1)) == 0):
            groups = int(attrs.get("group", 1))
            # stored output channels first, like a Conv kernel (runtime/chunked/conv_transpose.py)
            w = rows_first(consts.pop(ins[1]).astype(np.float32), groups)
            weights.append(Weight(ins[1], "conv_transpose", w, n["name"], ins[0], n["outputs"][0], {"groups": groups}))
            new = _node(n, "ChunkedConvTranspose", [ins[0]] + ([ins[2]] if len(ins) > 2 and ins[2] else []),
                        dict(attrs, weight=ins[1]))
        elif dom == "" and op in _RECURRENT and len(ins) >= 3 and ins[0] not in consts and _pair(consts, ins, uses, min_elements):
            # W [D, G·H, I] and R [D, G·H, H] stored [D·G·H, K]: a row is one gate unit of one direction
            for name, kind in ((ins[1], "recurrent_input"), (ins[2], "recurrent")):
                a = consts.pop(name)
                weights.append(Weight(name, kind, np.ascontiguousarray(a.reshape(-1, a.shape[-1]), dtype=np.float32),
                                      n["name"], ins[0], n["outputs"][0], {"cell": op}))
            new = _node(n, "ChunkedRecurrent", [ins[0]] + ins[3:], dict(attrs, cell=op, weight=ins[1], recurrence=ins[2]))
        nodes.append(new or n)
    g = dict(graph, nodes=nodes)
    g["opset"] = dict(graph.get("opset", {}), nadoo=1)
    g["constants"] = sorted(consts)
    return g, consts, weights


# Ops that read their whole weight at every step: no chunk of it can be skipped or read on its own.
_RECURRENT = ("LSTM", "GRU", "RNN")


def _pair(consts: dict, ins: list, uses: Counter, min_elements: int) -> bool:
    """A recurrent node's W and R: both float constants of this node alone, shaped [D, G·H, *], one
    of them at least `min_elements` (they are chunked together or not at all)."""
    w, r = consts.get(ins[1]), consts.get(ins[2])
    return (w is not None and r is not None and w.dtype.kind == r.dtype.kind == "f" and w.ndim == r.ndim == 3
            and w.shape[:2] == r.shape[:2] and uses[ins[1]] == uses[ins[2]] == 1 and max(w.size, r.size) >= min_elements)


def inline_reasons(graph: dict, constants: dict[str, np.ndarray], min_elements: int) -> dict[str, str]:
    """Why each float constant of at least `min_elements` stays inline in the final graph (recorded in
    the bundle's constants table, so `nadoo info` shows what was not chunked without guessing)."""
    cons = consumers(graph)
    outputs = {o["name"] for o in graph["outputs"]}
    reasons = {}
    for name, a in constants.items():
        if a.dtype.kind != "f" or a.size < min_elements:
            continue
        readers = cons.get(name, [])
        ops = sorted({f"{n['domain']}.{n['op']}" if n.get("domain") else n["op"] for n in readers})
        if name in outputs:
            reasons[name] = "a graph output: not chunked (returned whole)"
        elif not readers:
            reasons[name] = "read by no node: not chunked"
        elif len(readers) > 1:
            reasons[name] = f"read by {len(readers)} nodes ({', '.join(ops)}): not chunked (a chunked tensor has one reader)"
        elif readers[0]["op"] in _RECURRENT and not readers[0].get("domain") and readers[0]["inputs"].index(name) in (1, 2):
            reasons[name] = (f"weights of {ops[0]}: not chunked (recurrent op, read whole; W and R are chunked "
                             "together, only when both are constants of this node alone)")
        elif readers[0].get("domain") == "nadoo":  # a bias, predictor sketch, router: read with the chunks
            k = readers[0]["inputs"].index(name)
            reasons[name] = f"input {k} of {ops[0]}: not chunked (read whole beside the op's chunked weights)"
        else:
            k = readers[0]["inputs"].index(name)
            reasons[name] = f"input {k} of {ops[0]}: not chunked (no chunked form of {ops[0]} for this input)"
    return reasons


def _node(n: dict, op: str, inputs: list, attrs: dict) -> dict:
    return {"op": op, "domain": "nadoo", "name": n["name"], "inputs": inputs, "outputs": list(n["outputs"]), "attrs": attrs}


def consumers(graph: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for n in graph["nodes"]:
        for i in n["inputs"]:
            if i:
                out.setdefault(i, []).append(n)
    return out
