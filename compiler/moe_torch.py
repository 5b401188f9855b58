"""The `nadoo::moe` torch op: what a recognised mixture-of-experts block (moe_detect.py) calls in place of
its own forward. Its dense reference runs eager and fake-tensor calls; the dynamo ONNX exporter
translates it to one `nadoo.MoE` node (`translation_table`), the node the runtime's chunked MoE op
computes (runtime/chunked/moe.py)."""

from __future__ import annotations

from nadoo.runtime.errors import CompileError

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
