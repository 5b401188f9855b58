"""Fuse the self-attention of BERT-family encoders into one `nadoo.EncoderAttention` node.

The exporters write an encoder layer's attention as many nodes: the head split of q, k and v
(Reshape, Transpose, and for K^T a Transpose or a round trip through 3-D), scale factors (on q and
k, or on the scores), q·Kᵀ, an additive mask, Softmax (sometimes followed by IsNaN/Where, which turns
the NaN row of an all -inf mask into zeros), the weighted sum of V and the head merge (Transpose,
Reshape). The matcher finds the skeleton structurally -- Softmax over the last axis between two
MatMuls, scalar factors and layout nodes around them -- then verifies numerically, on the
calibration sample, that the fused op computes the very values the subgraph does (heads and scale
read off the run). Anything that differs leaves the subgraph alone. The shape arithmetic that fed
only the fused nodes (Shape, Slice, Concat, ...) goes with them: nodes whose outputs nobody reads
are removed.
"""
from __future__ import annotations

import warnings

import numpy as np

from .rewrite import consumers

_LAYOUT = ("Reshape", "Transpose")
_SCALE = ("Mul", "Div")


def _scalar(consts: dict, name: str) -> float | None:
    a = consts.get(name)
    if a is None or a.dtype.kind != "f" or a.size != 1:
        return None
    return float(a.reshape(-1)[0])


class _Match:
    """One candidate: the nodes it replaces, its inputs, scale and masked-row rule."""

    def __init__(self):
        self.nodes: list[dict] = []
        self.scale = 1.0
        self.zero_rows = 0
        self.q = self.k = self.v = self.mask = self.out = self.heads_value = ""
        self.merge: list[dict] = []  # layout nodes after the weighted sum, in order (the head merge)

    def settle(self, out: str) -> None:
        """The head merge ends at value `out`: its nodes up to there join the match."""
        k = [n["outputs"][0] for n in self.merge].index(out)
        self.nodes += self.merge[: k + 1]
        self.out = out


def _factor(n: dict, x: str, consts: dict) -> float | None:
    """The scalar this Mul/Div node applies to its input x (None: not a scalar factor of x)."""
    if n.get("domain") or n["op"] not in _SCALE or len(n["inputs"]) != 2:
        return None
    a, b = n["inputs"]
    if n["op"] == "Mul":
        c = _scalar(consts, b if a == x else a) if x in (a, b) and a != b else None
        return c
    c = _scalar(consts, b) if a == x and b != x else None
    return None if c is None or c == 0 else 1.0 / c


def _back(m: _Match, x: str, producer: dict, consts: dict, scalars: bool) -> str:
    """Walk from value x up through layout nodes (and scalar factors when allowed) to the value they
    start from: the projection output."""
    while x in producer:
        n = producer[x]
        if n.get("domain"):
            break
        if n["op"] in _LAYOUT and n["inputs"] and n["inputs"][0] not in consts:
            m.nodes.append(n)
            x = n["inputs"][0]
            continue
        src = next((i for i in n["inputs"] if i not in consts), None) if n["op"] in _SCALE else None
        f = _factor(n, src, consts) if scalars and src is not None else None
        if f is None:
            break
        m.nodes.append(n)
        m.scale *= f
        x = src
    return x


def _only(cons: dict, x: str, op: str) -> dict | None:
    """x's one reader of type `op`, beside Shape nodes (which read only its shape: they feed the head
    merge's shape arithmetic, removed with it, or the fusion is refused as not closed)."""
    c = [n for n in cons.get(x, []) if n["op"] != "Shape"]
    return c[0] if len(c) == 1 and c[0]["op"] == op and not c[0].get("domain") else None


def _candidate(sm: dict, cons: dict, producer: dict, consts: dict, opset: int) -> _Match | None:
    axis = (sm.get("attrs") or {}).get("axis", -1 if opset >= 13 else 1)
    if sm.get("domain") or axis not in (-1, 3) or len(sm["inputs"]) != 1:
        return None
    m = _Match()
    m.nodes.append(sm)
    p = sm["outputs"][0]
    after = cons.get(p, [])
    if len(after) == 2 and {c["op"] for c in after} == {"IsNaN", "Where"}:
        isnan = next(c for c in after if c["op"] == "IsNaN")
        where = next(c for c in after if c["op"] == "Where")
        zero = where["inputs"][1] if len(where["inputs"]) == 3 else ""
        if (where["inputs"][0] != isnan["outputs"][0] or where["inputs"][2] != p or _scalar(consts, zero) != 0.0
                or len(cons.get(isnan["outputs"][0], [])) != 1):
            return None
        m.nodes += [isnan, where]
        m.zero_rows = 1
        p = where["outputs"][0]
    pv = _only(cons, p, "MatMul")
    if pv is None or pv["inputs"][0] != p:
        return None
    # the head merge: layout nodes after the weighted sum; where it ends is settled on the sample
    m.nodes.append(pv)
    x = m.heads_value = pv["outputs"][0]
    while True:
        nxt = next((r for r in (_only(cons, x, op) for op in _LAYOUT) if r is not None and r["inputs"][0] == x), None)
        if nxt is None:
            break
        m.merge.append(nxt)
        x = nxt["outputs"][0]
    if not m.merge:
        return None
    m.v = _back(m, pv["inputs"][1], producer, consts, scalars=False)
    # scores: [scalar factors] (Add mask) [scalar factors] MatMul(q-chain, k-chain)
    x = _back(m, sm["inputs"][0], producer, consts, scalars=True)
    add = producer.get(x)
    if add is not None and add["op"] == "Add" and not add.get("domain") and len(add["inputs"]) == 2:
        for s_in, mask in (add["inputs"], add["inputs"][::-1]):
            y = _back(m, s_in, producer, consts, scalars=True)
            if y in producer and producer[y]["op"] == "MatMul" and not producer[y].get("domain"):
                m.nodes.append(add)
                m.mask, x = mask, y
                break
    qk = producer.get(x)
    if qk is None or qk["op"] != "MatMul" or qk.get("domain") or len(qk["inputs"]) != 2:
        return None
    m.nodes.append(qk)
    m.q = _back(m, qk["inputs"][0], producer, consts, scalars=True)
    m.k = _back(m, qk["inputs"][1], producer, consts, scalars=True)
    if not (m.q and m.k and m.v) or any(x in consts for x in (m.q, m.k, m.v)):
        return None
    return m


def _capture(graph: dict, consts: dict, names: list[str], feeds: dict) -> dict | None:
    """The values `names` take on the sample: the original graph run with them as extra outputs."""
    from nadoo.runtime.engine import Plan

    outs = [{"name": n, "dtype": None, "shape": None} for n in names]
    g = dict(graph, outputs=list(graph["outputs"]) + outs)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            vals = Plan(g, consts).run(feeds)
    except Exception:
        return None
    return dict(zip(names, vals[len(graph["outputs"]):]))


def _verified(m: _Match, vals: dict) -> dict | None:
    """The fused node's attributes when the op reproduces the subgraph's output on the sample."""
    from nadoo.runtime.ops.encoder_attention import dense_attention

    q, k, v, pv = (np.asarray(vals[n]) for n in (m.q, m.k, m.v, m.heads_value))
    mask = np.asarray(vals[m.mask]) if m.mask else None
    if pv.ndim != 4 or q.ndim != 3:
        return None
    merged = q.shape[:2] + (pv.shape[1] * pv.shape[3],)
    # the last value of the head merge shaped [B, S, heads·D] is the attention's output
    out_name = next((n["outputs"][0] for n in reversed(m.merge) if np.shape(vals[n["outputs"][0]]) == merged), None)
    if out_name is None:
        return None
    out = np.asarray(vals[out_name])
    heads = int(pv.shape[1])
    if (q.dtype != np.float32 or k.shape != v.shape or k.ndim != 3 or q.shape[2] != heads * pv.shape[3]
            or k.shape[2] != q.shape[2] or (mask is not None and mask.dtype.kind != "f")):
        return None
    try:
        with np.errstate(all="ignore"):
            got = dense_attention(q, k, v, mask, heads, m.scale, bool(m.zero_rows))
    except ValueError:  # the mask does not broadcast as an additive attention mask
        return None
    tol = 1e-4 * max(float(np.abs(out[np.isfinite(out)]).max(initial=0.0)), 1.0)
    if got.shape != out.shape or not np.allclose(got, out, rtol=1e-4, atol=tol, equal_nan=True):
        return None
    m.settle(out_name)
    return {"heads": heads, "scale": float(m.scale), "zero_masked_rows": int(m.zero_rows)}


def _dead_code(nodes: list[dict], keep: set) -> list[dict]:
    """Drop nodes none of whose outputs is read (by a later node or as a graph output), to a fixed point."""
    while True:
        read = {i for n in nodes for i in n["inputs"] if i} | keep
        live = [n for n in nodes if any(o in read for o in n["outputs"] if o)]
        if len(live) == len(nodes):
            return nodes
        nodes = live


def _closed(nodes: list[dict], available: set) -> bool:
    """Every input of every node is produced before it, a graph input or a constant."""
    have = set(available)
    for n in nodes:
        if any(i and i not in have for i in n["inputs"]):
            return False
        have.update(o for o in n["outputs"] if o)
    return True


def fuse_encoder_attention(graph: dict, consts: dict, feeds: dict) -> tuple[dict, dict, int]:
    """(graph, constants, layers fused): every verified attention subgraph as one EncoderAttention
    node; `feeds` is a calibration sample (verification runs the original graph on it)."""
    nodes = graph["nodes"]
    cons = consumers(graph)
    producer = {o: n for n in nodes for o in n["outputs"] if o}
    opset = int((graph.get("opset") or {}).get("", (graph.get("opset") or {}).get("ai.onnx", 18)))
    found = [m for m in (_candidate(n, cons, producer, consts, opset) for n in nodes if n["op"] == "Softmax") if m]
    if not found:
        return graph, consts, 0
    names = sorted({x for m in found for x in (m.q, m.k, m.v, m.mask, m.heads_value, *(n["outputs"][0] for n in m.merge))
                    if x})
    vals = _capture(graph, consts, names, feeds)
    if vals is None:
        return graph, consts, 0
    outputs = {o["name"] for o in graph["outputs"]}
    available = {i["name"] for i in graph["inputs"]} | set(consts)
    fused = 0
    for m in found:
        attrs = _verified(m, vals)
        if attrs is None:
            continue
        ids = {id(n) for n in m.nodes}
        inner = {o for n in m.nodes for o in n["outputs"] if o} - {m.out}
        if inner & outputs:
            continue
        node = {"op": "EncoderAttention", "domain": "nadoo", "name": m.out + ".attention",
                "inputs": [m.q, m.k, m.v] + ([m.mask] if m.mask else []), "outputs": [m.out], "attrs": attrs}
        last = _last(m, nodes)
        trial = [node if n is last else n for n in nodes if id(n) not in ids or n is last]
        trial = _dead_code(trial, outputs)
        if not _closed(trial, available):  # a removed value is still read elsewhere: leave it alone
            continue
        nodes, fused = trial, fused + 1
    used = {i for n in nodes for i in n["inputs"] if i} | outputs
    consts = {k: v for k, v in consts.items() if k in used}
    g = dict(graph, nodes=nodes, constants=sorted(consts))
    g["opset"] = dict(graph.get("opset", {}), nadoo=1)
    return g, consts, fused


def _last(m: _Match, nodes: list[dict]) -> dict:
    """The candidate's node that comes last in graph order (the fused node takes its place)."""
    ids = {id(n) for n in m.nodes}
    return [n for n in nodes if id(n) in ids][-1]
