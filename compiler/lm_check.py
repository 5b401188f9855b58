"""The one check of a decoder-LM description (lm_families.py says what its fields and canonical tensor
names are): `check_config`, which every description passes whatever its source, and
`expected_shapes`, the tensors (with shapes) it implies, which every loader checks its weights against."""
from __future__ import annotations

import math

from nadoo.runtime.activations import ACTIVATIONS  # the FFN activations the runtime computes
from nadoo.runtime.errors import CompileError
from nadoo.runtime.lm_kernels import NORM_STYLES

_INT_KEYS = ("vocab", "hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "max_positions")
_BOOL_KEYS = ("tied_head", "qk_norm", "qk_norm_full", "sandwich_norm", "qkv_bias", "o_bias", "mlp_bias", "add_bos")
_MOE_INT_KEYS = ("n_experts", "top_k", "intermediate")


def check_config(c: dict) -> None:
    """Every description passes here, whatever its source: one CompileError naming the first bad field."""
    def bad(msg):
        raise CompileError(f"language-model config: {msg}")

    for k in _INT_KEYS:
        v = c.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            bad(f"{k} must be a positive integer, got {v!r}")
    for k in _BOOL_KEYS:
        if not isinstance(c.get(k), bool):
            bad(f"{k} must be true or false, got {c.get(k)!r}")
    if c["heads"] % c["kv_heads"]:
        bad(f"{c['heads']} attention heads are not a multiple of {c['kv_heads']} kv heads")
    if c["head_dim"] % 2:
        bad(f"head_dim {c['head_dim']} must be even for rotary embedding")
    if c.get("ffn") not in ("dense", "moe") or (c["ffn"] == "moe") != isinstance(c.get("moe"), dict):
        bad(f"ffn {c.get('ffn')!r} must be 'dense', or 'moe' with a moe block")
    if c["ffn"] == "moe":
        _check_moe(c["moe"], c["layers"], bad)
    if c["qk_norm_full"] and not c["qk_norm"]:
        bad("qk_norm_full needs qk_norm")
    if c.get("norm_style") not in NORM_STYLES:
        bad(f"norm_style {c.get('norm_style')!r} not in {NORM_STYLES}")
    if c.get("activation") not in ACTIVATIONS:
        bad(f"activation {c.get('activation')!r} not in {sorted(ACTIVATIONS)}")
    for k in ("norm_eps", "embed_scale", "attn_scale"):
        v = c.get(k)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            bad(f"{k} must be a positive number, got {v!r}")
    for k in ("attn_softcap", "final_softcap"):
        v = c.get(k)
        if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
            bad(f"{k} must be a positive number or null, got {v!r}")
    lt = c.get("layer_types")
    if not isinstance(lt, list) or len(lt) != c["layers"] or set(lt) - {"full", "sliding"}:
        bad(f"layer_types must list 'full'/'sliding' for each of the {c['layers']} layers")
    win = c.get("sliding_window")
    if ("sliding" in lt) != (win is not None):
        bad("sliding_window must be set exactly when some layer is 'sliding'")
    if win is not None and (not isinstance(win, int) or win <= 0):
        bad(f"sliding_window must be a positive integer, got {win!r}")
    rope = c.get("rope")
    if not isinstance(rope, dict) or set(rope) != set(lt):
        bad(f"rope must hold parameters for exactly the layer kinds used ({sorted(set(lt))})")
    for kind, rp in rope.items():
        if not isinstance(rp, dict) or not isinstance(rp.get("theta"), (int, float)) or not rp["theta"] > 0:
            bad(f"rope.{kind} needs a positive theta")
    for k in ("bos_id", "pad_id"):
        v = c.get(k)
        if v is not None and not (isinstance(v, int) and 0 <= v < c["vocab"]):
            bad(f"{k} {v!r} outside the vocabulary of {c['vocab']}")
    eos = c.get("eos_ids")
    if not isinstance(eos, list) or any(not isinstance(i, int) or not 0 <= i < c["vocab"] for i in eos):
        bad(f"eos_ids must be token ids inside the vocabulary, got {eos!r}")
    if c["add_bos"] and c.get("bos_id") is None:
        bad("add_bos is set but bos_id is missing")


def _check_moe(m: dict, layers: int, bad) -> None:
    for k in _MOE_INT_KEYS:
        v = m.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            bad(f"moe.{k} must be a positive integer, got {v!r}")
    if m["top_k"] > m["n_experts"]:
        bad(f"moe.top_k {m['top_k']} exceeds the {m['n_experts']} experts")
    if m.get("softmax_order") not in ("before", "after") or not isinstance(m.get("normalize"), bool):
        bad("moe.softmax_order must be 'before' or 'after' and moe.normalize true or false")
    sh = m.get("shared_intermediate")
    if sh is not None and (not isinstance(sh, int) or isinstance(sh, bool) or sh <= 0):
        bad(f"moe.shared_intermediate must be a positive integer or null, got {sh!r}")
    lay = m.get("layers")
    if not isinstance(lay, list) or len(lay) != layers or any(not isinstance(x, bool) for x in lay):
        bad(f"moe.layers must say true/false for each of the {layers} layers")


def expected_shapes(c: dict) -> dict:
    """Every tensor a (checked) description needs, with its shape."""
    H, D, hd = c["hidden"], c["head_dim"], c["head_dim"]
    q_out, kv_out, inter = c["heads"] * D, c["kv_heads"] * D, c["intermediate"]
    shapes = {"embed": (c["vocab"], H), "final_norm": (H,)}
    if not c["tied_head"]:
        shapes["head"] = (c["vocab"], H)
    for kind in c["rope"]:
        shapes[f"rope.{kind}.inv_freq"] = (hd // 2,)
    for i in range(c["layers"]):
        p = f"layers.{i}."
        layer = {"attn_norm": (H,), "mlp_norm": (H,), "attn.q": (q_out, H), "attn.k": (kv_out, H),
                 "attn.v": (kv_out, H), "attn.o": (H, q_out)}
        routed = c["ffn"] == "moe" and c["moe"]["layers"][i]
        layer.update(_moe_shapes(c["moe"], H) if routed else
                     {"mlp.gate": (inter, H), "mlp.up": (inter, H), "mlp.down": (H, inter)})
        if c["qkv_bias"]:
            layer.update({"attn.q_bias": (q_out,), "attn.k_bias": (kv_out,), "attn.v_bias": (kv_out,)})
        if c["o_bias"]:
            layer["attn.o_bias"] = (H,)
        if c["mlp_bias"] and not routed:
            layer.update({"mlp.gate_bias": (inter,), "mlp.up_bias": (inter,), "mlp.down_bias": (H,)})
        if c["qk_norm"]:
            full = c["qk_norm_full"]
            layer.update({"attn.q_norm": (q_out if full else hd,), "attn.k_norm": (kv_out if full else hd,)})
        if c["sandwich_norm"]:
            layer.update({"post_attn_norm": (H,), "post_mlp_norm": (H,)})
        shapes.update({p + k: v for k, v in layer.items()})
    return shapes


def _moe_shapes(m: dict, H: int) -> dict:
    F, out = m["intermediate"], {"moe.router": (m["n_experts"], H)}
    for e in range(m["n_experts"]):
        out.update({f"moe.experts.{e}.gate": (F, H), f"moe.experts.{e}.up": (F, H), f"moe.experts.{e}.down": (H, F)})
    S = m.get("shared_intermediate")
    if S:
        out.update({"moe.shared.gate": (S, H), "moe.shared.up": (S, H), "moe.shared.down": (H, S),
                    "moe.shared_gate": (1, H)})
    return out
