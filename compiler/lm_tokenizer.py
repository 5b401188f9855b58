"""The compact tokenizer tables a language-model bundle carries beside its tokenizer.json.

runtime/bpe.py re-implements one family of tokenizers (sentencepiece-style BPE: Gemma, and Llama 2 /
Mistral's HF conversions) so that `nadoo generate` neither imports `tokenizers` nor holds its ~430 MiB.
A re-implementation is only worth storing if it is exact, so the compiler checks it here against
`tokenizers` itself — ids on the calibration text and on a fixed sample of hard cases (specials,
whitespace runs, bytes outside the vocabulary), and the decoded text of those ids — and stores no
tables when anything differs; the runtime then uses `tokenizers` as before.
"""
from __future__ import annotations

from nadoo.runtime.bpe import CompactBPE, tables_from_json, tables_payload

__all__ = ["compact_tables"]

SAMPLE = ("The capital of France is Paris.  Two  spaces,\ttabs\t\tand\n\n\nnewlines; <start_of_turn>user\n"
          "hi<end_of_turn> <bos><eos> [multimodal] <table><tr><td>1</td></tr></table> Ünïcödé ✓ 日本語 😀 𝔘 "
          "\u0000\u0007\x7f ﬁ ½ ‰ e\u0301 " + "a" * 40 + " 1234567890 3.14159 $%&*()[]{}")


def compact_tables(tokenizer_json: str, texts=()) -> tuple[bytes | None, str]:
    """(the tables payload or None, a note saying which and why)."""
    tables = tables_from_json(tokenizer_json)
    if tables is None:
        return None, "tokenizer: not a sentencepiece-style BPE; generate will use the tokenizers package"
    from nadoo.runtime.tokenizer import _tokenizers

    payload = tables_payload(tables)
    ours, ref = CompactBPE(payload), _tokenizers().Tokenizer.from_str(tokenizer_json)
    for text in (SAMPLE, *texts):
        ids = ref.encode(text, add_special_tokens=False).ids
        if ours.encode(text) != ids or any(ours.decode(ids, skip) != ref.decode(ids, skip_special_tokens=skip)
                                           for skip in (True, False)):
            return None, ("tokenizer: the compact tables differ from the tokenizers package on "
                          f"{text[:40]!r}...; generate will use the tokenizers package")
    return payload, f"tokenizer: compact tables ({len(payload) / 2**20:.1f} MiB) checked against the tokenizers package"
