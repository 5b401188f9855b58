"""Atomic, deterministic NDC writer (format_spec/NDC-v1.md).

Payloads stream into a temporary file next to the target as they are added (runtime/files.py
`AtomicFile`), so a large model never has to sit in memory whole; `finish` appends the index and the
payload table, fsyncs, and renames over the target. Until that rename nothing exists under the target
name, and on any error or SIGTERM the temporary file is removed. Same payloads + same index → same
bytes (no timestamps, sorted JSON keys, fixed zstd level, single-threaded compression).
"""

from __future__ import annotations

import json
import os
import zlib

import numpy as np

from nadoo.runtime.files import AtomicFile
from nadoo.runtime.format import (
    CODEC_RAW, CODEC_ZSTD, MAJOR, PREAMBLE_SIZE, TABLE_DTYPE, Preamble, align_up,
)

# zstd keeps a payload only when it saves at least this fraction: decompression costs time on every
# cache fill, and quantized codes rarely compress by more than a few percent.
MIN_ZSTD_SAVING = 0.05


def dumps_json(obj) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8. Used for the index and JSON payloads."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


KINDS_1_1 = ("conv_transpose", "recurrent_input", "recurrent")  # tensors read by ops added in 1.1
TIERS_1_3 = ("q3",)  # tiers added in 1.3
TIERS_1_4 = ("q6", "q5")  # tiers added in 1.4


def minor_version(index: dict) -> int:
    """The lowest minor version that describes a bundle: 4 once a tensor stores a tier of TIERS_1_4; 3 once a tensor has `zp_t`-coded tiers or stores a tier of
    TIERS_1_3 (1.3); 2 once it uses the 1.2 addition (`zp`-coded tiers of a tensor or MoE expert matrix); else 1 once it
    uses a 1.1 addition (moe, alloc, nested planes, lm,
    tensors of KINDS_1_1, inline_reason on constants); else 0, so files without them stay readable as 1.0."""
    # tests write crafted indexes through this writer too: look only at what has the expected form
    objects = lambda xs: [x for x in xs if isinstance(x, dict)] if isinstance(xs, list) else []  # noqa: E731
    tensors = objects(index.get("tensors"))
    consts = index.get("constants")
    consts = objects(consts.get("tensors")) if isinstance(consts, dict) else []
    mats = [m for layer in objects(index.get("moe")) for ex in objects(layer.get("experts"))
            for m in (ex["tensors"].values() if isinstance(ex.get("tensors"), dict) else []) if isinstance(m, dict)]
    tier_maps = [m for t in tensors + mats for m in (t.get("tiers"), t.get("zp"), t.get("zp_t")) if isinstance(m, dict)]
    if any(t in m for m in tier_maps for t in TIERS_1_4):
        return 4
    if any("zp_t" in t for t in tensors) or any(t in m for m in tier_maps for t in TIERS_1_3):
        return 3
    if any("zp" in t for t in tensors + mats):
        return 2
    uses_1_1 = (bool(index.get("moe") or index.get("alloc") or index.get("lm")) or any("nested" in t for t in tensors)
                or any(t.get("kind") in KINDS_1_1 for t in tensors) or any("inline_reason" in c for c in consts))
    return 1 if uses_1_1 else 0


class BundleWriter:
    def __init__(self, path, alignment: int = 64, zstd_level: int = 3):
        if alignment < 8 or alignment & (alignment - 1):
            raise ValueError("alignment must be a power of two >= 8")
        self.path = os.fspath(path)
        self.alignment = alignment
        self.zstd_level = zstd_level
        self._records: list[tuple[int, int, int, int, int]] = []
        self._out = AtomicFile(self.path)
        self._f = self._out.file
        self._pos = 0
        self._write(b"\0" * PREAMBLE_SIZE)  # placeholder, rewritten by finish()
        self._cctx = None
        self.finished = False

    def _write(self, data) -> None:
        self._f.write(data)
        self._pos += len(data)

    def _pad_to(self, alignment: int) -> None:
        pad = align_up(self._pos, alignment) - self._pos
        if pad:
            self._write(b"\0" * pad)

    def add_payload(self, data, compress: str = "auto") -> int:
        """Append one payload; returns its id. compress: 'auto' (zstd if it pays), 'always', 'never'."""
        raw = bytes(data)
        codec, stored = CODEC_RAW, raw
        if compress != "never" and raw:
            if self._cctx is None:
                import zstandard

                self._cctx = zstandard.ZstdCompressor(level=self.zstd_level, write_content_size=True, threads=0)
            packed = self._cctx.compress(raw)
            if compress == "always" or len(packed) <= (1 - MIN_ZSTD_SAVING) * len(raw):
                codec, stored = CODEC_ZSTD, packed
        self._pad_to(self.alignment)
        self._records.append((self._pos, len(stored), len(raw), zlib.crc32(stored), codec))
        self._write(stored)
        return len(self._records) - 1

    def stored_length(self, pid: int) -> int:
        return self._records[pid][1]

    def add_json(self, obj) -> int:
        return self.add_payload(dumps_json(obj), compress="always")

    def add_array(self, a: np.ndarray, compress: str = "auto") -> int:
        a = np.asarray(a)  # tobytes() is C-order; ascontiguousarray would turn a 0-d array into 1-d
        return self.add_payload(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes(), compress)

    def finish(self, index: dict) -> None:
        """Write index + table + preamble, fsync, and atomically rename onto the target path."""
        try:
            self._pad_to(8)
            index_offset = self._pos
            index_raw = dumps_json(index)
            self._write(index_raw)
            self._pad_to(8)
            table_offset = self._pos
            table = np.zeros(len(self._records), dtype=TABLE_DTYPE)
            for i, (off, stored, raw, crc, codec) in enumerate(self._records):
                table[i] = (off, stored, raw, crc, codec, b"\0\0\0")
            table_raw = table.tobytes()
            self._write(table_raw)
            pre = Preamble(
                major=MAJOR, minor=minor_version(index), preamble_size=PREAMBLE_SIZE, alignment=self.alignment, flags=0,
                index_offset=index_offset, index_length=len(index_raw), table_offset=table_offset,
                table_count=len(self._records), index_crc32=zlib.crc32(table_raw, zlib.crc32(index_raw)),
            )
            self._f.seek(0)
            self._f.write(pre.pack())
            self._out.commit()
            self.finished = True
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the temporary file; the target path is left exactly as it was."""
        if not self.finished:
            self._out.abort()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.finished:
            self.abort()

