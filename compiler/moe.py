"""Mixture-of-experts: recognise MoE blocks in torch models, export each as ONE `nadoo.MoE` node, and
store every expert as a chunk group.

Recognition works on behaviour, not on source code: a module is an MoE block when it has
  * a router: an nn.Linear (or a child holding a single 2-D `weight`) with E outputs, and
  * E identically shaped experts: an nn.ModuleList of FFNs (plain Linear-act-Linear or gated
    w1/w3/w2, gate/up/down), or 3-D parameters stacked over experts (transformers' MixtralExperts:
    `gate_up_proj` [E, 2F, H] + `down_proj` [E, H, F]), and
  * optionally a shared expert (+ a sigmoid gate) added to the routed output.
Every reading of those weights (which matrix is the gate, which activation, top-k, softmax before or
after top-k, renormalisation, shared expert or not) is *tried* against the module's own forward on
random inputs; the block is replaced only if exactly that dense reference reproduces it, so whatever
Python loop or indexing the source uses does not matter. A block nothing reproduces stays as it is
(exported densely) and the compile report says so.

The replacement's forward calls the custom op `torch.ops.nadoo.moe` (dense reference implementation
for eager runs and fake tensors), which the dynamo ONNX exporter translates to one `nadoo.MoE` node.

This module is the graph → bundle half: each `nadoo.MoE` node's experts leave the constants
(`extract_moe`), are calibrated (`MoECalibration`), written as chunk groups (`write_moe`) and the
exported graph is checked against the torch model (`verify_moe_graph`). Recognition is moe_detect.py,
the torch op moe_torch.py (both re-exported here).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nadoo.runtime.errors import CompileError
from nadoo.runtime.tiers import CODECS, DEFAULT_CODEC, SeparateTier, TierLayout

from .moe_detect import MoESpec, detect_moe, make_wrapper, patch_moe_blocks  # noqa: F401  (re-exported)
from .moe_torch import moe_reference, register_op, route_torch, translation_table  # noqa: F401  (re-exported)


@dataclass
class MoELayer:
    """One nadoo.MoE node of the graph with its expert weights taken out of the constants."""
    name: str
    node_name: str
    w1: np.ndarray  # [E, F, H]
    w3: np.ndarray | None
    w2: np.ndarray  # [E, H, F]
    top_k: int
    activation: str
    softmax_order: str
    normalize: bool

    @property
    def n_experts(self) -> int:
        return self.w1.shape[0]

    @property
    def gated(self) -> bool:
        return self.w3 is not None

    def block(self, e: int) -> np.ndarray:
        """Expert e as the runtime's decoded block [w1, (w3,) w2ᵀ], float32."""
        mats = [self.w1[e]] + ([self.w3[e]] if self.gated else []) + [self.w2[e].T]
        return np.ascontiguousarray(np.stack(mats), dtype=np.float32)


def extract_moe(graph: dict, consts: dict) -> tuple[dict, dict, list[MoELayer]]:
    """Take the expert weights of every nadoo.MoE node out of the constants; the node keeps its router
    and biases (small, inline) and gains attrs `moe` (its index entry), `n_experts`, `gated`."""
    consts = dict(consts)
    layers, nodes, names = [], [], set()
    for n in graph["nodes"]:
        if n.get("domain") != "nadoo" or n["op"] != "MoE":
            nodes.append(n)
            continue
        ins = list(n["inputs"]) + [""] * (9 - len(n["inputs"]))
        a = n.get("attrs", {})
        missing = [ins[i] for i in (1, 3, 5) if ins[i] not in consts] + ([ins[4]] if ins[4] and ins[4] not in consts else [])
        if missing:
            raise CompileError(f"MoE node {n['name']}: expert weights {missing} are not constants")
        w1 = np.ascontiguousarray(consts.pop(ins[3]), np.float32)
        w3 = np.ascontiguousarray(consts.pop(ins[4]), np.float32) if ins[4] else None
        w2 = np.ascontiguousarray(consts.pop(ins[5]), np.float32)
        name = ins[3][: -len(".moe_w1")] if ins[3].endswith(".moe_w1") else n["name"]
        while name in names:
            name += "_"
        names.add(name)
        E, F, H = w1.shape
        if w2.shape != (E, H, F) or (w3 is not None and w3.shape != w1.shape):
            raise CompileError(f"MoE node {n['name']}: expert weight shapes disagree ({w1.shape}, {w2.shape})")
        layers.append(MoELayer(name, n["name"], w1, w3, w2, int(a["top_k"]), str(a["activation"]),
                               str(a["softmax_order"]), bool(a["normalize"])))
        ins[3] = ins[4] = ins[5] = ""
        while ins and ins[-1] == "":
            ins.pop()
        nodes.append(dict(n, inputs=ins, attrs=dict(a, moe=name, n_experts=E, gated=int(w3 is not None))))
    g = dict(graph, nodes=nodes)
    g["constants"] = [c for c in graph.get("constants", []) if c in consts]
    return g, consts, layers


class MoECalibration:
    """Dense float implementation of nadoo.MoE for calibration that records, per layer and expert, how
    often it fires, its mean routing weight, and the input / hidden second moments (quantization
    importance of w1/w3 and of w2)."""

    def __init__(self, layers: list[MoELayer]):
        self.layers = {l.name: l for l in layers}
        self.rec = {}
        for l in layers:
            E, F, H = l.w1.shape
            self.rec[l.name] = dict(tokens=0, count=np.zeros(E), wsum=np.zeros(E), x2=np.zeros((E, H)), x2_all=np.zeros(H),
                                    h2=np.zeros((E, F)))

    def builders(self, record: bool = True, masks: dict | None = None) -> dict:
        from nadoo.runtime.activations import apply as activation
        from nadoo.runtime.chunked.moe import route

        def build(node, ctx):
            l = self.layers[node["attrs"]["moe"]]
            r = self.rec[l.name]
            blocks = [l.block(e) for e in range(l.n_experts)]

            def run(x, router_w, router_b=None, w1=None, w3=None, w2=None, b1=None, b3=None, b2=None):
                xf = x.reshape(-1, x.shape[-1]).astype(np.float32)
                z = xf @ router_w.T + (router_b if router_b is not None else 0)
                k = l.top_k
                if masks and l.name in masks:
                    on = masks[l.name]
                    z = np.where(on, z, np.float32(-np.inf))
                    k = min(k, int(on.sum()))
                idx, wts = route(z, k, l.softmax_order, l.normalize)
                out = np.zeros_like(xf)
                for e in np.unique(idx).tolist():
                    tok, slot = np.nonzero(idx == e)
                    xe, B = xf[tok], blocks[e]
                    h = xe @ B[0].T + (b1[e] if b1 is not None else 0)
                    h = activation(l.activation, h)
                    if l.gated:
                        h = h * (xe @ B[1].T + (b3[e] if b3 is not None else 0))
                    y = h @ B[-1] + (b2[e] if b2 is not None else 0)
                    out[tok] += wts[tok, slot][:, None] * y
                    if record:
                        r["count"][e] += len(tok)
                        r["wsum"][e] += float(wts[tok, slot].sum())
                        r["x2"][e] += np.einsum("nh,nh->h", xe, xe, dtype=np.float64)
                        r["h2"][e] += np.einsum("nf,nf->f", h, h, dtype=np.float64)
                if record:
                    r["tokens"] += xf.shape[0]
                    r["x2_all"] += np.einsum("nh,nh->h", xf, xf, dtype=np.float64)
                return out.reshape(x.shape)
            return run
        return {("nadoo", "MoE"): build}

    def importance(self, name: str, e: int, mat: str) -> np.ndarray | None:
        r = self.rec[name]
        n = r["count"][e]
        if mat == "w2":
            return (r["h2"][e] / n).astype(np.float32) if n > 0 else None
        if n > 0:
            return (r["x2"][e] / n).astype(np.float32)
        return (r["x2_all"] / r["tokens"]).astype(np.float32) if r["tokens"] else None

    def profile(self) -> dict:
        out = {}
        for name, r in self.rec.items():
            l = self.layers[name]
            t = max(r["tokens"], 1)
            out[name] = {
                "n_experts": l.n_experts, "top_k": l.top_k, "tokens": int(r["tokens"]),
                "expert_count": r["count"].astype(int).tolist(),
                "expert_frequency": (r["count"] / t).tolist(),  # share of tokens routed to each expert
                "mean_weight": np.where(r["count"] > 0, r["wsum"] / np.maximum(r["count"], 1), 0.0).tolist(),
            }
        return out


def write_moe(wr, layers: list[MoELayer], cal: MoECalibration, group_size: int, layouts: list[TierLayout],
              codec: str = DEFAULT_CODEC) -> tuple[list[dict], dict]:
    """Write every expert as a chunk group: per layer and tier, experts in order, each expert's matrices
    (w1, w3, w2) back to back, so one merged positioned read fetches an expert. Experts have no nested
    bit-planes (the MoE op decodes whole §4.2 payloads): every tier a layout serves is stored separately,
    its bytes counted under the layout's key (tiers of nested planes in `codec`). Returns (index entries,
    stored bytes per layout key)."""
    from .quantize import quantize_payload

    tiers = [(t, layout.key, layout if isinstance(layout, SeparateTier) else CODECS[codec][t])
             for layout in layouts for t in layout.serves]
    tier_bytes = {layout.key: 0 for layout in layouts}
    entries = []
    for l in layers:
        E, F, H = l.w1.shape
        mats = ("w1", "w3", "w2") if l.gated else ("w1", "w2")
        experts = [{"tensors": {m: {"shape": [H, F] if m == "w2" else [F, H], "tiers": {}, "errors": {}} for m in mats}}
                   for _ in range(E)]
        for tier, counted, store in tiers:
            for e in range(E):
                for m in mats:
                    w = getattr(l, m)[e]
                    d = experts[e]["tensors"][m]
                    if not store.quantized:
                        pid = wr.add_payload(store.pack(w)[0])
                    else:
                        payload, err = quantize_payload(w, store.bits, store.group(w.shape[1], group_size),
                                                        cal.importance(l.name, e, m), codec=store.codec)
                        pid = wr.add_payload(payload)
                        d["errors"][tier] = {"mse": err["mse"], "out_err": err["out_err"]}
                    store.record(d, [pid])
                    tier_bytes[counted] += wr.stored_length(pid)
        entries.append({
            "name": l.name, "node": l.node_name, "n_experts": E, "top_k": l.top_k, "hidden": H, "intermediate": F,
            "gated": l.gated, "activation": l.activation, "softmax_order": l.softmax_order,
            "normalize": l.normalize, "group_size": group_size, "experts": experts,
        })
    return entries, tier_bytes


def verify_moe_graph(graph: dict, consts: dict, weights: list, cal: MoECalibration, inputs: dict,
                     expected: dict) -> float:
    """Run the rewritten graph densely (float) and compare with the source model's outputs; returns the
    max abs error relative to the output scale, raising CompileError when the export is not faithful."""
    import warnings

    from nadoo.runtime.engine import Plan

    from .calibrate import dense_builders

    ops = dict(dense_builders({w.name: w for w in weights}))
    ops.update(cal.builders(record=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = Plan(graph, consts, custom_ops=ops).run(inputs)
    worst = 0.0
    for o, y in zip(graph["outputs"], outs):
        r = expected.get(o["name"])
        if r is None or np.asarray(r).dtype.kind != "f":
            continue
        err = float(np.max(np.abs(y - r))) / (float(np.max(np.abs(r))) + 1e-12)
        worst = max(worst, err)
    if worst > 1e-3:
        raise CompileError(f"the exported MoE graph differs from the torch model (relative error {worst:.2e})")
    return worst
