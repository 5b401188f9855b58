"""A sentencepiece-style BPE tokenizer in plain Python + NumPy, from compact tables stored in the bundle.

Why: the `tokenizers` package builds Gemma 3's tokenizer.json (262,144 pieces, 514,906 merges) in
~1.5 s into ~430 MiB of resident memory — more than the 4-bit model it serves, and over a second of
every cold start. The same facts fit in ~12 MiB of arrays: the pieces as one UTF-8 blob with offsets,
and the merges as three int32 columns (left id, right id, merged id) in rank order.

What it covers is exactly what HF `tokenizers` does for this family, checked at compile time on the
calibration text (compiler/lm_compile.py stores the tables only when both agree):
- added tokens (none may strip, need single words or be normalized) split the raw text first,
  leftmost-longest, and map to their ids;
- the rest is normalized (`Replace` of a string, `Prepend`, or a `Sequence` of them), pre-tokenized
  (none, or `Split` on a string) and encoded word by word with BPE: characters (or their UTF-8 byte
  pieces <0xHH> under byte fallback, else the unknown token, fused when `fuse_unk`), then the
  lowest-ranked adjacent pair merged first, leftmost among equals;
- decoding: the pieces (specials skipped on request) through `Replace` / `ByteFallback` / `Fuse` /
  `Strip` decoders.
Anything else (byte-level BPE with regex pre-tokenizers, WordPiece, Unigram, ...) gets no tables and
runs through `tokenizers` (runtime/tokenizer.py).
"""
from __future__ import annotations

import heapq
import io
import json
import re

import numpy as np

from .errors import BundleError

__all__ = ["CompactBPE", "tables_from_json"]

VERSION = 1
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPLIT_BEHAVIOURS = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"}


# ------------------------------------------------------------------ compile side: tokenizer.json -> tables
def _string_pattern(p) -> str | None:
    return p.get("String") if isinstance(p, dict) and isinstance(p.get("String"), str) and p["String"] else None


def _normalizer(n) -> list | None:
    """The normalizer as [["replace", a, b] | ["prepend", s]], or None when unsupported."""
    if n is None:
        return []
    steps = n.get("normalizers") if n.get("type") == "Sequence" else [n]
    out = []
    for s in steps or ():
        if s.get("type") == "Replace" and _string_pattern(s.get("pattern")) and isinstance(s.get("content"), str):
            out.append(["replace", _string_pattern(s["pattern"]), s["content"]])
        elif s.get("type") == "Prepend" and isinstance(s.get("prepend"), str):
            out.append(["prepend", s["prepend"]])
        else:
            return None
    return out


def _pre_tokenizer(p) -> list | None:
    if p is None:
        return []
    if (p.get("type") == "Split" and _string_pattern(p.get("pattern")) and not p.get("invert")
            and p.get("behavior") in _SPLIT_BEHAVIOURS):
        return [["split", _string_pattern(p["pattern"]), p["behavior"]]]
    return None


def _decoder(d) -> list | None:
    if d is None:
        return None  # HF joins the pieces with spaces; not worth a second path
    steps = d.get("decoders") if d.get("type") == "Sequence" else [d]
    out = []
    for s in steps or ():
        t = s.get("type")
        if t == "Replace" and _string_pattern(s.get("pattern")) and isinstance(s.get("content"), str):
            out.append(["replace", _string_pattern(s["pattern"]), s["content"]])
        elif t in ("ByteFallback", "Fuse"):
            out.append([t.lower()])
        elif t == "Strip" and isinstance(s.get("content"), str) and len(s["content"]) == 1:
            out.append(["strip", s["content"], int(s.get("start", 0)), int(s.get("stop", 0))])
        else:
            return None
    return out


def tables_from_json(tokenizer_json: str) -> dict[str, np.ndarray] | None:
    """The compact tables of a sentencepiece-style BPE tokenizer.json, or None when it uses anything
    this module does not reproduce."""
    j = json.loads(tokenizer_json)
    m = j.get("model") or {}
    if (m.get("type") != "BPE" or m.get("dropout") or m.get("continuing_subword_prefix")
            or m.get("end_of_word_suffix") or m.get("ignore_merges") or j.get("truncation") or j.get("padding")):
        return None
    norm, pre, dec = _normalizer(j.get("normalizer")), _pre_tokenizer(j.get("pre_tokenizer")), _decoder(j.get("decoder"))
    added = j.get("added_tokens") or []
    if norm is None or pre is None or dec is None or any(
            a.get("single_word") or a.get("lstrip") or a.get("rstrip") or a.get("normalized") for a in added):
        return None
    vocab: dict = m.get("vocab") or {}
    pieces: dict[int, str] = {i: t for t, i in vocab.items()}
    for a in added:  # HF looks an id up among the added tokens first
        pieces[a["id"]] = a["content"]
    n = max(pieces) + 1
    unk = m.get("unk_token")
    if unk is not None and unk not in vocab:
        return None
    merges = []
    for mg in m.get("merges") or ():
        a, b = mg.split(" ", 1) if isinstance(mg, str) else mg
        if a not in vocab or b not in vocab or a + b not in vocab:
            return None
        merges.append((vocab[a], vocab[b], vocab[a + b]))
    spec = {"version": VERSION, "normalizer": norm, "pre_tokenizer": pre, "decoder": dec,
            "byte_fallback": bool(m.get("byte_fallback")), "fuse_unk": bool(m.get("fuse_unk")),
            "unk_id": None if unk is None else vocab[unk],
            "vocab_size": len(set(vocab) | {a["content"] for a in added}),
            "added": [[a["content"], a["id"], bool(a.get("special"))] for a in added]}
    blob, offsets = bytearray(), np.full(n + 1, -1, np.int64)
    offsets[0] = 0
    for i in range(n):
        t = pieces.get(i)
        if t is not None:
            blob += t.encode("utf-8")
        offsets[i + 1] = len(blob)
    present = np.zeros(n, bool)
    present[list(pieces)] = True
    chars = sorted((t, i) for t, i in vocab.items() if len(t) == 1)
    byte_ids = np.array([vocab.get(f"<0x{b:02X}>", -1) for b in range(256)], np.int32)
    # Merges as pair key (left * n + right, sorted) -> rank, and rank -> merged id: a binary search finds a
    # pair. A pair listed twice keeps its last rank, as HF's HashMap does.
    m3 = np.array(merges, np.int64).reshape(-1, 3)
    key = m3[:, 0] * n + m3[:, 1]
    order = np.argsort(key, kind="stable")
    last = np.r_[key[order][1:] != key[order][:-1], True] if len(key) else np.zeros(0, bool)
    return {"spec": np.frombuffer(json.dumps(spec).encode(), np.uint8), "pieces": np.frombuffer(bytes(blob), np.uint8),
            "offsets": offsets, "present": present, "merge_keys": key[order][last],
            "merge_ranks": order[last].astype(np.int32), "merged": m3[:, 2].astype(np.int32),
            "chars": np.frombuffer("".join(t for t, _ in chars).encode("utf-8"), np.uint8),
            "char_ids": np.array([i for _, i in chars], np.int32), "byte_ids": byte_ids}


def tables_payload(tables: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **tables)
    return buf.getvalue()


# ------------------------------------------------------------------ run side
def _fail(msg: str):
    raise BundleError(f"corrupt bundle: lm tokenizer tables: {msg}")


class CompactBPE:
    def __init__(self, payload: bytes):
        try:
            with np.load(io.BytesIO(payload), allow_pickle=False) as z:
                t = {k: z[k] for k in ("spec", "pieces", "offsets", "present", "merge_keys", "merge_ranks",
                                       "merged", "chars", "char_ids", "byte_ids")}
            spec = json.loads(t["spec"].tobytes())
        except Exception as e:  # a zip, npy or JSON error of any kind means the same thing here
            _fail(f"unreadable ({type(e).__name__})")
        if not isinstance(spec, dict) or spec.get("version") != VERSION:
            _fail("unknown version")
        off, present = t["offsets"], t["present"]
        n = len(present)
        if (off.dtype != np.int64 or off.shape != (n + 1,) or off[0] != 0 or off[-1] != len(t["pieces"])
                or np.any(np.diff(off) < 0)):
            _fail("inconsistent arrays")
        self._blob, self._off, self._present = t["pieces"].tobytes(), off, present
        self.vocab_size = int(spec["vocab_size"])
        self._norm, self._pre, self._dec = spec["normalizer"], spec["pre_tokenizer"], spec["decoder"]
        self._byte_fallback, self._fuse_unk, self._unk = spec["byte_fallback"], spec["fuse_unk"], spec["unk_id"]
        self._added = {c: i for c, i, _ in spec["added"]}
        self._special = {i for _, i, s in spec["added"] if s}
        self._added_lengths = sorted({len(c) for c in self._added}, reverse=True)
        self._added_start = re.compile("[" + "".join(re.escape(c) for c in {c[0] for c in self._added}) + "]") \
            if self._added else None
        keys, ranks, merged = t["merge_keys"], t["merge_ranks"], t["merged"]
        if (keys.dtype != np.int64 or ranks.dtype != np.int32 or merged.dtype != np.int32 or keys.shape != ranks.shape
                or keys.ndim != 1 or merged.ndim != 1 or np.any(np.diff(keys) <= 0)
                or (ranks.size and (ranks.min() < 0 or ranks.max() >= len(merged)))
                or (merged.size and (merged.min() < 0 or merged.max() >= n))):
            _fail("inconsistent merges")
        self._keys, self._rank, self._merged = keys, ranks, merged
        self._pairs: dict = {}
        self._n = n
        self._char_data = (t["chars"], t["char_ids"])
        self._chars = None  # single-character piece -> id, built on the first encode
        byte_ids = t["byte_ids"]
        if byte_ids.shape != (256,) or byte_ids.max() >= n:
            _fail("inconsistent arrays")
        # Byte fallback applies only when every byte of a character has its <0xHH> piece.
        self._bytes = [None if i < 0 else int(i) for i in byte_ids] if spec["byte_fallback"] else None

    # -- vocabulary
    def id_to_token(self, i: int) -> str | None:
        if not 0 <= i < self._n or not self._present[i]:
            return None
        return self._blob[self._off[i]:self._off[i + 1]].decode("utf-8")

    # -- encoding
    def _split_added(self, text: str):
        """(segment, added id or None) pieces of `text`, added tokens matched leftmost-longest."""
        if not self._added_start:
            yield text, None
            return
        pos = start = 0
        while True:
            m = self._added_start.search(text, pos)
            if m is None:
                break
            p = m.start()
            for n in self._added_lengths:
                i = self._added.get(text[p:p + n])
                if i is not None:
                    if p > start:
                        yield text[start:p], None
                    yield None, i
                    pos = start = p + n
                    break
            else:
                pos = p + 1
        if start < len(text):
            yield text[start:], None

    def _normalize(self, s: str) -> str:
        for step in self._norm:
            if step[0] == "replace":
                s = s.replace(step[1], step[2])
            elif s:  # prepend (HF prepends to a non-empty string only)
                s = step[1] + s
        return s

    def _pre_tokenize(self, s: str) -> list[str]:
        words = [s]
        for _, pat, behaviour in self._pre:
            words = [w for word in words for w in _split(word, pat, behaviour)]
        return [w for w in words if w]

    def _initial(self, word: str) -> list[int]:
        ids, unk = [], None
        for c in word:
            i = self._chars.get(c)
            if i is not None:
                if unk is not None:
                    ids.append(unk)
                    unk = None
                ids.append(i)
                continue
            if self._bytes is not None:
                b = [self._bytes[x] for x in c.encode("utf-8")]
                if None not in b:
                    ids.extend(b)
                    continue
            if self._unk is not None:
                if unk is not None and not self._fuse_unk:
                    ids.append(unk)
                unk = self._unk
        if unk is not None:
            ids.append(unk)
        return ids

    def _lookup(self, a: int, b: int):
        """(rank, merged id) of the pair, or None; memoised, since text repeats its pairs."""
        k = a * self._n + b
        hit = self._pairs.get(k, False)
        if hit is False:
            j = int(self._keys.searchsorted(k))
            hit = None
            if j < len(self._keys) and self._keys[j] == k:
                r = int(self._rank[j])
                hit = r, int(self._merged[r])
            if len(self._pairs) < 1 << 20:  # bounded: a long-lived session may encode a lot of text
                self._pairs[k] = hit
        return hit

    def _bpe(self, ids: list[int]) -> list[int]:
        n = len(ids)
        if n < 2 or not len(self._keys):  # a vocabulary without merges (single characters) has nothing to merge
            return ids
        prev, nxt = list(range(-1, n - 1)), list(range(1, n + 1))
        alive = [True] * n
        keys = np.asarray(ids[:-1], np.int64) * self._n + np.asarray(ids[1:], np.int64)
        j = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        hit = np.flatnonzero(self._keys[j] == keys) if len(self._keys) else []
        ranks = self._rank[j]
        heap = [(int(ranks[p]), int(p), int(self._merged[ranks[p]])) for p in hit]
        heapq.heapify(heap)
        while heap:
            rank, p, new = heapq.heappop(heap)
            q = nxt[p]
            if not alive[p] or q >= n:
                continue
            cur = self._lookup(ids[p], ids[q])
            if cur is None or cur[1] != new or cur[0] != rank:
                continue  # stale: a neighbour merged since this pair was queued
            ids[p], alive[q] = new, False
            nxt[p] = nxt[q]
            if nxt[q] < n:
                prev[nxt[q]] = p
            if prev[p] >= 0:
                m = self._lookup(ids[prev[p]], new)
                if m is not None:
                    heapq.heappush(heap, (m[0], prev[p], m[1]))
            if nxt[p] < n:
                m = self._lookup(new, ids[nxt[p]])
                if m is not None:
                    heapq.heappush(heap, (m[0], p, m[1]))
        return [ids[i] for i in range(n) if alive[i]]

    def encode(self, text: str) -> list[int]:
        if self._chars is None:
            chars, ids = self._char_data
            self._chars = dict(zip(chars.tobytes().decode("utf-8"), ids.tolist()))
        out: list[int] = []
        for segment, added in self._split_added(text):
            if added is not None:
                out.append(added)
                continue
            for word in self._pre_tokenize(self._normalize(segment)):
                out.extend(self._bpe(self._initial(word)))
        return out

    # -- decoding
    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        tokens = [t for i in ids if (t := self.id_to_token(i)) is not None
                  and not (skip_special_tokens and i in self._special)]
        for step in self._dec:
            kind = step[0]
            if kind == "replace":
                tokens = [t.replace(step[1], step[2]) for t in tokens]
            elif kind == "bytefallback":
                tokens = _byte_fallback(tokens)
            elif kind == "fuse":
                tokens = ["".join(tokens)]
            else:
                tokens = [_strip(t, step[1], step[2], step[3]) for t in tokens]
        return "".join(tokens)


def _split(s: str, pat: str, behaviour: str) -> list[str]:
    """HF's Split pre-tokenizer on a literal pattern."""
    spans, pos = [], 0  # (text, is_match)
    while (k := s.find(pat, pos)) >= 0:
        if k > pos:
            spans.append([s[pos:k], False])
        spans.append([pat, True])
        pos = k + len(pat)
    if pos < len(s):
        spans.append([s[pos:], False])
    if behaviour == "Removed":
        return [t for t, m in spans if not m]
    if behaviour == "Isolated":
        return [t for t, _ in spans]
    out: list[list] = []
    prev_match = False
    for t, m in spans:
        if behaviour == "MergedWithPrevious" and m and not prev_match and out:
            out[-1][0] += t
        elif behaviour == "MergedWithNext" and not m and prev_match and out:
            out[-1][0] += t
        elif behaviour == "Contiguous" and m and prev_match:
            out[-1][0] += t
        else:
            out.append([t, m])
        prev_match = m
    return [t for t, _ in out]


def _byte_fallback(tokens: list[str]) -> list[str]:
    out, pending = [], bytearray()

    def flush():
        if pending:
            try:
                out.append(pending.decode("utf-8"))
            except UnicodeDecodeError:
                out.extend("\ufffd" * len(pending))
            pending.clear()

    for t in tokens:
        m = _BYTE_PIECE.fullmatch(t) if len(t) == 6 else None
        if m:
            pending.append(int(m.group(1), 16))
        else:
            flush()
            out.append(t)
    flush()
    return out


def _strip(t: str, c: str, start: int, stop: int) -> str:
    lo = 0
    while lo < min(start, len(t)) and t[lo] == c:
        lo += 1
    hi = len(t)
    for _ in range(stop):
        if hi > lo and t[hi - 1] == c:
            hi -= 1
        else:
            break
    return t[lo:hi]
