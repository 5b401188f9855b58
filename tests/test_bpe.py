"""runtime/bpe.py against the `tokenizers` package it replaces: the same ids and the same text, on real
text and on random text, for the tokenizer layouts it claims (Gemma 3's, HF's Llama 2 conversion, with
and without byte fallback); None for layouts it does not; one error for damaged tables; and a bundle that
generates from text with `tokenizers` not importable."""
from __future__ import annotations

import builtins
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
pytest.importorskip("tokenizers")
from hypothesis import given, settings, strategies as st  # noqa: E402
from lm_fixtures import gemma_tokenizer_json, tiny_model, tiny_tokenizer_json  # noqa: E402
from tokenizers import Tokenizer as HF  # noqa: E402

import nadoo.runtime as nd  # noqa: E402
from nadoo.compiler.lm_compile import compile_lm  # noqa: E402
from nadoo.compiler.lm_tokenizer import compact_tables  # noqa: E402
from nadoo.compiler.pipeline import CompileOptions  # noqa: E402
from nadoo.runtime.bpe import CompactBPE, tables_from_json, tables_payload  # noqa: E402
from nadoo.runtime.errors import BundleError  # noqa: E402

LICENSES = Path("/usr/share/common-licenses")
TEXTS = [(LICENSES / n).read_text(encoding="utf-8")[:6000] for n in ("GPL-3", "Apache-2.0", "MPL-2.0")
         if (LICENSES / n).exists()]
TEXTS += ["the quick brown fox", "  two  spaces\tand\t\ttabs\n\n\nnewlines <start_of_turn>user\nhi<end_of_turn>",
          "café déjà vu, 東京 🙂! <b>bold</b>", "", " ", "\n", "zzzzzzzzzzzz qqq", "\x00\x7f\u0301"]
LAYOUTS = {"gemma": {}, "llama2": {"llama2": True}, "unk": {"byte_fallback": False},
           "unk_unfused": {"byte_fallback": False, "fuse_unk": False}}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def pair(request):
    js = gemma_tokenizer_json(**LAYOUTS[request.param])
    tables = tables_from_json(js)
    assert tables is not None
    return CompactBPE(tables_payload(tables)), HF.from_str(js)


def same(ours, ref, text):
    ids = ref.encode(text, add_special_tokens=False).ids
    assert ours.encode(text) == ids, text
    for skip in (True, False):
        assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), (text, skip)


@pytest.mark.parametrize("i", range(len(TEXTS)))
def test_same_ids_and_text_as_tokenizers(pair, i):
    same(*pair, TEXTS[i])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(list("the quick brown fox\n\t  <>bé東🙂") + ["<b>", "<end_of_turn>", "\n\n"]),
                max_size=40).map("".join) | st.text(max_size=30))
def test_random_text_matches_tokenizers(pair, text):
    same(*pair, text)


def test_vocabulary_facts_match(pair):
    ours, ref = pair
    assert ours.vocab_size == ref.get_vocab_size(with_added_tokens=True)
    for i in range(ours.vocab_size):
        assert ours.id_to_token(i) == ref.id_to_token(i)


def test_layouts_it_does_not_reproduce_get_no_tables():
    assert tables_from_json(tiny_tokenizer_json(300)) is None  # a Metaspace pre-tokenizer
    j = json.loads(gemma_tokenizer_json())
    j["model"]["ignore_merges"] = True
    assert tables_from_json(json.dumps(j)) is None
    j = json.loads(gemma_tokenizer_json())
    j["added_tokens"][-1]["lstrip"] = True
    assert tables_from_json(json.dumps(j)) is None
    payload, note = compact_tables(tiny_tokenizer_json(300))
    assert payload is None and "tokenizers package" in note


def test_compiler_stores_tables_only_when_they_agree():
    payload, note = compact_tables(gemma_tokenizer_json(), ["the quick brown fox jumps"])
    assert payload is not None and "checked" in note
    # A merge list the re-implementation would apply differently must not be stored: swap two merges' ranks
    # in the tables' source and the check against tokenizers has to notice.
    j = json.loads(gemma_tokenizer_json())
    ref = HF.from_str(json.dumps(j))
    tables = tables_from_json(json.dumps(j))
    tables["merge_ranks"] = tables["merge_ranks"][::-1].copy()
    bad = CompactBPE(tables_payload(tables))
    assert bad.encode(TEXTS[0]) != ref.encode(TEXTS[0], add_special_tokens=False).ids


@pytest.mark.parametrize("damage", ["truncate", "keys", "offsets", "version"])
def test_damaged_tables_are_one_bundle_error(damage):
    tables = tables_from_json(gemma_tokenizer_json())
    if damage == "keys":
        tables["merge_keys"] = tables["merge_keys"][::-1].copy()
    elif damage == "offsets":
        tables["offsets"] = tables["offsets"][:-1].copy()
    elif damage == "version":
        spec = json.loads(tables["spec"].tobytes())
        tables["spec"] = np.frombuffer(json.dumps({**spec, "version": 99}).encode(), np.uint8)
    payload = tables_payload(tables)
    if damage == "truncate":
        payload = payload[: len(payload) // 2]
    with pytest.raises(BundleError, match="tokenizer tables"):
        CompactBPE(payload)


def test_bundle_generates_from_text_without_tokenizers(tmp_path, monkeypatch):
    model = tiny_model("gemma3", vocab=400)
    model.save_pretrained(tmp_path / "hf")
    js = gemma_tokenizer_json(400)
    (tmp_path / "hf" / "tokenizer.json").write_text(js)
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    bundle = tmp_path / "g.ndc"
    report = compile_lm(tmp_path / "hf", bundle, CompileOptions(keep_float=True), quiet=True)
    assert any("compact tables" in n for n in report.notes)
    prompt = "the quick brown fox\njumps"
    want = [2] + HF.from_str(js).encode(prompt, add_special_tokens=False).ids
    with nd.Session(bundle) as s:
        ref = s.generate(prompt=prompt, max_new_tokens=6, stop_at_eos=False)
    real_import = builtins.__import__

    def no_tokenizers(name, *a, **k):
        if name == "tokenizers" or name.startswith("tokenizers."):
            raise ImportError("blocked")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    with nd.Session(bundle) as s:
        r = s.generate(prompt=prompt, max_new_tokens=6, stop_at_eos=False)
    assert r.prompt_ids == want == ref.prompt_ids
    assert r.token_ids == ref.token_ids and r.text == ref.text
