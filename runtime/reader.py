"""Validating NDC reader: `Bundle.open(path)` reads the preamble and the index, nothing else.

Everything the spec (format_spec/NDC-v1.md §5) requires is checked at open, before any payload
is touched; each payload is then checked (crc32, zstd frame size) when it is read. Every byte read
from the file is counted, so run statistics can report exactly what an inference cost.
"""

from __future__ import annotations

import json
import mmap as _mmap
import os
import stat
import zlib
from typing import Iterable

import numpy as np

from . import qcodec
from .callstats import count_read
from .errors import BundleError, corrupt
from .files import mapped_read, open_regular
from .format import (
    CODEC_RAW, CODEC_ZSTD, CODECS, DTYPES, MAX_DIM, MAX_GROUP_SIZE, MAX_ELEMENTS, MAX_NAME_LEN, MAX_PAYLOAD_RAW, MAX_RANK,
    PREAMBLE_SIZE, TABLE_DTYPE, TIER_BITS, TIERS, Preamble, align_up,
)
from .moe_index import validate_moe

_zstd = None


def _zstd_decompressor():
    # zstandard is imported on first compressed payload only: a bundle of raw payloads never pays for it.
    global _zstd
    if _zstd is None:
        import zstandard

        _zstd = zstandard
    return _zstd.ZstdDecompressor()


class TensorEntry:
    """One chunked weight tensor of the index: rows (neurons, channels, embedding rows) split into chunks."""

    __slots__ = ("name", "kind", "shape", "rows", "row_len", "group_size", "bounds", "tiers", "errors", "meta",
                 "planes")

    def __init__(self, d: dict):
        self.name = d["name"]
        self.kind = d["kind"]
        self.shape = tuple(d["shape"])
        self.rows = self.shape[0]
        self.row_len = int(np.prod(self.shape[1:], dtype=np.int64))
        self.group_size = d["group_size"]
        self.bounds = np.asarray(d["bounds"], dtype=np.int64)
        self.tiers = {t: np.asarray(p, dtype=np.int64) for t, p in d["tiers"].items()}
        self.errors = d.get("errors", {})
        self.meta = d
        # (1.1) nested bit-planes: planes[p][c] = payload of plane p (A, B, C) of chunk c. The tiers they
        # serve (q2 = A, q4 = A+B, q8 = A+B+C) appear in `tiers` with plane A's ids, so policies see them
        # as available and empty chunks (-1) as empty; `chunk_pids` names every payload a read needs.
        # Filled by the reader's validation (Bundle._check_nested).
        self.planes: list[np.ndarray] = []

    def is_nested(self, tier: str) -> bool:
        return bool(self.planes) and tier in ("q2", "q4", "q8") and tier not in self.meta["tiers"]

    def chunk_pids(self, tier: str, i: int) -> list[int]:
        """Every payload id chunk i at `tier` is decoded from (one, or 1-3 nested planes); [] if empty."""
        if self.is_nested(tier):
            pids = [int(p[i]) for p in self.planes[:qcodec.NESTED_TIER_PLANES[TIER_BITS[tier]]]]
        else:
            pids = [int(self.tiers[tier][i])]
        return [] if pids[0] < 0 else pids

    @property
    def n_chunks(self) -> int:
        return len(self.bounds) - 1

    def chunk_rows(self, i: int) -> int:
        return int(self.bounds[i + 1] - self.bounds[i])

    def effective_group(self) -> int:
        return min(self.group_size, self.row_len)

    def payload_nbytes(self, tier: str, i: int) -> int:
        r = self.chunk_rows(i)
        if tier == "f32":
            return r * self.row_len * 4
        if self.is_nested(tier):
            n = qcodec.NESTED_TIER_PLANES[TIER_BITS[tier]]
            return sum(qcodec.nested_plane_nbytes(r, self.row_len, self.effective_group(), p) for p in range(n))
        return qcodec.payload_nbytes(r, self.row_len, self.effective_group(), TIER_BITS[tier])


_fail = corrupt


def _check_name(x, what: str) -> str:
    if not isinstance(x, str) or not 0 < len(x) <= MAX_NAME_LEN:
        _fail(f"{what} must be a string of 1..{MAX_NAME_LEN} characters")
    return x


def _check_shape(shape, what: str) -> int:
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        _fail(f"{what}: shape must be a list of at most {MAX_RANK} dims")
    n = 1
    for d in shape:
        if type(d) is not int or not 0 <= d <= MAX_DIM:
            _fail(f"{what}: bad dimension {d!r}")
        n *= d
    if n > MAX_ELEMENTS:
        _fail(f"{what}: {n} elements exceed the cap")
    return n


def _check_dtype(dt, what: str) -> np.dtype:
    if dt not in DTYPES:
        _fail(f"{what}: unsupported dtype {dt!r}")
    return np.dtype(dt).newbyteorder("<")


class Bundle:
    """An open .ndc file. Use `Bundle.open(path)`; reads and their counters are safe from several threads."""

    def __init__(self, path: str, use_mmap: bool = False):
        self.path = os.fspath(path)
        self.bytes_read = 0  # payload bytes (as stored) read since open / last reset
        self.disk_bytes_read = 0  # every byte taken from the file for payloads, alignment gaps included
        self.payloads_read = 0
        self.index_bytes = 0  # preamble + index + table, read once at open
        self._fd = None
        self._mm = None
        try:
            self._fd = open_regular(self.path, "bundle", BundleError)  # never blocks on a FIFO
        except IsADirectoryError:
            raise BundleError(f"{self.path} is a directory, not an NDC bundle") from None
        except FileNotFoundError:
            raise BundleError(f"no such bundle: {self.path}") from None
        except OSError as e:
            raise BundleError(f"cannot open {self.path}: {e.strerror}") from None
        try:
            st = os.fstat(self._fd)
            if stat.S_ISDIR(st.st_mode):
                raise BundleError(f"{self.path} is a directory, not an NDC bundle")
            if not stat.S_ISREG(st.st_mode):
                raise BundleError(f"{self.path} is not a regular file")
            self.file_size = st.st_size
            self._open_index()
            if use_mmap and self.file_size:
                self._mm = _mmap.mmap(self._fd, 0, access=_mmap.ACCESS_READ)
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, path, use_mmap: bool = False) -> "Bundle":
        return cls(path, use_mmap)

    # -- low level -----------------------------------------------------------------------------
    def _pread(self, offset: int, length: int) -> bytes:
        if self._mm is not None:
            return mapped_read(self._mm, self._fd, offset, length)
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise BundleError(f"truncated bundle: wanted {length} bytes at offset {offset}, got {len(data)}")
        return data

    def _open_index(self) -> None:
        head = os.pread(self._fd, PREAMBLE_SIZE, 0)
        self.preamble = p = Preamble.parse(head, self.file_size)
        tail = self._pread(p.index_offset, self.file_size - p.index_offset)
        self.index_bytes = PREAMBLE_SIZE + len(tail)
        index_raw = tail[: p.index_length]
        table_raw = tail[p.table_offset - p.index_offset :]
        crc = zlib.crc32(table_raw, zlib.crc32(index_raw))
        if crc != p.index_crc32:
            _fail("index checksum mismatch")
        try:
            index = json.loads(index_raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            _fail("index is not valid UTF-8 JSON")
        if not isinstance(index, dict):
            _fail("index must be a JSON object")
        self.table = np.frombuffer(table_raw, dtype=TABLE_DTYPE)
        self._check_table()
        self.index = index
        self._validate_index()

    def _check_table(self) -> None:
        t, p = self.table, self.preamble
        if len(t) == 0:
            return
        off = t["offset"].astype(object)  # exact integer arithmetic for the range checks
        end = off + t["stored"].astype(object)
        if np.any(t["offset"] % p.alignment != 0):
            _fail("payload offset not aligned")
        if off[0] < align_up(p.preamble_size, p.alignment) or end[-1] > p.index_offset:
            _fail("payload outside the payload area")
        if len(t) > 1 and np.any(off[1:] < end[:-1]):
            _fail("payload ranges overlap or are not sorted")
        if np.any(~np.isin(t["codec"], list(CODECS))):
            _fail(f"unknown payload codec {sorted(set(t['codec'].tolist()) - set(CODECS))}")
        if np.any(t["raw"] > MAX_PAYLOAD_RAW):
            _fail("payload raw length exceeds the cap")
        raw = t["codec"] == CODEC_RAW
        if np.any(t["stored"][raw] != t["raw"][raw]):
            _fail("uncompressed payload whose stored and raw lengths differ")
        if np.any(np.frombuffer(t.tobytes(), np.uint8).reshape(len(t), -1)[:, 29:] != 0):
            _fail("reserved bytes of the payload table are not zero")

    def claim_payload(self, x, what: str, used: set) -> int:
        """Payload id `x` of an index entry: in range and referenced by nothing else in `used` (for
        validators of index keys outside this module)."""
        return self._pid(x, what, used)

    def _pid(self, x, what: str, used: set, allow_empty: bool = False) -> int:
        if type(x) is not int or not (-1 if allow_empty else 0) <= x < len(self.table):
            _fail(f"{what}: payload id {x!r} out of range")
        if x >= 0:
            if x in used:
                _fail(f"{what}: payload {x} referenced twice")
            used.add(x)
        return x

    def _check_raw_tensor(self, d, what: str, used: set) -> None:
        if not isinstance(d, dict):
            _fail(f"{what} must be an object")
        _check_name(d.get("name"), f"{what} name")
        dt = _check_dtype(d.get("dtype"), what)
        n = _check_shape(d.get("shape"), what)
        pid = self._pid(d.get("payload"), what, used)
        if int(self.table["raw"][pid]) != n * dt.itemsize:
            _fail(f"{what}: payload length does not match shape and dtype")

    def _validate_index(self) -> None:
        ix, used = self.index, set()
        if ix.get("format") != "ndc":
            _fail("index 'format' is not 'ndc'")
        for key in ("graph", "profile"):
            if ix.get(key) is not None:
                self._pid(ix[key], key, used)
        consts = ix.get("constants")
        if consts is not None:
            if not isinstance(consts, dict) or not isinstance(consts.get("tensors"), list):
                _fail("'constants' must be an object with a 'tensors' list")
            pid = self._pid(consts.get("payload"), "constants", used)
            blob = int(self.table["raw"][pid])
            for c in consts["tensors"]:
                if not isinstance(c, dict):
                    _fail("constant entry must be an object")
                _check_name(c.get("name"), "constant name")
                dt = _check_dtype(c.get("dtype"), f"constant {c['name']}")
                n = _check_shape(c.get("shape"), f"constant {c['name']}")
                off = c.get("offset")
                if type(off) is not int or off < 0 or off + n * dt.itemsize > blob:
                    _fail(f"constant {c['name']} lies outside the constants payload")
        sample = ix.get("sample")
        if sample is not None:
            if not isinstance(sample, dict):
                _fail("'sample' must be an object")
            for side in ("inputs", "outputs"):
                items = sample.get(side)
                if not isinstance(items, list):
                    _fail(f"sample {side} must be a list")
                for d in items:
                    self._check_raw_tensor(d, f"sample {side[:-1]}", used)
        tensors = ix.get("tensors")
        if not isinstance(tensors, list):
            _fail("'tensors' must be a list")
        self.tensors: dict[str, TensorEntry] = {}
        for d in tensors:
            if not isinstance(d, dict):
                _fail("tensor entry must be an object")
            name = _check_name(d.get("name"), "tensor name")
            if name in self.tensors:
                _fail(f"tensor {name} listed twice")
            if not isinstance(d.get("kind"), str):
                _fail(f"tensor {name}: missing kind")
            shape = d.get("shape")
            if _check_shape(shape, f"tensor {name}") == 0 or len(shape) < 2:
                _fail(f"tensor {name}: a chunked tensor needs rank >= 2 and no zero dims")
            g = d.get("group_size")
            if type(g) is not int or not 1 <= g <= MAX_GROUP_SIZE:
                _fail(f"tensor {name}: bad group_size {g!r}")
            b = d.get("bounds")
            if (not isinstance(b, list) or len(b) < 2 or any(type(x) is not int for x in b)
                    or b[0] != 0 or b[-1] != shape[0] or any(y <= x for x, y in zip(b, b[1:]))):
                _fail(f"tensor {name}: chunk bounds must rise strictly from 0 to {shape[0]}")
            tiers = d.get("tiers")
            nested = d.get("nested")
            if (not isinstance(tiers, dict) or not (tiers or nested is not None)
                    or any(t not in TIERS for t in tiers)):
                _fail(f"tensor {name}: tiers must be a non-empty subset of {TIERS}")
            for t, pids in tiers.items():
                if not isinstance(pids, list) or len(pids) != len(b) - 1:
                    _fail(f"tensor {name}: tier {t} must list one payload per chunk")
            e = TensorEntry(d)
            for t, pids in tiers.items():
                for i, pid in enumerate(pids):
                    if self._pid(pid, f"tensor {name} tier {t}", used, allow_empty=True) >= 0:
                        if int(self.table["raw"][pid]) != e.payload_nbytes(t, i):
                            _fail(f"tensor {name} tier {t} chunk {i}: payload length does not match the layout")
            if nested is not None:
                self._check_nested(e, nested, used)
            self.tensors[name] = e
        # NDC 1.1 key `moe`: experts stored as chunk groups (runtime/moe_index.py, spec §4.5)
        self.moe = validate_moe(self, ix.get("moe"), used)

    def _check_nested(self, e: TensorEntry, nested, used: set) -> None:
        """(1.1) `nested` = {"planes": [A ids, B ids, C ids]} (a prefix of 1-3 planes), spec §4.2b."""
        name, n = e.name, e.n_chunks
        planes = nested.get("planes") if isinstance(nested, dict) else None
        if not isinstance(planes, list) or not 1 <= len(planes) <= 3:
            _fail(f"tensor {name}: nested must be an object with a list of 1 to 3 planes")
        served = [f"q{b}" for b, k in qcodec.NESTED_TIER_PLANES.items() if k <= len(planes)]
        if any(t in e.meta["tiers"] for t in served):
            _fail(f"tensor {name}: tier stored both separately and as nested planes")
        for p, pids in enumerate(planes):
            if not isinstance(pids, list) or len(pids) != n:
                _fail(f"tensor {name}: nested plane {'ABC'[p]} must list one payload per chunk")
            for i, pid in enumerate(pids):
                if type(pid) is not int:
                    _fail(f"tensor {name}: nested plane {'ABC'[p]}: payload id {pid!r} out of range")
                if (pid < 0) != (planes[0][i] < 0):
                    _fail(f"tensor {name} chunk {i}: an empty chunk must be empty (-1) in every nested plane")
                if self._pid(pid, f"tensor {name} nested plane {'ABC'[p]}", used, allow_empty=True) >= 0:
                    want = qcodec.nested_plane_nbytes(e.chunk_rows(i), e.row_len, e.effective_group(), p)
                    if int(self.table["raw"][pid]) != want:
                        _fail(f"tensor {name} nested plane {'ABC'[p]} chunk {i}: payload length does not match the layout")
        e.planes = [np.asarray(p, dtype=np.int64) for p in planes]
        for t in served:
            e.tiers[t] = e.planes[0]

    # -- payloads ------------------------------------------------------------------------------
    def read_payload(self, pid: int) -> bytes:
        """Read one payload by positioned read, verify its checksum, decompress within its raw length."""
        return self._decode(pid, self._pread(int(self.table["offset"][pid]), int(self.table["stored"][pid])))

    def read_payloads(self, pids: Iterable[int]) -> dict[int, bytes]:
        """Read several payloads, merging reads of neighbouring payloads into one positioned read."""
        pids = sorted(set(int(p) for p in pids))
        out: dict[int, bytes] = {}
        t = self.table
        i = 0
        while i < len(pids):
            j = i
            start = int(t["offset"][pids[i]])
            end = start + int(t["stored"][pids[i]])
            # Merge while the next payload starts within one alignment unit of where this run ends.
            while j + 1 < len(pids) and int(t["offset"][pids[j + 1]]) - end < self.preamble.alignment:
                j += 1
                end = int(t["offset"][pids[j]]) + int(t["stored"][pids[j]])
            buf = memoryview(self._pread(start, end - start))
            for pid in pids[i : j + 1]:
                o = int(t["offset"][pid]) - start
                out[pid] = self._decode(pid, buf[o : o + int(t["stored"][pid])], counted=False)
            # disk bytes: the payloads plus the alignment gaps between them
            count_read(self, int(sum(int(t["stored"][p]) for p in pids[i : j + 1])), end - start, j + 1 - i)
            i = j + 1
        return out

    def _decode(self, pid: int, stored, counted: bool = True) -> bytes:
        rec = self.table[pid]
        if counted:
            count_read(self, int(rec["stored"]), int(rec["stored"]), 1)
        if zlib.crc32(stored) != int(rec["crc32"]):
            _fail(f"payload {pid} checksum mismatch")
        raw_len = int(rec["raw"])
        if int(rec["codec"]) == CODEC_ZSTD:
            d = _zstd_decompressor()
            try:
                # Frames must declare their size, and it must be the stored raw length: no unbounded output.
                params = _zstd.get_frame_parameters(stored)
                if params.content_size != raw_len:
                    _fail(f"payload {pid}: zstd frame size disagrees with the index")
                data = d.decompress(stored, max_output_size=raw_len)
            except _zstd.ZstdError:
                _fail(f"payload {pid}: bad zstd frame")
            if len(data) != raw_len:
                _fail(f"payload {pid}: decompressed length disagrees with the index")
            return data
        return bytes(stored) if not isinstance(stored, bytes) else stored

    def read_json(self, pid: int):
        try:
            return json.loads(self.read_payload(pid).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            _fail(f"payload {pid} is not valid JSON")

    @staticmethod
    def _array(data: bytes, dtype: str, shape) -> np.ndarray:
        return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)

    def read_tensor(self, d: dict) -> np.ndarray:
        """A raw tensor payload described by {name, dtype, shape, payload} (sample inputs/outputs)."""
        return self._array(self.read_payload(d["payload"]), d["dtype"], d["shape"])

    def read_constants(self) -> dict[str, np.ndarray]:
        c = self.index.get("constants")
        if not c:
            return {}
        blob = self.read_payload(c["payload"])
        out = {}
        for e in c["tensors"]:
            dt = np.dtype(e["dtype"]).newbyteorder("<")
            n = int(np.prod(e["shape"], dtype=np.int64))
            out[e["name"]] = np.frombuffer(blob, dtype=dt, count=n, offset=e["offset"]).reshape(e["shape"])
        return out

    def read_graph(self) -> dict:
        if self.index.get("graph") is None:
            raise BundleError("bundle has no graph")
        g = self.read_json(self.index["graph"])
        if not isinstance(g, dict) or not isinstance(g.get("nodes"), list):
            _fail("graph payload is not a graph object")
        return g

    def read_profile(self) -> dict | None:
        pid = self.index.get("profile")
        return None if pid is None else self.read_json(pid)

    def decode_chunk(self, tensor: TensorEntry, i: int, tier: str, data: bytes | dict | None = None) -> np.ndarray:
        """Chunk i of a tensor at a tier as float32 [rows_in_chunk, row_len]; all-zero for an empty chunk.
        `data`: the chunk's payload, or {pid: payload} holding `tensor.chunk_pids(tier, i)`; what is
        missing is read here."""
        r, k = tensor.chunk_rows(i), tensor.row_len
        if tensor.is_nested(tier):  # (1.1) nested planes: `data` may be plane A alone or {pid: bytes}
            pids = tensor.chunk_pids(tier, i)
            if not pids:
                return np.zeros((r, k), np.float32)
            have = data if isinstance(data, dict) else ({pids[0]: data} if data is not None else {})
            missing = [p for p in pids if p not in have]
            if missing:
                have = {**have, **self.read_payloads(missing)}
            return qcodec.dequantize_nested([have[p] for p in pids], r, k, tensor.effective_group(), TIER_BITS[tier])
        pid = int(tensor.tiers[tier][i])
        if pid < 0:
            return np.zeros((r, k), np.float32)
        if isinstance(data, dict):
            data = data.get(pid)
        if data is None:
            data = self.read_payload(pid)
        if tier == "f32":
            return np.frombuffer(data, dtype="<f4").reshape(r, k)
        return qcodec.dequantize(data, r, k, tensor.effective_group(), TIER_BITS[tier])

    def read_weight(self, name: str, tier: str) -> np.ndarray:
        """The whole tensor at one tier, in its stored shape (rows first)."""
        e = self.tensors[name]
        parts = [self.decode_chunk(e, i, tier) for i in range(e.n_chunks)]
        return np.concatenate(parts, axis=0).reshape(e.shape)

    def reset_counters(self) -> None:
        self.bytes_read = 0
        self.disk_bytes_read = 0
        self.payloads_read = 0

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
