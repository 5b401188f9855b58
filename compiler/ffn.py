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
    # Exporters merge equal initializers (every zero bias of one size becomes one tensor); a fused
    # FFN permutes its up bias with its neurons, so each FFN gets its own copy of a shared one.
    bias_uses = {c: len(cons.get(c, [])) for c in consts}
    for i, a in enumerate(nodes):
        if a.get("domain") != "nadoo" or a["op"] != "ChunkedLinear" or i in taken:
            continue
        up = by_name[a["attrs"]["weight"]]
        R = up.rows
        z, chain, bias = a["outputs"][0], [i], ""
        if len(a["inputs"]) > 1:  # Gemm-style bias input (a constant: it is permuted with the neurons)
            if a["inputs"][1] not in consts:
                continue
            bias = a["inputs"][1]
        after = cons.get(z, [])
        if not bias and len(after) == 1 and after[0]["op"] == "Add" and z not in outputs:
            other = [x for x in after[0]["inputs"] if x != z]
            if len(other) == 1 and other[0] in consts and consts[other[0]].size == R:
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
        if bias and bias_uses[bias] > 1:  # shared: this FFN takes a copy, the last user the original
            bias_uses[bias] -= 1
            copy = _fresh_name(f"{bias}.{up.name}", consts)
            consts[copy] = np.array(consts[bias], copy=True)
            bias = copy
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
    g["constants"] = sorted(c for c in set(graph["constants"]) | {f["bias"] for f in ffns if f["bias"]} if c in used)
    return g, weights, ffns


def _fresh_name(base: str, taken) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}.{k}", k + 1
    return name


def coactivation_order(acts: np.ndarray, n_groups: int, band: int = 4) -> np.ndarray:
    """A neuron permutation that makes chunk-level sparsity out of neuron-level sparsity.

    Neurons are first sorted by how often they fire (hot neurons share the first groups, so a few
    groups carry most of the activity), then, inside each band of `band` groups, ordered spectrally
    so neurons that fire *together* share a group. Measured (oracle top-k output cosine vs dense,
    FFN groups kept 25 %): wide ReLU MLP 0.947 spectral-only → 0.998 banded; digits MLP 0.987 → 0.994."""
    a = np.abs(acts)
    R = a.shape[1]
    freq = (a > 0).mean(0) + 1e-3 * a.mean(0) / max(float(a.mean()), 1e-30)  # ties broken by magnitude
    order = np.argsort(-freq, kind="stable")
    size = max(1, R // max(n_groups, 1))
    parts = []
    for s in range(0, R, size * band):
        idx = order[s : s + size * band]
        parts.append(idx[spectral_order(a[:, idx], max(1, len(idx) // size))])
    return np.concatenate(parts)


def spectral_order(acts: np.ndarray, n_groups: int, iters: int = 60, seed: int = 0) -> np.ndarray:
    """A neuron permutation that puts co-active neurons next to each other.

    acts: [samples, neurons] post-activation magnitudes from calibration. Affinity between two neurons
    is the cosine of their activation vectors (non-negative, as activations are); neurons are sorted
    by the second eigenvector of the degree-normalised affinity (spectral ordering), so a contiguous
    group gathers neurons that fire together. The R×R affinity is never formed: subspace iteration
    applies it as Xᵀ(X·v), O(samples·neurons) per step, so 16k-neuron layers order in seconds."""
    X = np.abs(acts).astype(np.float64)
    S, R = X.shape
    norms = np.linalg.norm(X, axis=0)
    dead = norms == 0
    if S < 2 or R < 2 * n_groups or dead.all():
        return np.argsort(-X.mean(0), kind="stable")
    X = X[:, ~dead] / norms[~dead]
    d = X.T @ (X @ np.ones(X.shape[1]))  # degrees of the affinity graph
    dm = 1 / np.sqrt(np.maximum(d, 1e-30))
    u0 = np.sqrt(d) / np.linalg.norm(np.sqrt(d))  # the trivial top eigenvector of D^-½ C D^-½

    def apply(V):
        return dm[:, None] * (X.T @ (X @ (dm[:, None] * V)))

    V = np.random.default_rng(seed).standard_normal((X.shape[1], 3))
    for _ in range(iters):
        V -= u0[:, None] * (u0 @ V)[None, :]
        V, _ = np.linalg.qr(apply(V))
    V -= u0[:, None] * (u0 @ V)[None, :]
    B = V.T @ apply(V)
    w, U = np.linalg.eigh((B + B.T) / 2)
    fiedler = (V @ U[:, -1]) * dm
    live = np.flatnonzero(~dead)[np.argsort(fiedler, kind="stable")]
    return np.concatenate([live, np.flatnonzero(dead)])  # never-active neurons last, together


def fit_sketch(H: np.ndarray, up: np.ndarray, rank: int, oversample: int = 8, power: int = 2,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Data-aware rank-r factorization of the up-projection: x @ up.T ≈ (x @ P) @ Q.

    H = E[xᵀx] from calibration [K, K]. Q = the top-r eigenvectors of W·H·Wᵀ (= the right singular
    vectors of the calibration pre-activations Z = X·Wᵀ), P = Wᵀ·Qᵀ, so the sketch is exact on the
    subspace the calibration inputs actually excite. Randomised range finder: O(R·K·r), no R×R matrix."""
    W = up.astype(np.float64)  # [R, K]
    R, K = W.shape
    rank = max(1, min(rank, R, K))
    G = np.random.default_rng(seed).standard_normal((R, min(R, rank + oversample)))
    M = lambda V: W @ (H @ (W.T @ V))  # noqa: E731 - W·H·Wᵀ applied to a block of vectors
    Y, _ = np.linalg.qr(M(G))
    for _ in range(power):
        Y, _ = np.linalg.qr(M(Y))
    B = Y.T @ M(Y)
    w, U = np.linalg.eigh((B + B.T) / 2)
    Vr = Y @ U[:, ::-1][:, :rank]  # [R, r]
    return (W.T @ Vr).astype(np.float32), Vr.T.astype(np.float32).copy()
