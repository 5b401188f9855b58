"""The NDC 1.1 index key `lm` (format_spec/NDC-v1.md §4.6): what a language-model bundle carries
besides its graph — the model description, generation settings and the tokenizer payload.
Validated at open like the rest of the index (reader.py)."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import BundleError

__all__ = ["LMInfo", "validate_lm"]


def _fail(msg: str):
    raise BundleError(f"corrupt bundle: lm: {msg}")


def _count(x, what: str) -> int:
    if type(x) is not int or x < 1:
        _fail(f"{what} must be a positive integer, got {x!r}")
    return x


def _token(x, what: str, vocab: int, optional: bool = True):
    if x is None and optional:
        return None
    if type(x) is not int or not 0 <= x < vocab:
        _fail(f"{what} {x!r} is not a token id below the vocabulary size {vocab}")
    return x


@dataclass(frozen=True)
class LMInfo:
    config: dict  # the compiler's model description (informational beyond the fields below)
    vocab: int
    max_positions: int
    bos_id: int | None
    eos_ids: tuple
    pad_id: int | None
    add_bos: bool
    tokenizer_payload: int | None
    chat_template: str | None
    tokenizer_tables_payload: int | None = None  # (1.4) runtime/bpe.py's compact tables, or None

    def tokenizer_json(self, bundle) -> str | None:
        data = self.tokenizer_bytes(bundle)
        try:
            return None if data is None else data.decode("utf-8")
        except UnicodeDecodeError:
            _fail("the tokenizer payload is not UTF-8 text")

    def tokenizer_bytes(self, bundle) -> bytes | None:
        """The tokenizer.json payload as stored (UTF-8; runtime/tokenizer.py decodes what it parses)."""
        return None if self.tokenizer_payload is None else bundle.read_payload(self.tokenizer_payload)

    def tokenizer_tables(self, bundle) -> bytes | None:
        """The compact BPE tables (runtime/bpe.py) when the compiler stored them, else None."""
        p = self.tokenizer_tables_payload
        return None if p is None else bundle.read_payload(p)


def validate_lm(bundle, lm, used: set) -> LMInfo | None:
    if lm is None:
        return None
    if not isinstance(lm, dict) or not isinstance(lm.get("config"), dict) or not isinstance(lm.get("generation"), dict):
        _fail("must be an object with 'config' and 'generation' objects")
    cfg, gen = lm["config"], lm["generation"]
    vocab = _count(cfg.get("vocab"), "config.vocab")
    max_positions = _count(cfg.get("max_positions"), "config.max_positions")
    eos = gen.get("eos_ids")
    if not isinstance(eos, list):
        _fail("generation.eos_ids must be a list of token ids")
    eos_ids = tuple(_token(i, "generation.eos_ids entry", vocab, optional=False) for i in eos)
    bos = _token(gen.get("bos_id"), "generation.bos_id", vocab)
    pad = _token(gen.get("pad_id"), "generation.pad_id", vocab)
    add_bos = gen.get("add_bos")
    if not isinstance(add_bos, bool) or (add_bos and bos is None):
        _fail("generation.add_bos must be true or false, and true only with a bos_id")
    tok = lm.get("tokenizer")
    if tok is not None:
        tok = bundle._pid(tok, "lm tokenizer", used)
    tables = lm.get("tokenizer_tables")
    if tables is not None:
        if tok is None:
            _fail("tokenizer_tables without a tokenizer")
        tables = bundle._pid(tables, "lm tokenizer_tables", used)
    chat = lm.get("chat_template")
    if chat is not None and not isinstance(chat, str):
        _fail("chat_template must be a string or null")
    return LMInfo(cfg, vocab, max_positions, bos, eos_ids, pad, add_bos, tok, chat, tables)
