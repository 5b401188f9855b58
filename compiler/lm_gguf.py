"""GGUF files -> LMSource.

Two readers, because they trade speed against "what transformers computes":
  * via="gguf" reads the metadata and dequantizes the tensors with gguf-py directly (no torch model
    is built). Facts GGUF leaves out are filled in as llama.cpp fills them in (Gemma 3: local rope
    base 10000, every 6th layer global, query scale 1/sqrt(head_dim) except the 62-layer 27B), and
    per-frequency rope factors (Llama 3's rope_freqs tensor) are honoured.
  * via="transformers" loads the model with transformers' GGUF loader and describes that model.
Both undo what llama.cpp's converter did to the tensors: Gemma norms were stored as (1 + w), and
Llama-architecture q/k rows were permuted for llama.cpp's interleaved rotary layout.
The tokenizer comes from transformers' GGUF tokenizer builder in both cases.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from nadoo.runtime.errors import CompileError, NadooError, one_line
from nadoo.runtime.lm_kernels import rope_inv_freq

from .lm_families import config_from_hf, describe, rope_params
from .lm_source import finish, model_weights

__all__ = ["is_gguf", "load_gguf"]

_MAGIC = b"GGUF"

_GGUF_GLOBAL = {"token_embd.weight": "embed", "output_norm.weight": "final_norm", "output.weight": "head"}
_GGUF_PROJ = {f"{g}.{kind}": c + ("" if kind == "weight" else "_bias")
              for g, c in (("attn_q", "attn.q"), ("attn_k", "attn.k"), ("attn_v", "attn.v"), ("attn_output", "attn.o"),
                           ("ffn_gate", "mlp.gate"), ("ffn_up", "mlp.up"), ("ffn_down", "mlp.down"))
              for kind in ("weight", "bias")}
_GGUF_LLAMA = {**_GGUF_PROJ, "attn_norm.weight": "attn_norm", "ffn_norm.weight": "mlp_norm"}
_GGUF_GEMMA = {**_GGUF_LLAMA, "post_attention_norm.weight": "post_attn_norm", "post_ffw_norm.weight": "post_mlp_norm",
               "attn_q_norm.weight": "attn.q_norm", "attn_k_norm.weight": "attn.k_norm"}
# GGUF architecture -> (family, per-layer names)
_ARCHES = {"gemma3": ("gemma3", _GGUF_GEMMA), "llama": ("llama", _GGUF_LLAMA), "qwen2": ("qwen2", _GGUF_LLAMA)}
_MOE_ARCHES = {"qwen2moe", "qwen3moe", "olmoe", "mixtral"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
# End-of-turn pieces llama.cpp also stops on, besides the declared EOS.
_END_OF_TURN = {"<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>"}


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == _MAGIC
    except OSError:
        return False


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise CompileError("reading GGUF needs the gguf package: pip install gguf") from None
    try:
        return GGUFReader(str(path))
    except Exception as e:
        raise CompileError(f"{path.name}: not a readable GGUF file ({one_line(e)})") from None


_MISSING = object()


def _meta(reader, key: str, default=_MISSING):
    f = reader.fields.get(key)
    if f is None:
        if default is _MISSING:
            raise CompileError(f"GGUF metadata lacks {key}")
        return default
    return f.contents()


# ------------------------------------------------------------------ tokenizer facts
def _token_ids_named(reader, texts: set) -> list[int]:
    f = reader.fields.get("tokenizer.ggml.tokens")
    if f is None:
        return []
    wanted = {t.encode() for t in texts}
    return [i for i, part in enumerate(f.data) if bytes(f.parts[part]) in wanted]


def _tokenizer_facts(path: Path, reader, with_tokenizer: bool):
    """(tokenizer_json, chat_template, add_bos, extra eos ids) from the GGUF's tokenizer metadata."""
    extra_eos = [_meta(reader, f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
    extra_eos = [i for i in extra_eos if i is not None] + _token_ids_named(reader, _END_OF_TURN)
    add_bos = _meta(reader, "tokenizer.ggml.add_bos_token", None)
    chat = _meta(reader, "tokenizer.chat_template", None)
    tok_json = None
    if with_tokenizer and "tokenizer.ggml.model" in reader.fields:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise CompileError("building the tokenizer from GGUF metadata needs transformers: pip install transformers "
                               "(or load with with_tokenizer=False)") from None
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as e:
            raise CompileError(f"{path.name}: cannot build its tokenizer ({one_line(e)})") from None
        tok_json = tok.backend_tokenizer.to_str()
    return tok_json, chat, add_bos, extra_eos


# ------------------------------------------------------------------ config from metadata
def _config(reader, path: Path, shapes: dict) -> tuple[str, dict]:
    arch = _meta(reader, "general.architecture")
    if arch in _MOE_ARCHES or _meta(reader, f"{arch}.expert_count", 0):
        raise CompileError(f"mixture-of-experts GGUF ({arch}) is not supported yet: compile the model's "
                           "Hugging Face folder (config.json + safetensors)")
    if arch not in _ARCHES:
        raise CompileError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(sorted(_ARCHES))})")
    family = _ARCHES[arch][0]
    name = str(_meta(reader, "general.name", "")).lower()
    if family == "llama" and "mistral" in name:
        family = "mistral"  # llama.cpp stores Mistral as llama; the label is all that differs

    def m(key, default=_MISSING):
        return _meta(reader, f"{arch}.{key}", default)

    hidden, layers, heads = int(m("embedding_length")), int(m("block_count")), int(m("attention.head_count"))
    inter = m("feed_forward_length")
    if isinstance(inter, list):
        raise CompileError("per-layer FFN widths are not supported")
    head_dim = int(m("attention.key_length", hidden // heads))
    if int(m("attention.value_length", head_dim)) != head_dim:
        raise CompileError("key and value head sizes differ: not supported")
    if "token_embd.weight" not in shapes:
        raise CompileError(f"{path.name}: no token_embd.weight tensor")
    window = m("attention.sliding_window", None)
    theta = float(m("rope.freq_base", 10000.0))
    scaling = m("rope.scaling.type", "none")
    full = {"rope_theta": theta}
    if scaling == "linear":
        full.update(rope_type="linear", factor=float(m("rope.scaling.factor")))
    elif scaling not in ("none", None):
        raise CompileError(f"rope scaling {scaling!r} in GGUF is not supported yet")
    gemma = family == "gemma3"
    if gemma:
        pattern = m("attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):
            layer_types = ["sliding" if p else "full" for p in pattern]
        else:
            layer_types = ["sliding" if i % int(pattern) < int(pattern) - 1 else "full" for i in range(layers)]
        rope = {"full": rope_params(full, "full layers"),
                "sliding": rope_params({"rope_theta": float(m("rope.freq_base_swa", 10000.0))}, "sliding layers")}
        rope = {k: v for k, v in rope.items() if k in layer_types}
        qpas = hidden / heads if layers == 62 else head_dim
    else:
        layer_types = ["sliding" if window else "full"] * layers
        rope = {layer_types[0]: rope_params(full, "rotary embedding")}
        qpas = None
    config = describe(
        family, vocab=int(shapes["token_embd.weight"][0]), hidden=hidden, layers=layers, heads=heads,
        kv_heads=int(m("attention.head_count_kv", heads)), head_dim=head_dim, intermediate=int(inter),
        max_positions=int(m("context_length")), norm_eps=float(m("attention.layer_norm_rms_epsilon")),
        activation="gelu_pytorch_tanh" if gemma else "silu", tied_head="output.weight" not in shapes,
        query_pre_attn_scalar=qpas,
        final_softcap=m("final_logit_softcapping", None),
        qkv_bias="blk.0.attn_q.bias" in shapes, o_bias="blk.0.attn_output.bias" in shapes,
        mlp_bias="blk.0.ffn_up.bias" in shapes, layer_types=layer_types, sliding_window=window, rope=rope,
        bos_id=_meta(reader, "tokenizer.ggml.bos_token_id", None),
        eos_ids=[], pad_id=_meta(reader, "tokenizer.ggml.padding_token_id", None))
    return arch, config


# ------------------------------------------------------------------ tensors
def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: its interleaved rotary pairs (rows 2i, 2i+1 of a head)
    go back to the half-split pairs (rows i, i + d/2) that the Hugging Face layout and our rope use."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(reader, arch: str, config: dict) -> dict:
    from gguf import dequantize

    per_layer = _ARCHES[arch][1]
    weights, formats = {}, {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        mlayer = _LAYER_RE.fullmatch(t.name)
        if t.name == "rope_freqs.weight":
            canon = "rope_freqs"
        elif mlayer and mlayer.group(2) in per_layer:
            canon = f"layers.{int(mlayer.group(1))}.{per_layer[mlayer.group(2)]}"
        elif t.name in _GGUF_GLOBAL:
            canon = _GGUF_GLOBAL[t.name]
        else:
            raise CompileError(f"GGUF tensor {t.name!r} is not part of a {config['family']} decoder")
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        except NadooError:
            raise
        except Exception as e:
            raise CompileError(f"GGUF tensor {t.name}: cannot dequantize {t.tensor_type.name} ({one_line(e)})") from None
        if config["norm_style"] == "gemma" and t.name.endswith("norm.weight"):
            w = w - np.float32(1.0)  # llama.cpp's converter stored Gemma's (1 + w)
        elif arch == "llama" and canon.endswith(("attn.q", "attn.k", "attn.q_bias", "attn.k_bias")):
            w = _unpermute(w, config["heads"] if ".attn.q" in canon else config["kv_heads"])
        # F32 tensors come back as views of the file's memory map: copy so the description owns its data
        weights[canon] = np.array(w, dtype=np.float32, order="C", copy=not w.flags.owndata)
        formats[canon] = t.tensor_type.name
    factors = weights.pop("rope_freqs", None)
    if factors is not None:
        # llama.cpp divides each rotary frequency by its factor (how Llama 3 GGUFs carry rope scaling)
        kind = next(iter(config["rope"]))
        if factors.shape != (config["head_dim"] // 2,):
            raise CompileError(f"rope_freqs has shape {list(factors.shape)}, expected [{config['head_dim'] // 2}]")
        base = rope_inv_freq(config["head_dim"], config["rope"][kind]["theta"])
        weights[f"rope.{kind}.inv_freq"] = (base / factors).astype(np.float32)
        config["rope"][kind] = {**config["rope"][kind], "type": "freq_factors"}
    return weights, formats


# ------------------------------------------------------------------ entry point
def load_gguf(path, via: str = "gguf", with_tokenizer: bool = True):
    path = Path(path)
    reader = _reader(path)
    tok_json, chat, add_bos, extra_eos = _tokenizer_facts(path, reader, with_tokenizer)
    if via == "gguf":
        shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
        arch, config = _config(reader, path, shapes)
        weights, formats = _tensors(reader, arch, config)
    elif via == "transformers":
        (config, weights), formats = _via_transformers(path), {}
    else:
        raise CompileError(f"unknown GGUF reader {via!r} (gguf or transformers)")
    src = finish(config, weights, tok_json, chat, add_bos, extra_eos)
    src.source_formats = {k: v for k, v in formats.items() if k in src.weights}
    return src


def _via_transformers(path: Path):
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise CompileError("via='transformers' needs torch and transformers installed") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as e:
        raise CompileError(f"{path.name}: transformers cannot load it ({one_line(e)})") from None
    config = config_from_hf(model.config)
    return config, model_weights(model, config)
