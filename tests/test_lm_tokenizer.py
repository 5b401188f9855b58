"""runtime/tokenizer.py: BOS rule, round trips, and streaming deltas that add up to the full decode
for sentencepiece pieces and multi-byte characters split over byte-fallback tokens."""
import builtins
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

pytest.importorskip("tokenizers")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lm_fixtures import tiny_tokenizer_json  # noqa: E402

from nadoo.runtime.errors import InputError  # noqa: E402
from nadoo.runtime.tokenizer import Tokenizer  # noqa: E402

JSON = tiny_tokenizer_json()
TEXTS = ["the quick brown fox", "two  spaces", "café déjà vu", "I ❤ 東京 🙂!", "a\nb\tc", ""]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(JSON, bos_id=2, add_bos=True)


def test_encode_puts_bos_first_exactly_when_asked(tok):
    ids = tok.encode("the dog")
    assert ids[0] == 2 and 2 not in ids[1:]
    assert Tokenizer(JSON, bos_id=2, add_bos=False).encode("the dog") == ids[1:]
    assert tok.encode("") == [2]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_multibyte_characters_use_byte_tokens(tok):
    pieces = [tok.token_text(i) for i in tok.encode("🙂")[1:]]
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]


def stream_all(tok, ids):
    s = tok.stream()
    deltas = [s.push(i) for i in ids]
    return deltas, s.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_stream_deltas_add_up_to_the_full_decode(tok, text):
    ids = tok.encode(text)
    deltas, rest = stream_all(tok, ids)
    assert "".join(deltas) + rest == tok.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
    if any(ord(ch) > 127 for ch in text):
        assert "" in deltas[1:]  # a partial character was held back, not emitted as U+FFFD


def test_stream_keeps_spaces_between_pieces(tok):
    deltas, _ = stream_all(tok, tok.encode("the dog ran"))
    # sentencepiece decoders drop the first piece's space: decoding piece by piece would lose it
    assert "".join(deltas) == "the dog ran" and any(d.startswith(" ") for d in deltas)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("the dog é東🙂 \n!")), max_size=30))
def test_stream_property(text):
    t = Tokenizer(JSON, bos_id=2, add_bos=True)
    ids = t.encode(text)
    deltas, rest = stream_all(t, ids)
    assert "".join(deltas) + rest == t.decode(ids)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["<0x20>", "<0x41>", "<0xC3>", "<0xA9>", "<0xD4>", "<0xF0>", "<0x9F>", "▁the", "▁dog"]),
                max_size=12))
def test_stream_of_any_byte_pieces_equals_the_full_decode(pieces):
    """Generated ids need not be valid UTF-8: a run of byte pieces that turns invalid later decodes
    to U+FFFD as a whole, so the stream holds a run back until it ends."""
    t = Tokenizer(JSON)
    ids = [t._tok.token_to_id(p) for p in pieces]
    deltas, rest = stream_all(t, ids)
    assert "".join(deltas) + rest == t.decode(ids)


def test_stream_of_a_cut_character_flushes_a_replacement(tok):
    ids = tok.encode("🙂")[:-1]  # last byte missing, as when generation stops mid-character
    deltas, rest = stream_all(tok, ids)
    assert "".join(deltas) == "" and rest == tok.decode(ids) and rest.endswith("\ufffd")


def test_bad_input_is_one_input_error(tok, monkeypatch):
    with pytest.raises(InputError, match="invalid tokenizer.json"):
        Tokenizer('{"not": "a tokenizer"}')
    with pytest.raises(InputError, match="invalid tokenizer.json"):
        Tokenizer(JSON.encode()[:-1] + b"\xff}")
    with pytest.raises(InputError, match="outside"):
        tok.decode([5, 10 ** 6])
    with pytest.raises(InputError, match="outside"):
        tok.stream().push(-1)
    with pytest.raises(InputError, match="BOS"):
        Tokenizer(JSON, add_bos=True)
    with pytest.raises(InputError, match="string"):
        tok.encode(b"bytes")
    real_import = builtins.__import__

    def no_tokenizers(name, *a, **k):
        if name == "tokenizers":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    with pytest.raises(InputError, match="pip install tokenizers"):
        Tokenizer(JSON)


def test_decoding_needs_no_merges_and_agrees_with_the_complete_tokenizer():
    """ids -> text goes through a tokenizer built without the BPE merges (most of a large tokenizer's
    memory and build time); every id, special or not, decodes as the complete tokenizer decodes it."""
    import json

    from tokenizers import Tokenizer as HF

    from nadoo.runtime.tokenizer import _without_merges

    stripped = _without_merges(JSON.encode())
    assert json.loads(stripped)["model"]["merges"] == [] and json.loads(JSON)["model"]["merges"]
    full, t = HF.from_str(JSON), Tokenizer(JSON.encode(), bos_id=2, add_bos=True)  # as a bundle stores it
    assert t._encoder is None  # nothing encoded yet: the complete tokenizer is not built
    ids = list(range(t.vocab_size))
    for skip in (True, False):
        assert t.decode(ids, skip_special_tokens=skip) == full.decode(ids, skip_special_tokens=skip)
    assert [t.token_text(i) for i in ids] == [full.id_to_token(i) for i in ids]
    assert t.decode(t.encode("the quick brown fox")) == "the quick brown fox"  # built on first encode


def _utf8(*a, **k) -> bytes:
    import json

    return json.dumps(*a, **k).encode()


def test_merges_are_kept_unless_they_end_the_file():
    import json

    from nadoo.runtime.tokenizer import _without_merges

    d = json.loads(JSON)
    odd = dict(d, model=dict(d["model"], merges=[["▁", ":"], ["a\":", "b"], ["\\", ":"]]))  # quotes before colons
    assert json.loads(_without_merges(_utf8(odd)))["model"]["merges"] == []
    d["model"]["after"] = [1]  # a key after the merges: the cut would drop it
    assert _without_merges(_utf8(d)) is None
    assert _without_merges(_utf8(d, indent=1)) is None
    d["model"].pop("after")
    d["extra"] = {"merges": []}
    assert _without_merges(_utf8(d)) is None  # the model is not last
    d = json.loads(JSON)
    d["model"] = {k: d["model"][k] for k in ["merges", *(k for k in d["model"] if k != "merges")]}
    assert _without_merges(_utf8(d)) is None  # the merges are not last in the model
    t = Tokenizer(json.dumps(d))  # such a file is built whole
    assert t._encoder is t._tok and t.decode(t.encode("the dog")) == "the dog"
