"""Activation-aware per-input-channel scaling (AWQ, Lin et al. 2023) of linear weights, at compile time.

Why: a group of G weights shares one scale and zero point, so the channels of a group get the same
absolute resolution, while the output error of a channel j is weighted by its input's energy
E[x_j²]. Scaling column j of W by s_j (and the input x_j by 1/s_j) leaves W·x unchanged but gives
the channels with large activations more of the group's resolution. s_j = rms(x_j)^α, with α
searched per layer (grid ALPHAS) to minimise the layer's measured output error after quantization,
tr(D H Dᵀ) with D = W - Ŵ and H = E[x xᵀ] from calibration (exact for the calibration set).

Where the 1/s goes, so that every tier (float included) computes what the source computes:
- the value projection → attention output projection: the attention output is linear in V per
  channel (each head's output is a convex combination of its V rows), so V's output rows and bias
  are divided by s and the output projection's columns multiplied by s: exact, no new op;
- any other ChunkedLinear / ChunkedFFN up projection: its input is multiplied by 1/s by one new
  `Mul` node, shared by the layers that read the same value (q, k, v read one LayerNorm output). In
  post-LN encoders (BERT, MiniLM) that LayerNorm output is also the residual, so folding 1/s into
  the LayerNorm's gamma/beta would change the residual stream: not exact, hence the Mul (an
  elementwise [tokens, K] product, negligible beside the K·N product it feeds).
- FFN down projections are not scaled: they are stored transposed with groups along their output
  axis (one row = one neuron), where a per-neuron scale is absorbed by the row's own group scales.

The calibration statistics are rescaled to what the scaled graph sees (H' = H / s sᵀ), so GPTQ and
the importance weights then quantize the scaled weights as usual.
"""
from __future__ import annotations

import numpy as np

from .quantize import F16_MAX, quantize
from .rewrite import consumers

ALPHAS = np.round(np.linspace(0.0, 1.0, 11), 2)  # α grid; 0 = no scaling (always a candidate)
SEARCH_METHOD = "rtn"  # the quantizer the search runs (rtn: 10x cheaper than the compile's GPTQ, picks ~the same α)
SEARCH_BITS = 4  # the tier the search minimises (the one the fidelity targets and the allocator centre on)


def _rms(H: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.maximum(np.diag(H), 0))
    return np.where(d > 0, d, d[d > 0].min() if np.any(d > 0) else 1.0)


def _scales(rms: np.ndarray, alpha: float) -> np.ndarray:
    s = rms.astype(np.float64) ** alpha
    return (s / np.exp(np.mean(np.log(s)))).astype(np.float32)  # geometric mean 1: weights keep their range


def _decode(w: np.ndarray, bits: int, group_size: int, H: np.ndarray, codec: str, method: str) -> np.ndarray:
    """w quantized and decoded: method "rtn" | "search" (the clipping search) | "gptq" (search + error feedback)."""
    from nadoo.runtime.tiers import CODECS, TIER_BITS

    tier = next(t for t, b in TIER_BITS.items() if b == bits)
    layout = CODECS[codec][tier]
    G = min(group_size, w.shape[1])
    q = quantize(w, bits, G, np.diag(H).astype(np.float32), method="rtn" if method == "rtn" else "search",
                 codec=codec, **({"hessian": H} if method == "gptq" else {}))
    return layout.decode(tier, layout.pack(*q, G), w.shape[0], w.shape[1], G)


def output_error(w: np.ndarray, wq: np.ndarray, H: np.ndarray) -> float:
    """tr(D H Dᵀ) / tr(W H Wᵀ): the relative output-error energy of a layer on its calibration inputs."""
    d = (w - wq).astype(np.float64)
    w64 = w.astype(np.float64)
    # (D H) ∘ D summed: one GEMM (a three-operand einsum runs as an unblocked loop, ~20x slower)
    return float(np.sum((d @ H) * d) / max(np.sum((w64 @ H) * w64), 1e-30))


def search_alpha(ws: list[np.ndarray], H: np.ndarray, group_size: int, codec: str, bits: int = SEARCH_BITS,
                 method: str = SEARCH_METHOD, alphas=ALPHAS) -> tuple[float, np.ndarray, dict]:
    """The α (and its scales s) minimising the summed relative output error of the layers `ws`
    [R_i, K] that read one input with second moment H [K, K]. Returns (α, s, {α: error})."""
    rms = _rms(H)
    errs = {}
    for a in alphas:
        s = _scales(rms, float(a))
        if max(float(np.abs(w * s).max()) for w in ws) > F16_MAX:  # the scales are stored as float16
            continue
        Hs = H / np.outer(s, s)
        errs[float(a)] = sum(output_error(w * s, _decode(w * s, bits, group_size, Hs, codec, method), Hs) for w in ws)
    if not errs:  # the weights themselves are out of float16 range: the quantizer reports that
        return 0.0, np.ones(len(rms), np.float32), errs
    best = min(errs, key=errs.get)
    return best, _scales(rms, best), errs


def _rescale_inputs(st, inv: np.ndarray) -> None:
    """The calibration statistics of a layer whose input is now x · inv (per channel)."""
    st.sum_xxt *= np.outer(inv, inv)
    st.sum_x2 *= inv.astype(np.float64) ** 2
    st._H = (None, -1)  # the memoised H (and with it the GPTQ factor) is of the unscaled input
    if hasattr(st, "_gptq_u"):
        del st._gptq_u
    if getattr(st, "x_rows", None):
        st.x_rows = [x * inv for x in st.x_rows]


def _rescale_outputs(st, inv: np.ndarray) -> None:
    """The output statistics of a layer whose output rows are now scaled by inv."""
    out = st.out
    out.sum_abs *= inv
    out.peak *= inv
    out.sample_energy = [e * inv.astype(np.float64) ** 2 for e in out.sample_energy]


def _fresh(name: str, taken) -> str:
    k, out = 0, name
    while out in taken:
        k += 1
        out = f"{name}.{k}"
    return out


def _value_to_output(graph: dict, consts: dict, cons: dict, by_name: dict, stats: dict) -> list[tuple]:
    """(value weight, its bias Add node or None, bias constant or "", output-projection weight) of every
    EncoderAttention whose V comes from a ChunkedLinear (+ constant bias) read by nothing else, and
    whose output feeds only a ChunkedLinear."""
    producer = {o: n for n in graph["nodes"] for o in n["outputs"] if o}
    pairs = []
    for n in graph["nodes"]:
        add = None
        if n.get("domain") != "nadoo" or n["op"] != "EncoderAttention":
            continue
        v, bias = n["inputs"][2], ""
        p = producer.get(v)
        if p is not None and p["op"] == "Add" and not p.get("domain") and len(cons.get(v, [])) == 1:
            lin = [x for x in p["inputs"] if x in producer and producer[x].get("op") == "ChunkedLinear"]
            if len(lin) == 1 and len(cons.get(lin[0], [])) == 1:
                bias = next(x for x in p["inputs"] if x != lin[0])
                if bias not in consts:  # a computed bias: V is not the projection alone
                    continue
                add, p = p, producer[lin[0]]
        if (p is None or p.get("op") != "ChunkedLinear" or len(p["inputs"]) > 1
                or len(cons.get(p["outputs"][0], [])) != 1):
            continue
        after = cons.get(n["outputs"][0], [])
        if len(after) != 1 or after[0].get("op") != "ChunkedLinear" or after[0]["inputs"][0] != n["outputs"][0]:
            continue
        wv, wo = by_name[p["attrs"]["weight"]], by_name[after[0]["attrs"]["weight"]]
        if wo.kind == "linear" and wv.kind == "linear" and stats.get(wo.name) is not None:
            pairs.append((wv, add, bias, wo))
    return pairs


def _input_groups(graph: dict, by_name: dict, stats: dict, skip: set) -> dict[str, list]:
    """The value each scalable layer reads -> [(node, weight)] of the layers reading it."""
    groups: dict[str, list] = {}
    for n in graph["nodes"]:
        if n.get("domain") != "nadoo":
            continue
        key = "weight" if n["op"] == "ChunkedLinear" else "up" if n["op"] == "ChunkedFFN" else None
        w = by_name.get((n.get("attrs") or {}).get(key))
        if w is None or w.name in skip or w.kind not in ("linear", "ffn_up"):
            continue
        st = stats.get(w.name)
        if st is None or st.hessian() is None:
            continue
        groups.setdefault(n["inputs"][0], []).append((n, w))
    return groups


def apply_awq(graph: dict, consts: dict, weights: list, stats: dict, group_size: int, codec: str,
              method: str = SEARCH_METHOD) -> tuple[dict, list[str]]:
    """Scale every scalable layer of `graph` (module docstring), in place on the weights, constants and
    calibration statistics; returns (the new graph, notes)."""
    cons = consumers(graph)
    by_name = {w.name: w for w in weights}
    pairs = _value_to_output(graph, consts, cons, by_name, stats)
    alphas, new_consts = [], []
    nodes = list(graph["nodes"])
    at = lambda node: next(i for i, n in enumerate(nodes) if n is node)  # noqa: E731

    def repoint(node, old: str, new: str) -> None:
        # a source node (V's bias Add) is shared with the source graph the reference runs: replaced by a
        # copy; the nadoo nodes are the compiler's own and edited in place (_prepare_ffn holds the FFN's)
        fresh = dict(node, inputs=[new if x == old else x for x in node["inputs"]])
        if node.get("domain") == "nadoo":
            node.update(fresh)
        else:
            nodes[at(node)] = fresh

    for wv, add, bias, wo in pairs:  # exact: V's channel j scaled by 1/s_j, the output projection's column j by s_j
        a, s, _ = search_alpha([wo.array], stats[wo.name].hessian(), group_size, codec, method=method)
        alphas.append(a)
        if a == 0:
            continue
        inv = (1.0 / s).astype(np.float32)
        if float(np.abs(wv.array * inv[:, None]).max()) > F16_MAX:  # V's rows would leave float16 range
            alphas[-1] = 0.0
            continue
        wo.array = np.ascontiguousarray(wo.array * s)
        wv.array = np.ascontiguousarray(wv.array * inv[:, None])
        if bias:  # exporters share equal initializers: a bias read elsewhere too gets its own copy first
            if len(cons.get(bias, [])) > 1:
                copy = _fresh(f"{bias}.{wv.name}", consts)
                consts[copy] = np.array(consts[bias], copy=True)
                new_consts.append(copy)
                repoint(add, bias, copy)
                bias = copy
            consts[bias] = (consts[bias] * inv.reshape(consts[bias].shape)).astype(consts[bias].dtype)
        _rescale_inputs(stats[wo.name], inv)
        _rescale_outputs(stats[wv.name], inv)
    for x, group in _input_groups(graph, by_name, stats, {p[-1].name for p in pairs}).items():
        H = stats[group[0][1].name].hessian()
        a, s, _ = search_alpha([w.array for _, w in group], H, group_size, codec, method=method)
        alphas.append(a)
        if a == 0:
            continue
        inv = (1.0 / s).astype(np.float32)
        cname = _fresh(f"{x}.awq_inv_scale", consts)
        xs = _fresh(f"{x}.awq", {o for n in nodes for o in n["outputs"]} | set(consts))
        consts[cname] = inv
        new_consts.append(cname)
        first = min(at(n) for n, _ in group)
        nodes.insert(first, {"op": "Mul", "domain": "", "name": xs, "inputs": [x, cname], "outputs": [xs], "attrs": {}})
        for n, w in group:
            repoint(n, x, xs)
            w.array = np.ascontiguousarray(w.array * s)
            _rescale_inputs(stats[w.name], inv)
    g = dict(graph, nodes=nodes, constants=sorted(set(graph["constants"]) | set(new_consts)))
    note = (f"activation-aware scaling: {sum(a > 0 for a in alphas)} of {len(alphas)} layer groups scaled "
            f"(α median {np.median(alphas) if alphas else 0:.2f}; {len(pairs)} folded into V)")
    return g, [note]
