"""compiler/lm_source.py (+ lm_families, lm_gguf): tiny random Gemma 3 / Llama / Qwen2 / Mistral
models described by LMSource and run by the NumPy reference decoder agree with transformers on
prefill logits and 8 cached greedy decode steps; the folder and GGUF loaders give the same
description as the in-memory model; bad sources are one CompileError."""
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from lm_fixtures import tiny_model, tiny_tokenizer_json, transformers_greedy, write_gguf  # noqa: E402
from lm_reference import ReferenceDecoder  # noqa: E402

from nadoo.compiler.lm_source import LMSource, load_lm_source, lm_source_from_model  # noqa: E402
from nadoo.runtime.errors import CompileError  # noqa: E402

REL_TOL = 1e-4


def compare(model, src, prompt_len=10, steps=8, chunks=None, seed=0):
    """Max relative logit error of the reference decoder over prefill + decode, feeding transformers'
    greedy tokens; also checks our greedy choice agrees at every step."""
    prompt = np.random.default_rng(seed).integers(3, src.config["vocab"], prompt_len).tolist()
    tokens, ref = transformers_greedy(model, prompt, steps)
    dec = ReferenceDecoder(src)
    at, parts = 0, []
    for c in chunks or [prompt_len]:
        parts.append(dec.forward(prompt[at:at + c]))
        at += c
    ours = [np.concatenate(parts)] + [dec.forward([t]) for t in tokens]
    worst = 0.0
    for r, o in zip(ref, ours):
        worst = max(worst, float(np.abs(r - o).max() / np.abs(r).max()))
    assert [int(o[-1].argmax()) for o in ours[:-1]] == tokens
    return worst


@pytest.mark.parametrize("family,over", [
    ("gemma3", {}),
    ("gemma3", {"final_logit_softcapping": 3.0}),
    ("llama", {}),
    ("qwen2", {}),
    ("mistral", {}),
])
def test_reference_decoder_matches_transformers(family, over):
    model = tiny_model(family, **over)
    src = lm_source_from_model(model)
    assert src.config["family"] == family
    assert compare(model, src) <= REL_TOL


def test_sliding_window_shorter_than_sequence_matters():
    """Mistral with window 4 over 18 positions; the same weights with a wider window disagree, so
    the comparison above really checks the window."""
    model = tiny_model("mistral")
    src = lm_source_from_model(model)
    assert src.config["layer_types"] == ["sliding"] * 4 and src.config["sliding_window"] == 4
    assert compare(model, src, chunks=[3, 5, 2]) <= REL_TOL  # chunked prefill through the ring
    wide = replace(src, config={**src.config, "sliding_window": 8})
    with pytest.raises(AssertionError):
        assert compare(model, wide) <= REL_TOL


def test_gemma3_description():
    # transformers' Gemma 3 ignores attn_logit_softcapping; the description says what it computes
    model = tiny_model("gemma3", attn_logit_softcapping=5.0)
    c = lm_source_from_model(model).config
    assert c["layer_types"] == ["sliding", "full", "sliding", "full"] and c["sliding_window"] == 4
    assert c["rope"] == {"sliding": {"type": "default", "theta": 10000.0},
                         "full": {"type": "linear", "theta": 1e6, "factor": 2.0}}
    assert c["norm_style"] == "gemma" and c["activation"] == "gelu_tanh" and c["qk_norm"] and c["sandwich_norm"]
    assert c["embed_scale"] == 8.0 and c["attn_scale"] == pytest.approx(24 ** -0.5) and c["attn_softcap"] is None
    assert c["tied_head"] and (c["bos_id"], c["eos_ids"], c["pad_id"]) == (2, [1], 0)
    json.dumps(c)  # the description is plain data


def test_rope_frequencies_equal_transformers_buffers():
    for family in ("gemma3", "llama"):
        model = tiny_model(family)
        src = lm_source_from_model(model)
        rot = model.model.rotary_emb
        for kind, hf in (("full", "full_attention"), ("sliding", "sliding_attention")):
            if kind in src.config["rope"]:
                buf = getattr(rot, f"{hf}_inv_freq", None) if family == "gemma3" else rot.inv_freq
                np.testing.assert_allclose(src.weights[f"rope.{kind}.inv_freq"], buf.numpy(), rtol=1e-6)


def test_qwen2_biases_and_untied_head():
    src = lm_source_from_model(tiny_model("qwen2"))
    assert src.config["qkv_bias"] and not src.config["o_bias"] and not src.config["tied_head"]
    assert {"layers.0.attn.q_bias", "layers.0.attn.k_bias", "layers.0.attn.v_bias", "head"} <= set(src.weights)
    assert "layers.0.attn.o_bias" not in src.weights


# ------------------------------------------------------------------ Hugging Face folders
def test_folder_matches_in_memory_model(tmp_path):
    model = tiny_model("gemma3")
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(tiny_tokenizer_json())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "chat_template": "{{ x }}"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 106 % 128]}))
    a, b = load_lm_source(tmp_path), lm_source_from_model(model)
    assert a.config == {**b.config, "add_bos": True, "eos_ids": [1, 106]}
    assert a.weights.keys() == b.weights.keys()
    for k in a.weights:
        np.testing.assert_array_equal(a.weights[k], b.weights[k])
    assert a.tokenizer_json and a.chat_template == "{{ x }}"


def test_add_bos_comes_from_the_tokenizer_when_no_flag_says(tmp_path):
    from tokenizers import Tokenizer, processors

    model = tiny_model("llama", num_hidden_layers=1)
    plain = tiny_tokenizer_json()
    tok = Tokenizer.from_str(plain)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    for name, tok_json, want in (("plain", plain, False), ("bos", tok.to_str(), True)):
        d = tmp_path / name
        model.save_pretrained(d)
        (d / "tokenizer.json").write_text(tok_json)
        assert load_lm_source(d).config["add_bos"] is want


def test_bfloat16_folder_is_exact(tmp_path):
    model = tiny_model("llama")
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    src = load_lm_source(tmp_path)
    np.testing.assert_array_equal(src.weights["layers.1.mlp.up"],
                                  model.model.layers[1].mlp.up_proj.weight.detach().float().numpy())


def test_pickle_only_folder_needs_allow_pickle(tmp_path):
    model = tiny_model("qwen2")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CompileError, match="allow_pickle=True"):
        load_lm_source(tmp_path)
    src = load_lm_source(tmp_path, allow_pickle=True)
    np.testing.assert_array_equal(src.weights["embed"], model.model.embed_tokens.weight.detach().numpy())


def test_bad_folders_are_one_compile_error(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model("llama")
    good = tmp_path / "good"
    model.save_pretrained(good)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}

    def folder(name, tensors, cfg_edit=None):
        d = tmp_path / name
        model.config.save_pretrained(d)
        if cfg_edit:
            cfg = json.loads((d / "config.json").read_text())
            cfg.update(cfg_edit)
            (d / "config.json").write_text(json.dumps(cfg))
        save_file(tensors, str(d / "model.safetensors"))
        return d

    cases = [
        (folder("extra", {**state, "model.layers.0.mlp.extra.weight": torch.zeros(3)}), "not part of a llama"),
        (folder("missing", {k: v for k, v in state.items() if "layers.2.mlp.up" not in k}), "lacks tensor"),
        (folder("shape", state, {"intermediate_size": 128}), "has shape"),
        (folder("nan", {**state, "model.norm.weight": torch.full((64,), float("nan"))}), "NaN"),
        (folder("moe", state, {"model_type": "qwen3_moe", "num_experts": 2}), "mixture-of-experts"),
        (tmp_path / "empty", "no config.json"),
    ]
    (tmp_path / "empty").mkdir()
    for path, msg in cases:
        with pytest.raises(CompileError, match=msg):
            load_lm_source(path)
    (good / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(CompileError, match="safetensors"):
        load_lm_source(good)
    with pytest.raises(CompileError, match="no such"):
        load_lm_source(tmp_path / "nothing")


def test_lmsource_validates_its_config():
    src = lm_source_from_model(tiny_model("llama", num_hidden_layers=2))
    for edit, msg in [({"heads": 3}, "multiple"), ({"layer_types": ["full"]}, "layer_types"),
                      ({"eos_ids": [10 ** 6]}, "eos_ids"), ({"activation": "tanh"}, "activation"),
                      ({"sliding_window": 4}, "sliding_window")]:
        with pytest.raises(CompileError, match=msg):
            LMSource({**src.config, **edit}, src.weights)


# ------------------------------------------------------------------ GGUF
def _same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


def test_gguf_gemma3_both_readers_agree_with_the_model(tmp_path):
    # Converter conventions GGUF does not record: query scale = head_dim, local rope 10000, a global
    # layer every 6th; a model built that way round-trips exactly.
    model = tiny_model("gemma3", vocab=300, num_hidden_layers=6, layer_types=None, head_dim=256,
                       query_pre_attn_scalar=256, num_attention_heads=2, num_key_value_heads=1,
                       rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                        "full_attention": {"rope_type": "default", "rope_theta": 1e6}})
    path = write_gguf(tmp_path / "tiny-gemma.gguf", model)
    direct = load_lm_source(path)
    via_tf = load_lm_source(path, gguf_via="transformers")
    ref = lm_source_from_model(model)
    assert direct.config["layer_types"] == ["sliding"] * 5 + ["full"]
    assert direct.config == via_tf.config
    skip = ("eos_ids", "add_bos", "norm_eps")  # GGUF holds eps as float32
    assert {k: v for k, v in direct.config.items() if k not in skip} == \
           {k: v for k, v in ref.config.items() if k not in skip}
    assert direct.config["norm_eps"] == np.float32(ref.config["norm_eps"])
    _same_weights(direct.weights, via_tf.weights)
    _same_weights(direct.weights, ref.weights, atol=1e-6)  # norms went through 1 + w and back
    assert direct.config["add_bos"] and direct.tokenizer_json
    assert compare(model, direct) <= REL_TOL


def test_gguf_llama_q8_and_rope_factors(tmp_path):
    model = tiny_model("llama", vocab=300)
    path = write_gguf(tmp_path / "tiny-llama.gguf", model, quant="Q8_0")
    direct = load_lm_source(path, with_tokenizer=False)
    via_tf = load_lm_source(path, gguf_via="transformers", with_tokenizer=False)
    # Same dequantized tensors, q/k rows un-permuted; only the rotary frequencies differ: the file's
    # rope_freqs tensor (Llama 3 scaling) is honoured here and ignored by transformers' GGUF loader.
    rope = "rope.full.inv_freq"
    _same_weights({k: v for k, v in direct.weights.items() if k != rope},
                  {k: v for k, v in via_tf.weights.items() if k != rope})
    exact = lm_source_from_model(model)
    np.testing.assert_allclose(direct.weights[rope], exact.weights[rope], rtol=2e-6)
    assert np.abs(via_tf.weights[rope] - exact.weights[rope]).max() > 1e-3
    assert direct.config["rope"]["full"]["type"] == "freq_factors"
    # Q8_0 costs a little accuracy, but the model is the same model
    q = np.abs(direct.weights["layers.0.attn.q"] - exact.weights["layers.0.attn.q"]).max()
    assert 0 < q < 0.01


def test_gguf_qwen2_biases(tmp_path):
    model = tiny_model("qwen2", vocab=300)
    path = write_gguf(tmp_path / "tiny-qwen2.gguf", model)
    direct = load_lm_source(path, with_tokenizer=False)
    _same_weights(direct.weights, load_lm_source(path, gguf_via="transformers", with_tokenizer=False).weights)
    _same_weights(direct.weights, lm_source_from_model(model).weights)
    assert direct.config["qkv_bias"] and not direct.config["tied_head"]


def _gguf_with(path, arch, kv=(), tensors=()):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for key, val in kv:
        (w.add_float32 if isinstance(val, float) else w.add_uint32)(key, val)
    for name, arr in tensors:
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_gguf_is_one_compile_error(tmp_path):
    model = tiny_model("gemma3", vocab=300)
    path = write_gguf(tmp_path / "t.gguf", model)
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CompileError, match="GGUF"):
        load_lm_source(tmp_path / "cut.gguf", with_tokenizer=False)
    (tmp_path / "x.bin").write_bytes(b"not a model")
    with pytest.raises(CompileError, match="not a GGUF"):
        load_lm_source(tmp_path / "x.bin")
    with pytest.raises(CompileError, match="unknown GGUF reader"):
        load_lm_source(path, gguf_via="llama.cpp", with_tokenizer=False)
    moe = _gguf_with(tmp_path / "moe.gguf", "llama", [("llama.expert_count", 8)])
    with pytest.raises(CompileError, match="mixture-of-experts"):
        load_lm_source(moe, with_tokenizer=False)
    with pytest.raises(CompileError, match="architecture 'mamba'"):
        load_lm_source(_gguf_with(tmp_path / "m.gguf", "mamba"), with_tokenizer=False)
    hp = [(f"llama.{k}", v) for k, v in (("embedding_length", 8), ("block_count", 1), ("feed_forward_length", 8),
                                         ("attention.head_count", 2), ("context_length", 16),
                                         ("attention.layer_norm_rms_epsilon", 1e-5))]
    stray = _gguf_with(tmp_path / "stray.gguf", "llama", hp, [("token_embd.weight", np.zeros((4, 8), np.float32)),
                                                             ("blk.0.attn_sinks.weight", np.zeros(2, np.float32))])
    with pytest.raises(CompileError, match="attn_sinks.weight' is not part of a llama decoder"):
        load_lm_source(stray, with_tokenizer=False)
    with pytest.raises(CompileError, match="lacks llama.embedding_length"):
        load_lm_source(_gguf_with(tmp_path / "bare.gguf", "llama"), with_tokenizer=False)
