"""Recognition of mixture-of-experts blocks in torch models (see moe.py for what is recognised and
how a reading is checked against the block's own forward), and their replacement by a module calling
the `nadoo::moe` op (moe_torch.py)."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

from nadoo.runtime.errors import CompileError

from .moe_torch import ACTIVATIONS, _act, _torch, moe_reference, register_op, route_torch

log = logging.getLogger(__name__)


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
