"""Mixture-of-experts: recognise MoE blocks in torch models, export each as ONE `nadoo.MoE` node, and
store every expert as a chunk group (issue #7).

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
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import numpy as np

from nadoo.runtime.errors import CompileError
from nadoo.runtime.tiers import CODECS, DEFAULT_CODEC, SeparateTier, TierLayout

log = logging.getLogger(__name__)

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
MATS = ("w1", "w3", "w2")  # w1: [F, H] gate (activated) / up of a plain FFN; w3: [F, H] up; w2: [H, F] down

_registered = None


# --------------------------------------------------------------------------------------------- torch op
def _torch():
    import torch

    return torch


def _act(name: str, h):
    import torch.nn.functional as F

    if name == "silu":
        return F.silu(h)
    if name == "gelu":
        return F.gelu(h)
    if name == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if name == "relu":
        return F.relu(h)
    raise CompileError(f"unknown MoE activation {name!r}")


def route_torch(logits, top_k: int, softmax_order: str, normalize: bool):
    """(weights [N, E] dense with zeros off the top-k, indices [N, k]) — the routing the op implements.
    Ties between equal scores go to the lower expert id (torch.topk and the NumPy runtime agree)."""
    torch = _torch()
    if softmax_order == "before":
        p = torch.softmax(logits.float(), dim=-1)
        val, idx = torch.topk(p, top_k, dim=-1)
        if normalize:
            val = val / val.sum(-1, keepdim=True)
    else:
        val, idx = torch.topk(logits.float(), top_k, dim=-1)
        val = torch.softmax(val, dim=-1)
    dense = torch.zeros_like(logits, dtype=torch.float32).scatter(-1, idx, val)
    return dense, idx


def moe_reference(x, router_w, router_b, w1, w3, w2, b1, b3, b2, top_k: int, activation: str,
                  softmax_order: str, normalize: bool):
    """Dense reference of `nadoo.MoE`: every expert on every token, weighted by the sparse routing."""
    torch = _torch()
    shape = x.shape
    xf = x.reshape(-1, shape[-1])
    logits = xf @ router_w.T
    if router_b is not None:
        logits = logits + router_b
    dense, _ = route_torch(logits, top_k, softmax_order, normalize)
    h = torch.einsum("nh,efh->enf", xf, w1)
    if b1 is not None:
        h = h + b1[:, None, :]
    h = _act(activation, h)
    if w3 is not None:
        u = torch.einsum("nh,efh->enf", xf, w3)
        if b3 is not None:
            u = u + b3[:, None, :]
        h = h * u
    y = torch.einsum("enf,ehf->enh", h, w2)
    if b2 is not None:
        y = y + b2[:, None, :]
    out = torch.einsum("ne,enh->nh", dense.to(y.dtype), y)
    return out.reshape(shape)


def register_op():
    """Define torch.ops.nadoo.moe once (idempotent); returns the op overload packet."""
    global _registered
    if _registered is not None:
        return _registered
    torch = _torch()
    try:
        existing = torch.ops.nadoo.moe
        _registered = existing
        return existing
    except (AttributeError, RuntimeError):
        pass

    schema = ("(Tensor x, Tensor router_w, Tensor? router_b, Tensor w1, Tensor? w3, Tensor w2, Tensor? b1, "
              "Tensor? b3, Tensor? b2, int top_k, str activation, str softmax_order, bool normalize) -> Tensor")

    @torch.library.custom_op("nadoo::moe", mutates_args=(), schema=schema)
    def moe(x, router_w, router_b, w1, w3, w2, b1, b3, b2, top_k, activation, softmax_order, normalize):
        return moe_reference(x, router_w, router_b, w1, w3, w2, b1, b3, b2, top_k, activation,
                             softmax_order, normalize).contiguous()

    @moe.register_fake
    def _(x, router_w, router_b, w1, w3, w2, b1, b3, b2, top_k, activation, softmax_order, normalize):
        return torch.empty_like(x)

    _registered = torch.ops.nadoo.moe
    return _registered


_INPUTS = ("x", "router_w", "router_b", "w1", "w3", "w2", "b1", "b3", "b2")
_OPTIONAL = {"router_b", "w3", "b1", "b3", "b2"}


def _onnx_schema():
    """An ONNX OpSchema for nadoo.MoE, registered once, so onnxscript can emit the node."""
    import onnx

    try:
        return onnx.defs.get_schema("MoE", 1, "nadoo")
    except Exception:
        pass
    S = onnx.defs.OpSchema
    opt, single = S.FormalParameterOption.Optional, S.FormalParameterOption.Single
    A = S.AttrType
    schema = S(
        "MoE", "nadoo", 1, doc="mixture of experts: dense router, top-k experts per token (nadoo runtime op)",
        inputs=[S.FormalParameter(n, "T", param_option=opt if n in _OPTIONAL else single) for n in _INPUTS],
        outputs=[S.FormalParameter("y", "T")],
        type_constraints=[("T", ["tensor(float)"], "float32")],
        attributes=[S.Attribute("top_k", A.INT, ""), S.Attribute("activation", A.STRING, ""),
                    S.Attribute("softmax_order", A.STRING, ""), S.Attribute("normalize", A.INT, "")],
    )
    onnx.defs.register_schema(schema)
    return onnx.defs.get_schema("MoE", 1, "nadoo")


def translation_table() -> dict:
    """custom_translation_table for torch.onnx.export(dynamo=True): nadoo::moe → one nadoo.MoE node."""
    op = register_op()
    from onnxscript import values

    moe_op = values.Op(values.Opset("nadoo", 1), "MoE", _onnx_schema())

    def moe_onnx(x, router_w, router_b, w1, w3, w2, b1, b3, b2, top_k: int, activation: str,
                 softmax_order: str, normalize: bool):
        return moe_op(x, router_w, router_b, w1, w3, w2, b1, b3, b2, top_k=top_k, activation=activation,
                         softmax_order=softmax_order, normalize=int(bool(normalize)))

    return {op.default: moe_onnx}


# --------------------------------------------------------------------------------------------- recognition
@dataclass
class MoESpec:
    """What a recognised block computes (torch tensors, stacked over experts)."""
    router_w: object
    router_b: object | None
    w1: object  # [E, F, H]
    w3: object | None
    w2: object  # [E, H, F]
    b1: object | None = None
    b3: object | None = None
    b2: object | None = None
    top_k: int = 2
    activation: str = "silu"
    softmax_order: str = "before"
    normalize: bool = True
    shared: object | None = None  # module computing the shared expert on x [N, H]
    shared_gate: object | None = None  # Linear H -> 1 (sigmoid gate) or None
    returns_logits: bool = False
    takes_2d: bool = False
    notes: list = field(default_factory=list)


def _linears(mod):
    torch = _torch()
    return [(n, m) for n, m in mod.named_modules() if isinstance(m, torch.nn.Linear)]


def _router_candidates(m, H_guess=None):
    torch = _torch()
    out = []
    for name, c in m.named_children():
        if isinstance(c, torch.nn.Linear):
            if 2 <= c.out_features <= 4096:
                out.append((name, c.weight, c.bias))
            continue
        ps = dict(c.named_parameters(recurse=False))
        if len(ps) >= 1 and "weight" in ps and ps["weight"].dim() == 2 and not list(c.children()) \
                and 2 <= ps["weight"].shape[0] <= 4096:
            out.append((name, ps["weight"], ps.get("bias")))
    return out


def _expert_readings(m, E: int, H: int):
    """Candidate (w1, w3, w2, b1, b3, b2, from_names) stackings of the experts found in m."""
    torch = _torch()
    found = []
    for name, c in m.named_children():
        if isinstance(c, torch.nn.ModuleList) and len(c) == E:
            shapes = [tuple((k, tuple(v.shape)) for k, v in e.state_dict().items()) for e in c]
            if len(set(shapes)) != 1:
                continue
            lins = [_linears(e) for e in c]
            n_lin = len(lins[0])
            if n_lin not in (2, 3):
                continue
            first = lins[0]
            for down in range(n_lin):
                if first[down][1].out_features != H:
                    continue
                rest = [j for j in range(n_lin) if j != down]
                if any(first[j][1].in_features != H for j in rest):
                    continue
                F_ = first[rest[0]][1].out_features
                if any(first[j][1].out_features != F_ for j in rest) or first[down][1].in_features != F_:
                    continue
                orders = itertools.permutations(rest) if len(rest) == 2 else [tuple(rest)]
                for order in orders:
                    st = lambda j, what: torch.stack([getattr(l[j][1], what) for l in lins]).detach()  # noqa: E731
                    has_b = lambda j: first[j][1].bias is not None  # noqa: E731
                    g, u = order[0], order[1] if len(order) > 1 else None
                    found.append(dict(
                        w1=st(g, "weight"), w3=st(u, "weight") if u is not None else None, w2=st(down, "weight"),
                        b1=st(g, "bias") if has_b(g) else None,
                        b3=st(u, "bias") if u is not None and has_b(u) else None,
                        b2=st(down, "bias") if has_b(down) else None, src=name))
    # 3-D parameters stacked over experts, in m itself or one child (transformers' *Experts modules)
    holders = [("", m)] + [(n, c) for n, c in m.named_children() if not isinstance(c, torch.nn.ModuleList)]
    for hname, hmod in holders:
        ps = [(n, p) for n, p in hmod.named_parameters(recurse=False) if p.dim() == 3 and p.shape[0] == E]
        if len(ps) < 2:
            continue
        mats = []  # every 3-D param in both orientations, as [E, out, in]
        for n, p in ps:
            mats.append((n, p.detach()))
            mats.append((n + ".T", p.detach().transpose(1, 2)))
        for (n2, w2) in mats:
            if w2.shape[1] != H:
                continue
            F_ = w2.shape[2]
            for (n1, w) in mats:
                if n1.split(".")[0] == n2.split(".")[0] or w.shape[2] != H:
                    continue
                if w.shape[1] == 2 * F_:  # fused gate/up: both halves, both orders; or interleaved
                    a, b = w[:, :F_], w[:, F_:]
                    found.append(dict(w1=a.contiguous(), w3=b.contiguous(), w2=w2.contiguous(), src=hname))
                    found.append(dict(w1=b.contiguous(), w3=a.contiguous(), w2=w2.contiguous(), src=hname))
                    found.append(dict(w1=w[:, 0::2].contiguous(), w3=w[:, 1::2].contiguous(), w2=w2.contiguous(), src=hname))
                elif w.shape[1] == F_:
                    found.append(dict(w1=w.contiguous(), w3=None, w2=w2.contiguous(), src=hname))
                    for (n3, w3) in mats:
                        if n3.split(".")[0] in (n1.split(".")[0], n2.split(".")[0]) or tuple(w3.shape) != tuple(w.shape):
                            continue
                        found.append(dict(w1=w.contiguous(), w3=w3.contiguous(), w2=w2.contiguous(), src=hname))
    for f in found:
        for k in ("b1", "b3", "b2"):
            f.setdefault(k, None)
    return found


def _call(m, x):
    out = m(x)
    if isinstance(out, (tuple, list)):
        return out[0], out
    return out, None


def _close(a, b) -> bool:
    torch = _torch()
    if a.shape != b.shape:
        return False
    scale = float(b.abs().max()) + 1e-6
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-4 * scale))


def _expert_outputs(r, xf, act):
    """Y [E, N, H]: every expert's output on every token."""
    torch = _torch()
    h = torch.einsum("nh,efh->enf", xf, r["w1"])
    if r["b1"] is not None:
        h = h + r["b1"][:, None, :]
    h = _act(act, h)
    if r["w3"] is not None:
        u = torch.einsum("nh,efh->enf", xf, r["w3"])
        if r["b3"] is not None:
            u = u + r["b3"][:, None, :]
        h = h * u
    y = torch.einsum("enf,ehf->enh", h, r["w2"])
    if r["b2"] is not None:
        y = y + r["b2"][:, None, :]
    return y


def detect_moe(m, seed: int = 0) -> MoESpec | None:
    """Recognise `m` as an MoE block by reproducing its forward; None if it is not one."""
    torch = _torch()
    routers = _router_candidates(m)
    if not routers:
        return None
    for rname, rw, rb in routers:
        E, H = int(rw.shape[0]), int(rw.shape[1])
        readings = _expert_readings(m, E, H)
        if not readings:
            continue
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 7, H, generator=g)
        was_training = m.training
        m.eval()
        try:
            with torch.no_grad():
                takes_2d = False
                try:
                    ref, full = _call(m, x)
                    if ref.shape != x.shape:
                        raise ValueError
                except Exception:
                    takes_2d = True
                    try:
                        ref, full = _call(m, x.reshape(-1, H))
                    except Exception:
                        continue
                ref = ref.reshape(-1, H).float()
                xf = x.reshape(-1, H)
                logits = xf @ rw.detach().T + (rb.detach() if rb is not None else 0)
                returns_logits = False
                if full is not None:
                    if len(full) >= 2 and isinstance(full[1], torch.Tensor) and _close(full[1].reshape(-1, E).float(), logits):
                        returns_logits = True
                    if not returns_logits or len(full) > 2:
                        continue  # a tuple we cannot reproduce
                # shared expert candidates: other children with parameters
                used = {rname} | {r["src"] for r in readings}
                others = [(n, c) for n, c in m.named_children() if n not in used and any(True for _ in c.parameters())]
                gates = [c for n, c in others if isinstance(c, torch.nn.Linear) and c.out_features == 1 and c.in_features == H]
                shared_opts = [(None, None)]
                for n, c in others:
                    if isinstance(c, torch.nn.Linear) and c.out_features == 1:
                        continue
                    try:
                        s_out = c(xf)
                    except Exception:
                        continue
                    if not isinstance(s_out, torch.Tensor) or s_out.shape != xf.shape:
                        continue
                    shared_opts.append((c, None))
                    shared_opts += [(c, gt) for gt in gates]
                for r in readings:
                    for act in ACTIVATIONS:
                        Y = _expert_outputs(r, xf, act)
                        for (sh, sg), order, k in itertools.product(
                                shared_opts, (("before", True), ("before", False), ("after", False)), range(1, E + 1)):
                            if order[0] == "after" and k == 1:
                                continue  # softmax over one logit = 1: same as before+normalize
                            dense, _ = route_torch(logits, k, order[0], order[1])
                            out = torch.einsum("ne,enh->nh", dense, Y)
                            if sh is not None:
                                s = sh(xf)
                                out = out + (torch.sigmoid(sg(xf)) * s if sg is not None else s)
                            if _close(out, ref):
                                return MoESpec(
                                    router_w=rw, router_b=rb, w1=r["w1"], w3=r["w3"], w2=r["w2"], b1=r["b1"],
                                    b3=r["b3"], b2=r["b2"], top_k=k, activation=act, softmax_order=order[0],
                                    normalize=order[1], shared=sh, shared_gate=sg, returns_logits=returns_logits,
                                    takes_2d=takes_2d)
        finally:
            m.train(was_training)
    return None


def _looks_like_moe(m) -> bool:
    """Cheap structural pre-filter: a router with E outputs next to E experts (a ModuleList of E
    modules, or 3-D parameters with leading dim E); only then is detection tried."""
    torch = _torch()
    for _, rw, _ in _router_candidates(m):
        E = int(rw.shape[0])
        for _, c in m.named_children():
            if isinstance(c, torch.nn.ModuleList) and len(c) == E:
                return True
        holders = [m] + list(m.children())
        if any(sum(1 for p in h.parameters(recurse=False) if p.dim() == 3 and p.shape[0] == E) >= 2 for h in holders):
            return True
    return False


def make_wrapper(spec: MoESpec):
    torch = _torch()
    op = register_op()
    P = lambda t: None if t is None else torch.nn.Parameter(t.detach().clone().contiguous(), requires_grad=False)  # noqa: E731

    class NadooMoE(torch.nn.Module):
        """Replacement of a recognised MoE block: one nadoo::moe call (+ the shared expert, if any)."""

        def __init__(self):
            super().__init__()
            self.moe_router_w = P(spec.router_w)
            self.moe_router_b = P(spec.router_b)
            self.moe_w1 = P(spec.w1)
            self.moe_w3 = P(spec.w3)
            self.moe_w2 = P(spec.w2)
            self.moe_b1 = P(spec.b1)
            self.moe_b3 = P(spec.b3)
            self.moe_b2 = P(spec.b2)
            self.shared = spec.shared
            self.shared_gate = spec.shared_gate
            self.top_k, self.activation = spec.top_k, spec.activation
            self.softmax_order, self.normalize = spec.softmax_order, spec.normalize
            self.returns_logits = spec.returns_logits

        def forward(self, hidden_states, *args, **kwargs):
            shape = hidden_states.shape
            x = hidden_states.reshape(-1, shape[-1])
            # dense_reference: every expert on every token in plain torch ops (a dense-equivalent export, e.g. for ORT)
            fn = moe_reference if getattr(self, "dense_reference", False) else op
            y = fn(x, self.moe_router_w, self.moe_router_b, self.moe_w1, self.moe_w3, self.moe_w2, self.moe_b1,
                   self.moe_b3, self.moe_b2, self.top_k, self.activation, self.softmax_order, self.normalize)
            if self.shared is not None:
                s = self.shared(x)
                y = y + (torch.sigmoid(self.shared_gate(x)) * s if self.shared_gate is not None else s)
            y = y.reshape(shape)
            if self.returns_logits:
                logits = x @ self.moe_router_w.T
                if self.moe_router_b is not None:
                    logits = logits + self.moe_router_b
                return y, logits
            return y

    return NadooMoE()


def patch_moe_blocks(module) -> list[str]:
    """Replace every recognised MoE block inside `module` (in place). Returns the replaced paths."""
    torch = _torch()
    if not isinstance(module, torch.nn.Module) or isinstance(module, torch.jit.ScriptModule):
        return []
    replaced: list[str] = []
    for path, m in list(module.named_modules()):
        if any(path == r or path.startswith(r + ".") for r in replaced) or type(m).__name__ == "NadooMoE":
            continue
        if not _looks_like_moe(m):
            continue
        spec = detect_moe(m)
        if spec is None:
            log.warning("module %s looks like a mixture of experts but no reading reproduces it; exported densely", path)
            continue
        w = make_wrapper(spec)
        if path == "":
            raise CompileError("the model itself is an MoE block; wrap it in a parent module")
        parent_path, _, leaf = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        setattr(parent, leaf, w)
        replaced.append(path)
    return replaced


# --------------------------------------------------------------------------------------------- graph → bundle
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
