"""FFN neuron groups: fuse Linear → activation → Linear into one `nadoo.ChunkedFFN` op.

A chunk of a fused FFN is a *neuron group*: rows of the up-projection and the matching rows of the
transposed down-projection, written next to each other so one positioned read serves both. Skipping a
group skips its whole contribution, which is exact when its activations are zero (ReLU) and small
when they are near zero (GELU); calibration says which layers behave so.

Before chunking, neurons are reordered so co-active neurons share a group (an exact permutation of
up rows, up bias and down columns: the dense output does not change). A low-rank sketch of the
up-projection, fitted on calibration activations, predicts per input which groups matter without
the full product.
"""

from __future__ import annotations

import numpy as np

from .rewrite import Weight, consumers

ACTIVATIONS = ("Relu", "Gelu")


def _act_ref(name: str, t: np.ndarray) -> np.ndarray:
    from nadoo.runtime.ops.elementwise import gelu

    return np.maximum(t, 0) if name == "Relu" else gelu(t.copy())


def _activation_of(nodes: list[dict], z: str, h: str, consts: dict, opset: dict) -> str | None:
    """Which activation the subgraph z → h computes, checked numerically (not by op names): the
    exporters write GELU in several equivalent node patterns."""
    from nadoo.runtime.engine import Plan

    g = {"opset": opset, "inputs": [{"name": z, "dtype": "float32", "shape": [None]}],
         "outputs": [{"name": h, "dtype": "float32", "shape": [None]}], "nodes": nodes,
         "constants": sorted({i for n in nodes for i in n["inputs"] if i in consts})}
    t = np.linspace(-8, 8, 1601, dtype=np.float32)
    try:
        out = Plan(g, {k: consts[k] for k in g["constants"]}).run({z: t})[0]
    except Exception:
        return None
    for name in ACTIVATIONS:
        if out.shape == t.shape and np.allclose(out, _act_ref(name, t), rtol=1e-5, atol=1e-5):
            return name
    return None


def fuse_ffn(graph: dict, consts: dict, weights: list[Weight]) -> tuple[dict, list[Weight], list[dict]]:
    """Replace ChunkedLinear → [Add bias] → activation → ChunkedLinear chains by ChunkedFFN nodes.

    Returns (graph, weights, ffns) where ffns lists {"node", "up", "down", "bias", "activation"}.
    The down weight becomes kind "ffn_down" stored transposed as [neurons, outputs]."""
    nodes = graph["nodes"]
    cons = consumers(graph)
    outputs = {o["name"] for o in graph["outputs"]}
    by_name = {w.name: w for w in weights}
    producer = {o: i for i, n in enumerate(nodes) for o in n["outputs"]}
    remove, replace, ffns, taken = set(), {}, [], set()
    for i, a in enumerate(nodes):
        if a.get("domain") != "nadoo" or a["op"] != "ChunkedLinear" or i in taken:
            continue
        up = by_name[a["attrs"]["weight"]]
        R = up.rows
        z, chain, bias = a["outputs"][0], [i], ""
        if len(a["inputs"]) > 1:  # Gemm-style bias input; it is permuted with the neurons, so it must be ours alone
            if a["inputs"][1] not in consts or len(cons[a["inputs"][1]]) != 1:
                continue
            bias = a["inputs"][1]
        after = cons.get(z, [])
        if not bias and len(after) == 1 and after[0]["op"] == "Add" and z not in outputs:
            other = [x for x in after[0]["inputs"] if x != z]
            if len(other) == 1 and other[0] in consts and consts[other[0]].size == R and len(cons[other[0]]) == 1:
                bias = other[0]
                chain.append(producer[after[0]["outputs"][0]])
                z = after[0]["outputs"][0]
        # Walk forward from z over a small activation subgraph until a value feeds a ChunkedLinear.
        frontier, sub, h, down_node = [z], [], None, None
        while frontier and len(sub) <= 8:
            v = frontier.pop()
            if v in outputs:
                break
            for c in cons.get(v, []):
                if c.get("domain") == "nadoo" and c["op"] == "ChunkedLinear" and c["inputs"][0] == v:
                    if h is None and len(cons[v]) == 1:
                        h, down_node = v, c
                    continue
                if c not in sub:
                    sub.append(c)
                    frontier.extend(c["outputs"])
        if h is None or not sub or len(sub) > 8:
            continue
        down = by_name[down_node["attrs"]["weight"]]
        if down.row_len != R or producer[down_node["outputs"][0]] in taken:
            continue
        sub_names = {id(n) for n in sub}
        # The activation subgraph must be closed: its values are used only inside it (or by down).
        inner = {o for n in sub for o in n["outputs"]}
        if any(c is not down_node and id(c) not in sub_names for o in inner for c in cons.get(o, [])):
            continue
        if any(x not in inner and x != z and x not in consts and x for n in sub for x in n["inputs"]):
            continue
        sub = sorted(sub, key=lambda n: producer[n["outputs"][0]])
        act = _activation_of(sub, z, h, consts, graph.get("opset", {}))
        if act is None:
            continue
        j = producer[down_node["outputs"][0]]
        taken.update((i, j))
        chain += [producer[n["outputs"][0]] for n in sub]
        remove.update(chain)
        b2 = down_node["inputs"][1] if len(down_node["inputs"]) > 1 else ""
        replace[j] = {"op": "ChunkedFFN", "domain": "nadoo", "name": down_node["name"],
                      "inputs": [a["inputs"][0], bias, b2], "outputs": list(down_node["outputs"]),
                      "attrs": {"up": up.name, "down": down.name, "activation": act}}
        down.kind = "ffn_down"
        down.array = np.ascontiguousarray(down.array.T)  # [outputs, neurons] → [neurons, outputs]
        down.input_name = h
        up.kind = "ffn_up"
        ffns.append({"node": replace[j], "up": up, "down": down, "bias": bias, "activation": act})
    new_nodes = [replace.get(k, n) for k, n in enumerate(nodes) if k not in remove or k in replace]
    g = dict(graph, nodes=new_nodes)
    used = {x for n in new_nodes for x in n["inputs"]}
    g["constants"] = sorted(c for c in graph["constants"] if c in used)
    return g, weights, ffns


def coactivation_order(acts: np.ndarray, n_groups: int) -> np.ndarray:
    """A neuron permutation that puts co-active neurons next to each other.

    acts: [samples, neurons] post-activation magnitudes from calibration. Neurons are ordered by the
    leading non-trivial eigenvector (Fiedler-like) of their activation-correlation graph, within
    bands of activation frequency, so each contiguous group gathers neurons that fire together."""
    a = np.abs(acts).astype(np.float64)
    R = a.shape[1]
    if a.shape[0] < 2 or R < 2 * n_groups:
        return np.argsort(-a.mean(0), kind="stable")
    x = a - a.mean(0)
    norm = np.linalg.norm(x, axis=0)
    norm[norm == 0] = 1
    x /= norm
    C = np.clip(x.T @ x, 0, None)  # non-negative correlation = affinity
    d = C.sum(1)
    d[d == 0] = 1
    Dm = 1 / np.sqrt(d)
    L = (C * Dm[:, None]) * Dm[None, :]
    w, v = np.linalg.eigh(L)
    fiedler = v[:, -2] * Dm
    return np.argsort(fiedler, kind="stable")


def fit_sketch(x: np.ndarray, up: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Data-aware rank-r factorization of the up-projection: x @ up.T ≈ (x @ P) @ Q.

    Q = top-r right singular vectors of the calibration pre-activations Z = X·Wᵀ, P = Wᵀ·Q.T, so the
    sketch is exact on the subspace the calibration inputs actually excite."""
    Z = x.astype(np.float64) @ up.T.astype(np.float64)
    rank = max(1, min(rank, *Z.shape))
    _, _, vt = np.linalg.svd(Z, full_matrices=False)
    Q = vt[:rank]  # [r, R]
    P = up.T.astype(np.float64) @ Q.T  # [K, r]
    return P.astype(np.float32), Q.astype(np.float32)
