"""What nadoo knows about each decoder-LM family: how a transformers config becomes the plain
description (`config_from_hf`; `describe` holds the rules that follow from the family alone), how
Hugging Face tensor names map to canonical names (GGUF names: lm_gguf.py), and which tensors (with
shapes) a description implies (`expected_shapes`, the check every loader passes; with `check_config`
in lm_check.py).

Canonical names (all float32; linear weights keep the checkpoint's [out, in] layout):
  embed [vocab, hidden], final_norm [hidden], head [vocab, hidden] (absent when tied to embed),
  rope.{full,sliding}.inv_freq [head_dim/2] (rotary inverse frequencies, scaling already applied),
  layers.{i}.attn_norm, .attn.{q,k,v,o}, .attn.{q,k,v,o}_bias, .attn.{q,k}_norm [head_dim],
  .post_attn_norm, .mlp_norm (before the FFN), .post_mlp_norm, .mlp.{gate,up,down}, .mlp.{gate,up,down}_bias.

A mixture-of-experts family (Mixtral, Qwen2-MoE, OLMoE) has `ffn: "moe"` and a `moe` block in the
description (experts, top-k, routing, which layers route); its MoE layers hold, instead of
`mlp.*`, `layers.{i}.moe.router` [n_experts, hidden], `layers.{i}.moe.experts.{e}.{gate,up,down}`
(gate/up [moe_intermediate, hidden], down [hidden, moe_intermediate]) and, for Qwen2-MoE's shared
expert, `layers.{i}.moe.shared.{gate,up,down}` and its sigmoid gate `layers.{i}.moe.shared_gate`
[1, hidden]. OLMoE normalises q and k over the whole projection (`qk_norm_full`: norms of
[heads·head_dim] and [kv_heads·head_dim] applied before the split into heads).
"""
from __future__ import annotations

import math
import re

import numpy as np

from nadoo.runtime.errors import CompileError
from nadoo.runtime.lm_kernels import rope_inv_freq

from .lm_check import check_config, expected_shapes  # noqa: F401  (the check every description passes)

__all__ = ["HF_GLOBAL", "MOE_FAMILIES", "check_config", "config_from_hf", "describe", "expected_shapes", "hf_layer_name",
           "hf_layer_names", "inv_freq", "rope_params", "token_ids", "unstack_experts"]

# ------------------------------------------------------------------ checkpoint names
HF_GLOBAL = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm", "lm_head.weight": "head"}


def _linear_names(hf_prefix: str, canon_prefix: str, names: dict) -> dict:
    return {f"{hf_prefix}{h}_proj.{kind}": f"{canon_prefix}{c}{'' if kind == 'weight' else '_bias'}"
            for h, c in names.items() for kind in ("weight", "bias")}


_HF_PROJ = {**_linear_names("self_attn.", "attn.", {"q": "q", "k": "k", "v": "v", "o": "o"}),
            **_linear_names("mlp.", "mlp.", {"gate": "gate", "up": "up", "down": "down"})}
_HF_LLAMA_LAYER = {**_HF_PROJ, "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "mlp_norm"}
# Gemma's "post_attention_layernorm" normalises the attention output (a sandwich norm); its FFN
# input norm is "pre_feedforward_layernorm". Same HF name, different place in the block.
_HF_GEMMA_LAYER = {**_HF_PROJ, "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "post_attn_norm",
                   "pre_feedforward_layernorm.weight": "mlp_norm", "post_feedforward_layernorm.weight": "post_mlp_norm",
                   "self_attn.q_norm.weight": "attn.q_norm", "self_attn.k_norm.weight": "attn.k_norm"}

# MoE blocks: the router and a shared expert have fixed names; experts are numbered (EXPERT_RE) or,
# in transformers' own state_dict, stacked over experts (unstack_experts splits them).
_HF_ROUTER = {"mlp.gate.weight": "moe.router"}
_HF_SHARED = {**_linear_names("mlp.shared_expert.", "moe.shared.", {"gate": "gate", "up": "up", "down": "down"}),
              "mlp.shared_expert_gate.weight": "moe.shared_gate"}
_HF_STACKED = {"mlp.experts.gate_up_proj": "moe.experts.gate_up", "mlp.experts.down_proj": "moe.experts.down"}
_HF_MOE = {**_HF_LLAMA_LAYER, **_HF_ROUTER, **_HF_STACKED}
# Hub checkpoints of Mixtral name the block `block_sparse_moe` and its expert matrices w1/w3/w2.
_HF_MIXTRAL_LAYER = {**_HF_MOE, "block_sparse_moe.gate.weight": "moe.router"}
_HF_OLMOE_LAYER = {**_HF_MOE, "self_attn.q_norm.weight": "attn.q_norm", "self_attn.k_norm.weight": "attn.k_norm"}
EXPERT_RE = re.compile(r"(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight")
_EXPERT_MATS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}

# transformers model_type -> (family, per-layer HF names)
_HF_FAMILIES = {
    "gemma3_text": ("gemma3", _HF_GEMMA_LAYER),
    "llama": ("llama", _HF_LLAMA_LAYER),
    "qwen2": ("qwen2", _HF_LLAMA_LAYER),
    "mistral": ("mistral", _HF_LLAMA_LAYER),
    "mixtral": ("mixtral", _HF_MIXTRAL_LAYER),
    "qwen2_moe": ("qwen2_moe", {**_HF_MOE, **_HF_SHARED}),
    "olmoe": ("olmoe", _HF_OLMOE_LAYER),
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "olmoe")
_MOE_LATER = {"qwen3_moe"}

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu": "gelu", "relu": "relu"}


def family_of(model_type: str) -> str:
    if model_type in _HF_FAMILIES:
        return _HF_FAMILIES[model_type][0]
    if model_type in _MOE_LATER:
        raise CompileError(f"mixture-of-experts model {model_type!r} is not supported yet (dense decoders only)")
    if model_type == "gemma3":
        raise CompileError("multimodal Gemma 3 checkpoint: load the text-only model (Gemma3ForCausalLM, model_type gemma3_text)")
    raise CompileError(f"unsupported language-model type {model_type!r} "
                       f"(supported: {', '.join(sorted(_HF_FAMILIES))})")


def hf_layer_names(family: str) -> dict:
    return next(names for fam, names in _HF_FAMILIES.values() if fam == family)


def hf_layer_name(family: str, suffix: str) -> str | None:
    """The canonical per-layer name of an HF name's part after `model.layers.{i}.` (None: not one
    of this family's)."""
    names = hf_layer_names(family)
    if suffix in names:
        return names[suffix]
    m = EXPERT_RE.fullmatch(suffix) if family in MOE_FAMILIES else None
    return f"moe.experts.{int(m.group(1))}.{_EXPERT_MATS[m.group(2)]}" if m else None


def unstack_experts(config: dict, weights: dict) -> dict:
    """transformers' stacked expert tensors (gate_up_proj [E, 2F, H]: gate rows then up rows;
    down_proj [E, H, F]) -> one canonical tensor per expert and matrix."""
    out = dict(weights)

    def put(name, a):
        if name in out:
            raise CompileError(f"the checkpoint holds {name} both stacked and as its own tensor")
        out[name] = np.ascontiguousarray(a)

    for i in range(config["layers"]):
        p = f"layers.{i}.moe.experts."
        gate_up, down = out.pop(p + "gate_up", None), out.pop(p + "down", None)
        if gate_up is not None:
            if gate_up.ndim != 3 or gate_up.shape[1] % 2:
                raise CompileError(f"stacked expert tensor of layer {i} has shape {list(gate_up.shape)}, "
                                   "expected [experts, 2*intermediate, hidden]")
            f = gate_up.shape[1] // 2
            for e in range(gate_up.shape[0]):
                put(f"{p}{e}.gate", gate_up[e, :f])
                put(f"{p}{e}.up", gate_up[e, f:])
        if down is not None:
            if down.ndim != 3:
                raise CompileError(f"stacked expert tensor of layer {i} has shape {list(down.shape)}, "
                                   "expected [experts, hidden, intermediate]")
            for e in range(down.shape[0]):
                put(f"{p}{e}.down", down[e])
    return out


# ------------------------------------------------------------------ rotary frequencies
def rope_params(rp: dict, where: str) -> dict:
    """A rope parameter dict (HF keys) -> {"type", "theta", scaling params}; refuses what the
    rotary tables cannot express (dynamic/yarn/longrope rescale with the sequence or the output)."""
    typ = rp.get("rope_type", rp.get("type", "default")) or "default"
    if rp.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        raise CompileError(f"{where}: partial rotary embedding is not supported yet")
    if not isinstance(rp.get("rope_theta"), (int, float)):
        raise CompileError(f"{where}: rope_theta missing")
    out = {"type": typ, "theta": float(rp["rope_theta"])}
    if typ == "default":
        return out
    if typ == "linear":
        return {**out, "factor": float(rp["factor"])}
    if typ == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return {**out, **{k: float(rp[k]) for k in keys}}
    raise CompileError(f"{where}: rope scaling {typ!r} is not supported yet (default, linear, llama3)")


def inv_freq(params: dict, head_dim: int) -> np.ndarray:
    """Inverse frequencies for one rope parameter set, in float32 with the reference's operation
    order so that the angles match its rounding."""
    base = rope_inv_freq(head_dim, params["theta"])
    typ = params["type"]
    if typ == "default":
        return base
    if typ == "linear":
        return base / np.float32(params["factor"])
    if typ == "llama3":
        factor, lo, hi = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old = params["original_max_position_embeddings"]
        wavelen = np.float32(2 * math.pi) / base
        scaled = np.where(wavelen > old / lo, base / np.float32(factor), base)
        smooth = (np.float32(old) / wavelen - np.float32(lo)) / np.float32(hi - lo)
        smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise CompileError(f"rope type {typ!r} has no inverse frequencies here")


# ------------------------------------------------------------------ config from transformers
def token_ids(x) -> list[int]:
    """A config's token id field (None, one id or a list) as a list."""
    if x is None:
        return []
    return [int(i) for i in (x if isinstance(x, (list, tuple)) else [x])]


def _opt_float(x):
    return None if x is None else float(x)


def config_from_hf(cfg) -> dict:
    """A transformers PretrainedConfig -> the plain description. Values come from the config object
    after transformers has applied its own defaults (layer_types, rope parameters), so the description
    says what the transformers model computes, not what the json happens to spell out."""
    family = family_of(cfg.model_type)
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    layers = int(cfg.num_hidden_layers)
    if getattr(cfg, "use_bidirectional_attention", False):
        raise CompileError("bidirectional (non-causal) attention is not a decoder: not supported")

    hf_types = list(getattr(cfg, "layer_types", None) or [])
    if not hf_types:
        hf_types = ["sliding_attention" if getattr(cfg, "sliding_window", None) else "full_attention"] * layers
    kinds = {"sliding_attention": "sliding", "full_attention": "full"}
    bad = sorted(set(hf_types) - set(kinds))
    if bad:
        raise CompileError(f"unsupported attention layer type {bad[0]!r}")
    layer_types = [kinds[t] for t in hf_types]

    rp = dict(getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", 10000.0)})
    rope = {}
    for hf_kind, kind in kinds.items():
        if kind in layer_types:
            sub = rp.get(hf_kind) if isinstance(rp.get(hf_kind), dict) else rp
            rope[kind] = rope_params(sub, f"{kind} layers")

    act_name = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
    attn_bias = bool(getattr(cfg, "attention_bias", False))
    qkv_bias = True if family == "qwen2" else bool(getattr(cfg, "qkv_bias", attn_bias))
    return describe(
        family, vocab=int(cfg.vocab_size), hidden=int(cfg.hidden_size), layers=layers, heads=heads,
        kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads), head_dim=head_dim,
        intermediate=int(cfg.intermediate_size), max_positions=int(cfg.max_position_embeddings),
        norm_eps=float(cfg.rms_norm_eps), activation=act_name,
        tied_head=bool(getattr(cfg, "tie_word_embeddings", False)),
        query_pre_attn_scalar=getattr(cfg, "query_pre_attn_scalar", None),
        final_softcap=getattr(cfg, "final_logit_softcapping", None),
        qkv_bias=qkv_bias, o_bias=attn_bias and family not in ("qwen2", "qwen2_moe"),
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        layer_types=layer_types, sliding_window=getattr(cfg, "sliding_window", None), rope=rope,
        bos_id=getattr(cfg, "bos_token_id", None), eos_ids=token_ids(getattr(cfg, "eos_token_id", None)),
        pad_id=getattr(cfg, "pad_token_id", None), moe=_moe_from_hf(family, cfg, layers))


def _moe_from_hf(family: str, cfg, layers: int) -> dict | None:
    """The `moe` block of a description: what transformers' router of the family computes
    (softmax over all experts, then top-k; Mixtral always renormalises the k weights, Qwen2-MoE and
    OLMoE when norm_topk_prob) and which layers route."""
    if family not in MOE_FAMILIES:
        return None
    if getattr(cfg, "clip_qkv", None) is not None:
        raise CompileError("clip_qkv (clamped q/k/v projections) is not supported yet")
    mixtral = family == "mixtral"
    n = int(cfg.num_local_experts if mixtral else cfg.num_experts)
    moe_layers = [True] * layers
    shared = None
    if family == "qwen2_moe":
        step, dense = int(cfg.decoder_sparse_step or 1), set(cfg.mlp_only_layers or [])
        moe_layers = [i not in dense and n > 0 and (i + 1) % step == 0 for i in range(layers)]
        shared = int(cfg.shared_expert_intermediate_size or 0) or None
        if not any(moe_layers):  # no layer routes (num_experts 0, or every layer in mlp_only_layers)
            return None
    inter = cfg.intermediate_size if family != "qwen2_moe" else cfg.moe_intermediate_size
    return {"n_experts": n, "top_k": int(cfg.num_experts_per_tok), "softmax_order": "before",
            "normalize": True if mixtral else bool(cfg.norm_topk_prob), "intermediate": int(inter),
            "shared_intermediate": shared, "layers": moe_layers}


def describe(family: str, *, hidden: int, head_dim: int, activation: str, layer_types: list,
             sliding_window, query_pre_attn_scalar=None, attn_softcap=None, final_softcap=None, moe=None,
             **fields) -> dict:
    """The description from source-independent facts; what follows from the family alone (Gemma's
    (1+w) norms, sqrt(hidden) embedding scale, q/k and sandwich norms, query_pre_attn_scalar) is
    decided here, once, for every source."""
    if activation not in _ACTIVATIONS:
        raise CompileError(f"unsupported FFN activation {activation!r}")
    gemma = family == "gemma3"
    if gemma and not query_pre_attn_scalar:
        raise CompileError("Gemma config lacks query_pre_attn_scalar")
    return dict(
        family=family, hidden=int(hidden), head_dim=int(head_dim), **fields,
        norm_style="gemma" if gemma else "plain", activation=_ACTIVATIONS[activation],
        ffn="dense" if moe is None else "moe", moe=moe,
        # Gemma multiplies the embedding by sqrt(hidden) held as a float32 tensor.
        embed_scale=float(np.float32(hidden ** 0.5)) if gemma else 1.0,
        attn_scale=float((query_pre_attn_scalar if gemma else head_dim) ** -0.5),
        # Gemma 3 configs carry attn_logit_softcapping, but neither transformers' Gemma 3 attention nor
        # llama.cpp's applies it (q/k norms replaced it); only a family that does passes attn_softcap.
        attn_softcap=_opt_float(attn_softcap),
        final_softcap=_opt_float(final_softcap) if gemma else None,
        qk_norm=gemma or family == "olmoe", qk_norm_full=family == "olmoe", sandwich_norm=gemma,
        layer_types=list(layer_types),
        sliding_window=int(sliding_window) if "sliding" in layer_types and sliding_window is not None else None,
        add_bos=False,
    )
