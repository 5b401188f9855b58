"""Load a decoder language model into a plain description: `LMSource(config, weights,
tokenizer_json, chat_template)`.

Sources:
  * a GGUF file (see lm_gguf.py),
  * a Hugging Face folder: config.json + *.safetensors (+ tokenizer.json, tokenizer_config.json,
    generation_config.json). Pickled pytorch_model*.bin files are refused unless allow_pickle=True,
    because unpickling runs code;
  * an in-memory transformers model (and optionally its tokenizer).

The description is the only thing later steps see: `config` is a JSON-able dict (the fields are
listed in lm_families.check_config), `weights` maps canonical names (lm_families) to float32
arrays. Every source ends in the same two checks (config fields, then exactly the expected tensors
with their shapes, all finite), so a mapping mistake or a damaged file is one CompileError, never a
model that silently computes something else.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nadoo.runtime.errors import CompileError, NadooError, one_line

from .lm_families import (HF_GLOBAL, check_config, config_from_hf, expected_shapes, hf_layer_name, inv_freq,
                          token_ids, unstack_experts)

__all__ = ["LMSource", "load_lm_source", "lm_source_from_model"]

@dataclass
class LMSource:
    config: dict
    weights: dict
    tokenizer_json: str | None = None
    chat_template: str | None = None
    # weight name -> the format the source file stored it in (a GGUF's "Q5_0", "Q8_0", "F32", ...): the
    # bundle keeps it so `--bits source` can run each tensor at the precision the file gave it
    source_formats: dict | None = None

    def __post_init__(self):
        check_config(self.config)
        check_weights(self.config, self.weights)

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.weights.values())


def check_weights(config: dict, weights: dict) -> None:
    want = expected_shapes(config)
    missing = [n for n in want if n not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CompileError(f"the checkpoint lacks tensor {missing[0]}{more} that this {config['family']} config needs")
    extra = sorted(set(weights) - set(want))
    if extra:
        raise CompileError(f"tensor {extra[0]} is not used by this {config['family']} config "
                           "(unknown layout: refusing rather than dropping it)")
    for name, shape in want.items():
        w = weights[name]
        if not isinstance(w, np.ndarray) or w.dtype != np.float32:
            raise CompileError(f"tensor {name} must be a float32 array, got {getattr(w, 'dtype', type(w).__name__)}")
        if w.shape != tuple(shape):
            raise CompileError(f"tensor {name} has shape {list(w.shape)}, config implies {list(shape)}")
        if not np.isfinite(w).all():
            raise CompileError(f"tensor {name} holds NaN or infinite values")


# ------------------------------------------------------------------ shared by all sources
def add_rope(config: dict, weights: dict) -> dict:
    """Rotary inverse frequencies from the rope parameters, unless the source supplied its own
    (a GGUF with per-frequency factors)."""
    for kind, params in config["rope"].items():
        if f"rope.{kind}.inv_freq" not in weights:
            weights[f"rope.{kind}.inv_freq"] = inv_freq(params, config["head_dim"])
    return weights


def probe_add_bos(tokenizer_json: str | None, bos_id: int | None) -> bool:
    """Whether the tokenizer's own post-processor starts every text with BOS (used when the source
    states no add_bos flag)."""
    if tokenizer_json is None or bos_id is None:
        return False
    from nadoo.runtime.tokenizer import _tokenizers

    try:
        tok = _tokenizers().Tokenizer.from_str(tokenizer_json)
    except Exception as e:
        raise CompileError(f"invalid tokenizer.json: {one_line(e)}") from None
    return tok.encode("a", add_special_tokens=True).ids[:1] == [bos_id]


def finish(config: dict, weights: dict, tokenizer_json, chat_template, add_bos, extra_eos=()) -> LMSource:
    """Complete the description with tokenizer facts and build (= check) it."""
    config = dict(config)
    config["eos_ids"] = sorted(set(config["eos_ids"]) | {int(i) for i in extra_eos})
    config["add_bos"] = bool(add_bos) if add_bos is not None else probe_add_bos(tokenizer_json, config["bos_id"])
    if config["ffn"] == "moe":
        weights = unstack_experts(config, weights)
    return LMSource(config, add_rope(config, weights), tokenizer_json, chat_template)


_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def hf_weight_names(config: dict, names) -> dict:
    """HF checkpoint names -> canonical names; the tied head's copy of the embedding is dropped."""
    out = {}
    for name in names:
        if name == "lm_head.weight" and config["tied_head"]:
            continue
        m = _LAYER_RE.fullmatch(name)
        canon = None
        part = hf_layer_name(config["family"], m.group(2)) if m else None
        if part is not None and int(m.group(1)) < config["layers"]:
            canon = f"layers.{int(m.group(1))}.{part}"
        elif name in HF_GLOBAL:
            canon = HF_GLOBAL[name]
        if canon is None:
            raise CompileError(f"checkpoint tensor {name!r} is not part of a {config['family']} decoder")
        out[name] = canon
    # two spellings of one tensor (e.g. Mixtral's block_sparse_moe.* beside mlp.*): neither may win silently
    seen = {}
    for name, canon in out.items():
        if canon in seen:
            raise CompileError(f"checkpoint tensors {seen[canon]!r} and {name!r} are both {canon}")
        seen[canon] = name
    return out


def _to_f32(t) -> np.ndarray:
    # bfloat16/float16 -> float32 is exact; copy so the description never aliases the model's storage
    return np.array(t.detach().to(dtype=_torch().float32, device="cpu").numpy(), dtype=np.float32, copy=True)


def _torch():
    import torch
    return torch


# ------------------------------------------------------------------ in-memory transformers model
def model_weights(model, config: dict) -> dict:
    state = model.state_dict()
    return {canon: _to_f32(state[name]) for name, canon in hf_weight_names(config, state).items()}


def lm_source_from_model(model, tokenizer=None) -> LMSource:
    """Describe a transformers causal LM (e.g. AutoModelForCausalLM) and, if given, its tokenizer."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "state_dict"):
        raise CompileError(f"expected a transformers model, got {type(model).__name__}")
    config = config_from_hf(cfg)
    weights = model_weights(model, config)
    gen = getattr(model, "generation_config", None)
    extra_eos = token_ids(getattr(gen, "eos_token_id", None))
    tok_json = chat = add_bos = None
    if tokenizer is not None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise CompileError("the tokenizer has no fast (tokenizers) backend to save as tokenizer.json")
        tok_json, chat = backend.to_str(), getattr(tokenizer, "chat_template", None)
        add_bos = getattr(tokenizer, "add_bos_token", None)
    return finish(config, weights, tok_json, chat, add_bos, extra_eos)


# ------------------------------------------------------------------ Hugging Face folder
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompileError(f"{path.name}: {one_line(e)}") from None
    if not isinstance(data, dict):
        raise CompileError(f"{path.name}: expected a JSON object")
    return data


def _safetensors_weights(files, config: dict) -> dict:
    try:
        from safetensors import safe_open
    except ImportError:
        raise CompileError("reading *.safetensors needs the safetensors package: pip install safetensors") from None
    weights, seen = {}, {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                keys = list(sf.keys())
                for name, canon in hf_weight_names(config, keys).items():
                    if canon in weights:
                        raise CompileError(f"tensor {name} appears in both {seen[canon]} and {f.name}")
                    weights[canon], seen[canon] = _to_f32(sf.get_tensor(name)), f.name
        except NadooError:
            raise
        except Exception as e:
            raise CompileError(f"{f.name}: not a readable safetensors file ({one_line(e)})") from None
    return weights


def _pickled_weights(files, config: dict) -> dict:
    torch = _torch()
    weights = {}
    for f in files:
        try:
            state = torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CompileError(f"{f.name}: {one_line(e)}") from None
        weights.update({canon: _to_f32(state[n]) for n, canon in hf_weight_names(config, state).items()})
    return weights


def _load_hf_folder(folder: Path, allow_pickle: bool) -> LMSource:
    if not (folder / "config.json").is_file():
        raise CompileError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        from transformers import AutoConfig
    except ImportError:
        raise CompileError("reading a Hugging Face config needs transformers: pip install transformers") from None
    try:
        cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise CompileError(f"config.json: {one_line(e)}") from None
    config = config_from_hf(cfg)

    st = sorted(folder.glob("*.safetensors"))
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if st:
        weights = _safetensors_weights(st, config)
    elif bins and not allow_pickle:
        raise CompileError(f"{folder.name} holds only pickled {bins[0].name}: unpickling can run code; "
                           "convert it to safetensors or pass allow_pickle=True")
    elif bins:
        weights = _pickled_weights(bins, config)
    else:
        raise CompileError(f"{folder}: no *.safetensors weights")

    extra_eos = []
    if (folder / "generation_config.json").is_file():
        extra_eos = token_ids(_read_json(folder / "generation_config.json").get("eos_token_id"))
    tok_json = chat = add_bos = None
    if (folder / "tokenizer.json").is_file():
        tok_json = (folder / "tokenizer.json").read_text(encoding="utf-8")
    if (folder / "tokenizer_config.json").is_file():
        tc = _read_json(folder / "tokenizer_config.json")
        add_bos, chat = tc.get("add_bos_token"), tc.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        chat = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not isinstance(chat, (str, type(None))):
        chat = None  # a list of named templates: not one template to carry
    return finish(config, weights, tok_json, chat, add_bos, extra_eos)


# ------------------------------------------------------------------ entry point
def load_lm_source(path, *, allow_pickle: bool = False, gguf_via: str = "gguf",
                   with_tokenizer: bool = True) -> LMSource:
    """A .gguf file or a Hugging Face folder -> LMSource. `gguf_via` picks the GGUF reader:
    "gguf" (gguf-py directly, no model instantiation) or "transformers" (its GGUF loader)."""
    p = Path(path)
    if p.is_dir():
        return _load_hf_folder(p, allow_pickle)
    if p.is_file():
        from .lm_gguf import is_gguf, load_gguf

        if is_gguf(p):
            return load_gguf(p, via=gguf_via, with_tokenizer=with_tokenizer)
        raise CompileError(f"{p.name}: not a GGUF file (and not a model folder)")
    raise CompileError(f"{path}: no such file or folder")
