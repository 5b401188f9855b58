"""Text <-> token ids for language models, over the optional `tokenizers` package.

The tokenizer travels as its tokenizer.json string. Encoding never relies on the json's own
post-processor for special tokens: the BOS rule comes from the model description (`add_bos`), so a
tokenizer rebuilt from GGUF metadata and one saved by transformers give the same ids.

Where the compiler stored compact BPE tables (runtime/bpe.py: Gemma's family of sentencepiece BPEs, checked
against `tokenizers` at compile time) they replace the package altogether: ~12 MiB and milliseconds to open.
Otherwise, decoding needs only the vocabulary and the decoder, not a BPE model's merges, which are most of the
cost of a large tokenizer (Gemma 3's 514,906 merges: ~430 MiB resident and 1.5 s to build, against
~65 MiB and half the time without them). So ids become text through a tokenizer built without the
merges, and the complete one is built on the first `encode` only.
"""
from __future__ import annotations

import re

from .errors import InputError

__all__ = ["StreamDecoder", "Tokenizer"]

_REPLACEMENT = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# The value of a "merges" key that is an array. In JSON text `"merges"` can only be a whole string token
# (an escaped quote inside a string carries a backslash), and only a BPE model has such a key.
_MERGES_KEY = re.compile(rb'"merges"\s*:\s*\[')
_TAIL = re.compile(rb'\]\s*\}\s*\}\s*$')
# A quote before a colon: the end of an object key, unless it opens a string (after `[`, `,` or a space)
# or is escaped.
_KEY_END = re.compile(rb'"\s*:')


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise InputError("this needs the tokenizers package: pip install tokenizers") from None
    return tokenizers


def _build(tokenizer_json: bytes):
    try:
        return _tokenizers().Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    except Exception as e:  # the Rust side raises its own Exception type
        raise InputError(f"invalid tokenizer.json: {' '.join(str(e).split())[:200]}") from None


def _without_merges(tokenizer_json: bytes) -> bytes | None:
    """The tokenizer.json with its BPE merges emptied, or None when it has none to drop. The tokenizers
    package writes a BPE model's merges last in the model and the model last in the file, so they run
    from the last "merges" key to the closing `]}}`, with no object key among them; a file laid out
    otherwise keeps its merges."""
    last = None
    for last in _MERGES_KEY.finditer(tokenizer_json):
        pass
    tail = _TAIL.search(tokenizer_json, last.end()) if last is not None else None
    if tail is None:
        return None
    lo, hi = last.end(), tail.start()
    keys = (m for m in _KEY_END.finditer(tokenizer_json, lo, hi) if tokenizer_json[m.start() - 1] not in b"[, \t\r\n\\")
    if lo == hi or next(keys, None) is not None:
        return None
    return tokenizer_json[:lo] + tokenizer_json[hi:]


class Tokenizer:
    def __init__(self, tokenizer_json: str | bytes | None, *, bos_id: int | None = None, add_bos: bool = False,
                 tables: bytes | None = None):
        """`tokenizer_json`: its text, or that text in UTF-8 (what a bundle stores: a third of the memory of a
        str holding non-Latin-1 characters; held until the first `encode`). `tables`: the compact BPE
        tables of runtime/bpe.py, which replace the `tokenizers` package when given."""
        if tables is not None:
            from .bpe import CompactBPE

            self._tok = self._encoder = CompactBPE(tables)
            self._json, self.vocab_size = None, self._tok.vocab_size
        else:
            if not isinstance(tokenizer_json, (str, bytes)) or not tokenizer_json:
                raise InputError("tokenizer.json must be a non-empty string")
            if isinstance(tokenizer_json, str):
                tokenizer_json = tokenizer_json.encode("utf-8", "surrogatepass")
            _tokenizers()
            decoding = _without_merges(tokenizer_json)
            self._tok = _build(decoding or tokenizer_json)  # ids -> text (and the vocabulary)
            self._json, self._encoder = (tokenizer_json, None) if decoding else (None, self._tok)
            self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.compact = tables is not None
        if add_bos and bos_id is None:
            raise InputError("add_bos is set but the model has no BOS token id")
        if bos_id is not None and not 0 <= bos_id < self.vocab_size:
            raise InputError(f"BOS id {bos_id} outside the tokenizer's {self.vocab_size} tokens")
        self.bos_id, self.add_bos = bos_id, bool(add_bos)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with BOS first when the model expects one."""
        if not isinstance(text, str):
            raise InputError(f"text to encode must be a string, got {type(text).__name__}")
        if self._encoder is None:
            self._encoder, self._json = _build(self._json), None
        ids = self._encoder.encode(text) if self.compact else self._encoder.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if self.add_bos else ids

    def _check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} outside the tokenizer's {self.vocab_size} tokens")
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str | None:
        """The vocabulary entry of one id (its raw piece, e.g. '▁Paris' or '<0xE2>')."""
        return self._tok.id_to_token(self._check_ids([token_id])[0])

    def stream(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Turns tokens arriving one by one into text deltas whose concatenation is the decode of all
    tokens.

    Decoding one token alone is wrong in two ways: sentencepiece decoders strip the leading space
    of the first piece they see, and a byte-fallback character split over several tokens decodes to
    U+FFFD until its last byte arrives. So each step decodes a short window of recent tokens with and
    without the new one and emits the difference, holding text back while it ends in an incomplete
    character — or in a byte-fallback piece (<0xHH>): a run of those decodes as one UTF-8 sequence,
    all of it U+FFFD if invalid, so a valid-looking start may still turn into replacement characters.
    The window restarts after each emitted delta, so a step costs O(1), not O(length).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # tokens up to here have been emitted
        self._byte_piece: dict[int, bool] = {}

    def _decode(self, lo: int, hi: int) -> str:
        return self._tok.decode(self._ids[lo:hi], self._skip)

    def push(self, token_id: int) -> str:
        """Add one token; returns the text it completes ('' while a character is still partial)."""
        self._ids.extend(self._tok._check_ids([token_id]))
        if self._is_byte_piece(self._ids[-1]):
            return ""
        before = self._decode(self._prefix, self._read)
        after = self._decode(self._prefix, len(self._ids))
        if len(after) > len(before) and not after.endswith(_REPLACEMENT) and after.startswith(before):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before):]
        return ""

    def _is_byte_piece(self, token_id: int) -> bool:
        b = self._byte_piece.get(token_id)
        if b is None:
            b = self._byte_piece[token_id] = bool(_BYTE_PIECE.fullmatch(self._tok.token_text(token_id) or ""))
        return b

    def flush(self) -> str:
        """Text still held back (an incomplete character at the end decodes as U+FFFD, as in a full decode)."""
        before = self._decode(self._prefix, self._read)
        after = self._decode(self._prefix, len(self._ids))
        self._prefix = self._read = len(self._ids)
        return after[len(before):]
