"""Tiny random decoder LMs, a tiny byte-fallback tokenizer, and a GGUF writer that converts a tiny
model the way llama.cpp's convert_hf_to_gguf does (gguf-py's own name map, Gemma norms stored as
1 + w, Llama q/k rows permuted, Llama 3 rope as a rope_freqs tensor). Test support only; nothing
here downloads anything."""
from __future__ import annotations

import json
import math

import numpy as np
import torch

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
TRAIN_TEXT = ["the quick brown fox jumps over the lazy dog", "a cat sat on the mat and the dog ran",
              "then they went home to eat bread with honey", "one two three four five six seven"]


# ------------------------------------------------------------------ models
def randomize(model, seed: int = 0, std: float = 0.15):
    """Weights large enough that attention is peaked (so masking mistakes show in the logits) and
    norm scales away from one (so a missing (1 + w) or a swapped norm shows too)."""
    g = torch.Generator().manual_seed(seed)
    gemma = model.config.model_type.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(0.3 * r if gemma else 1 + 0.3 * r)
            else:
                p.copy_(std * r)
    return model.eval()


def tiny_model(family: str, seed: int = 0, vocab: int = 128, **over):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  attn_implementation="eager", bos_token_id=2, eos_token_id=1, pad_token_id=0)
    if family == "gemma3":
        kw = dict(common, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                   "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}})
        cls, cfg_cls = tf.Gemma3ForCausalLM, tf.Gemma3TextConfig
    elif family == "llama":
        kw = dict(common, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
        cls, cfg_cls = tf.LlamaForCausalLM, tf.LlamaConfig
    elif family == "qwen2":
        kw = dict(common, tie_word_embeddings=False)
        cls, cfg_cls = tf.Qwen2ForCausalLM, tf.Qwen2Config
    elif family == "mistral":
        kw = dict(common, sliding_window=4, head_dim=16)
        cls, cfg_cls = tf.MistralForCausalLM, tf.MistralConfig
    else:
        raise ValueError(family)
    kw.update(over)
    torch.manual_seed(seed)
    return randomize(cls(cfg_cls(**kw)), seed)


def transformers_greedy(model, prompt, steps):
    """Prefill + `steps` cached greedy steps in transformers: (tokens, logits per step)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), cache=cache, use_cache=True).logits[0].numpy()
        out, tokens = [logits], []
        for _ in range(steps):
            tokens.append(int(out[-1][-1].argmax()))
            out.append(model(torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True).logits[0].numpy())
    return tokens, out


def check_float_bundle_greedy(model, bundle, prompt, steps) -> dict:
    """A float bundle of `model` decodes the same `steps` greedy tokens as transformers, and its logits at
    every prefill position and decode step agree to 1e-4 of the largest; returns the prefill call's stats."""
    import nadoo.runtime as nd
    from nadoo.runtime.generate import LanguageModel

    tokens, ref = transformers_greedy(model, prompt, steps)
    with nd.Session(bundle, policy=nd.Policy(bits="float")) as s:
        r = s.generate(prompt_ids=prompt, max_new_tokens=steps, stop_at_eos=False)
        assert r.token_ids == tokens
        assert r.stop_reason == "length" and r.prompt_ids == prompt
        lm = LanguageModel(s)
        logits, stats = lm.forward(prompt, 0, keep=0)
        got = [logits] + [lm.forward([t], len(prompt) + i)[0] for i, t in enumerate(tokens)]
    for ours, theirs in zip(got, ref):
        assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
    return stats


# ------------------------------------------------------------------ tokenizer
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def tiny_tokenizer_json(vocab_size: int = 400) -> str:
    """A Llama-2-style sentencepiece BPE (metaspace, byte fallback) trained on a few sentences; any
    character outside its alphabet becomes UTF-8 byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    j = json.loads(tok.to_str())
    vocab = j["model"]["vocab"]
    for t in BYTE_TOKENS:
        vocab.setdefault(t, len(vocab))
    return json.dumps(j)


def gemma_tokenizer_json(vocab_size: int = 400, *, llama2: bool = False, byte_fallback: bool = True,
                         fuse_unk: bool = True) -> str:
    """A sentencepiece BPE laid out as Gemma 3's tokenizer.json is (a Replace(" " -> "▁") normalizer, a
    Split(" ") pre-tokenizer, byte fallback, added tokens for newlines, tabs and turn markers), or with
    `llama2` as HF converts Llama 2 (Prepend("▁") + Replace normalizer, no pre-tokenizer, a Strip decoder)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=byte_fallback, fuse_unk=fuse_unk, unk_token="<unk>"))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if llama2:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence(steps)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256 - 8, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    j = json.loads(tok.to_str())
    vocab = j["model"]["vocab"]
    for t in BYTE_TOKENS if byte_fallback else ():
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer.from_str(json.dumps(j))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<start_of_turn>", "<end_of_turn>")])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("\n", "\n\n", "\t", "<b>")])
    return tok.to_str()


def sentencepiece_tokens(n: int) -> tuple[list, list, list]:
    """(tokens, scores, types) of an n-token sentencepiece vocabulary for GGUF metadata: specials,
    the 256 byte tokens, then letters and a few merges."""
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyz", "▁t", "▁th", "▁the", "he", "▁a", "an", "▁an", "▁and"]
    tokens = (SPECIALS + BYTE_TOKENS + pieces)[:n]
    tokens += [f"<unused{i}>" for i in range(n - len(tokens))]
    types = [3 if t in SPECIALS else 6 if t in BYTE_TOKENS else 1 for t in tokens]  # control / byte / normal
    scores = [0.0 if ty != 1 else -float(i) for i, (t, ty) in enumerate(zip(tokens, types))]
    return tokens, scores, types


# ------------------------------------------------------------------ GGUF writer (llama.cpp conventions)
def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(rp: dict, dim: int) -> np.ndarray:
    # convert_hf_to_gguf.LlamaModel.generate_extra_tensors
    freqs = 1.0 / (rp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
    old = rp["original_max_position_embeddings"]
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def write_gguf(path, model, quant: str | None = None, name: str = "tiny", quant_for: dict | None = None):
    """Write `model` (a tiny Gemma3/Llama/Qwen2 HF model) as a GGUF file. quant="Q8_0" stores the 2-D
    weights quantized, as a real file would; quant_for {substring of the HF name: format} overrides it per
    tensor (a mixed file, as llama.cpp's Q4_K_M is)."""
    import gguf

    cfg = model.config
    arch = {"gemma3_text": "gemma3", "llama": "llama", "qwen2": "qwen2"}[cfg.model_type]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rp = cfg.rope_parameters
    w.add_rope_freq_base((rp["full_attention"] if arch == "gemma3" else rp)["rope_theta"])
    if arch == "gemma3":
        w.add_sliding_window(cfg.sliding_window)
    tokens, scores, types = sentencepiece_tokens(cfg.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf_name, t in state.items():
        base, suffix = hf_name.rsplit(".", 1)
        gname = f"{tmap.get_name(base)}.{suffix}"
        a = t.detach().float().numpy().copy()
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            a = a + 1.0
        if arch == "llama" and ".q_proj." in hf_name:
            a = _permute(a, cfg.num_attention_heads)
        if arch == "llama" and ".k_proj." in hf_name:
            a = _permute(a, cfg.num_key_value_heads)
        fmt = next((f for key, f in (quant_for or {}).items() if key in hf_name), quant)
        if fmt and a.ndim == 2:
            qt = gguf.GGMLQuantizationType[fmt]
            w.add_tensor(gname, gguf.quants.quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(gname, a)
    if arch == "llama" and rp.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(rp, head_dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
