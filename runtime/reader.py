"""Validating NDC reader: `Bundle.open(path)` reads the preamble and the index, nothing else (the chunked
tensors' entries and their checks: tensor_entry.py).

Everything the spec (format_spec/NDC-v1.md §5) requires is checked at open, before any payload
is touched; each payload is then checked (crc32, zstd frame size) when it is read. Every byte read
from the file is counted, so run statistics can report exactly what an inference cost.
"""

from __future__ import annotations

import mmap as _mmap
import os
import threading
import zlib
from typing import Iterable

import numpy as np

from .callstats import count_read
from .errors import BundleError, corrupt
from .files import mapped_read, open_regular
from .format import (
    CODEC_RAW, CODEC_ZSTD, CODECS, MAX_INDEX_BYTES, MAX_JSON_PAYLOAD, MAX_PAYLOAD_RAW, PREAMBLE_SIZE, TABLE_DTYPE,
    ZSTD_MAX_RATIO, ZSTD_SLACK, Preamble, align_up,
)
from .moe_index import validate_moe
from .schema import ConstantsTable, Graph, Profile, Stats, check_dtype, check_index_info, check_name, check_shape, load_json
from .tensor_entry import TensorEntry, validate_tensors  # noqa: F401  (TensorEntry: re-exported)
from .tiers import PackedWeight, TransposedZeroPointTier, ZeroPointTier

# Index and table are read in one positioned read when at most this many bytes lie between them (the
# writer pads to 8); a larger gap is legal but never read.
_MAX_READ_GAP = 4096
_TABLE_BLOCK = 1 << 16  # records checked per vectorised step
_PACK_BATCH = 8 << 20  # payload bytes read at a time by read_packed

_zstd = None
_zstd_local = threading.local()  # one decompressor per thread, reused (Gemma's open: 2,059 payloads)


def _zstd_decompressor():
    # zstandard is imported on first compressed payload only: a bundle of raw payloads never pays for it.
    global _zstd
    if _zstd is None:
        import zstandard

        _zstd = zstandard
    d = getattr(_zstd_local, "d", None)
    if d is None:
        d = _zstd_local.d = _zstd.ZstdDecompressor()
    return d


_fail = corrupt


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
        # One check for every kind of wrong path (missing, directory, FIFO, device): a clear BundleError.
        self._fd = open_regular(self.path, "bundle", BundleError)
        try:
            self.file_size = os.fstat(self._fd).st_size
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

    def _pread_array(self, offset: int, length: int) -> np.ndarray:
        """`_pread` into a fresh NumPy buffer: from 4 MiB on NumPy asks for transparent huge pages, so
        reading Gemma's weights in 8 MiB batches faults a few 2 MiB pages per batch, not 2048 small ones."""
        if self._mm is not None or not hasattr(os, "preadv"):  # (no preadv: macOS before Python 3.12)
            return np.frombuffer(self._pread(offset, length), np.uint8)
        out = np.empty(length, np.uint8)
        got = os.preadv(self._fd, [out], offset)
        if got != length:
            raise BundleError(f"truncated bundle: wanted {length} bytes at offset {offset}, got {got}")
        return out

    def _open_index(self) -> None:
        head = os.pread(self._fd, PREAMBLE_SIZE, 0)
        self.preamble = p = Preamble.parse(head, self.file_size)
        index_end = p.index_offset + p.index_length
        table_len = p.table_count * TABLE_DTYPE.itemsize
        if p.table_offset - index_end <= _MAX_READ_GAP:
            tail = memoryview(self._pread(p.index_offset, self.file_size - p.index_offset))  # slices: no copies
            index_raw, table_raw = bytes(tail[: p.index_length]), tail[p.table_offset - p.index_offset :]
            self.index_bytes = PREAMBLE_SIZE + len(tail)
        else:  # a gap between index and table is never read (it may be a sparse hole of any size)
            index_raw, table_raw = self._pread(p.index_offset, p.index_length), self._pread(p.table_offset, table_len)
            self.index_bytes = PREAMBLE_SIZE + len(index_raw) + len(table_raw)
        crc = zlib.crc32(table_raw, zlib.crc32(index_raw))
        if crc != p.index_crc32:
            _fail("index checksum mismatch")
        index = load_json(index_raw, "index", MAX_INDEX_BYTES)
        if not isinstance(index, dict):
            _fail("index must be a JSON object")
        self.table = np.frombuffer(table_raw, dtype=TABLE_DTYPE)
        self._table_u8 = np.frombuffer(table_raw, np.uint8).reshape(len(self.table), TABLE_DTYPE.itemsize)
        self._check_table()
        self.index = index
        self._validate_index()

    def _check_table(self) -> None:
        """Rule 5 over up to 2^22 records, vectorised in blocks (temporaries stay small next to the table
        itself) and in uint64: each value is first bounded by the index offset (< 2^63), so offset + stored
        cannot wrap."""
        t, p = self.table, self.preamble
        if len(t) == 0:
            return
        limit, align = np.uint64(p.index_offset), np.uint64(p.alignment)
        known = np.zeros(256, bool)
        known[list(CODECS)] = True
        prev_end = align_up(p.preamble_size, p.alignment)  # the payload area starts here
        z_raw = z_stored = 0
        for lo in range(0, len(t), _TABLE_BLOCK):
            blk = t[lo : lo + _TABLE_BLOCK]
            off, stored, raw, codec = blk["offset"], blk["stored"], blk["raw"], blk["codec"]
            if np.any(off > limit) or np.any(stored > limit):
                _fail("payload outside the payload area")
            end = off + stored
            if np.any(off % align != 0):
                _fail("payload offset not aligned")
            if int(off[0]) < prev_end:  # before the payload area, or before the previous block's end
                _fail("payload outside the payload area" if lo == 0 else "payload ranges overlap or are not sorted")
            if np.any(off[1:] < end[:-1]):
                _fail("payload ranges overlap or are not sorted")
            if int(end.max()) > p.index_offset:
                _fail("payload outside the payload area")
            prev_end = int(end[-1])
            if not known[codec].all():
                _fail(f"unknown payload codec {sorted(set(np.unique(codec).tolist()) - set(CODECS))}")
            if np.any(raw > np.uint64(MAX_PAYLOAD_RAW)):
                _fail("payload raw length exceeds the cap")
            is_raw = codec == CODEC_RAW
            if np.any((stored != raw) & is_raw):
                _fail("uncompressed payload whose stored and raw lengths differ")
            if self._table_u8[lo : lo + _TABLE_BLOCK, 29:].any():
                _fail("reserved bytes of the payload table are not zero")
            z_raw += int(raw[~is_raw].sum(dtype=np.uint64))  # raw <= 2^31: no block sum can wrap
            z_stored += int(stored[~is_raw].sum(dtype=np.uint64))
        if z_raw > ZSTD_MAX_RATIO * z_stored + ZSTD_SLACK:
            _fail(f"compressed payloads decode to {z_raw} bytes from {z_stored}, more than the spec's "
                  f"{ZSTD_MAX_RATIO}x + {ZSTD_SLACK >> 20} MiB")

    def claim_payload(self, x, what: str, used: set, allow_empty: bool = False) -> int:
        """Payload id `x` of an index entry: in range and referenced by nothing else in `used` (for
        validators of index keys outside this module); allow_empty: -1 (an empty chunk) passes too."""
        return self._pid(x, what, used, allow_empty)

    def claim_payloads(self, xs: list, what: str, used: set, allow_empty: bool = False) -> None:
        """`claim_payload` for every id of the list `xs`, as set operations (Gemma's index lists 34,880
        ids: one call per id was ~40 ms of every open); a bad id raises as `claim_payload` would."""
        lo = -1 if allow_empty else 0
        if xs and all(type(x) is int for x in xs) and lo <= min(xs) and max(xs) < len(self.table):
            ids = set(xs)
            ids.discard(-1)
            if len(ids) == len(xs) - (xs.count(-1) if allow_empty else 0) and used.isdisjoint(ids):
                used |= ids
                return
        for x in xs:  # a bad id somewhere: the first one raises
            self._pid(x, what, used, allow_empty)

    def _pid(self, x, what: str, used: set, allow_empty: bool = False) -> int:
        """`claim_payload`; allow_empty: -1 (an empty chunk) passes, claiming nothing."""
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
        check_name(d.get("name"), f"{what} name")
        dt = check_dtype(d.get("dtype"), what)
        n = check_shape(d.get("shape"), what)
        pid = self._pid(d.get("payload"), what, used)
        if int(self.table["raw"][pid]) != n * dt.itemsize:
            _fail(f"{what}: payload length does not match shape and dtype")

    def _validate_index(self) -> None:
        ix, used = self.index, set()
        if ix.get("format") != "ndc":
            _fail("index 'format' is not 'ndc'")
        check_index_info(ix)
        self.stats = Stats.from_json(ix.get("stats", {}))
        for key in ("graph", "profile"):
            if ix.get(key) is not None:
                pid = self._pid(ix[key], key, used)
                if int(self.table["raw"][pid]) > MAX_JSON_PAYLOAD:
                    _fail(f"{key} payload decodes to {int(self.table['raw'][pid])} bytes, over the cap of {MAX_JSON_PAYLOAD}")
        consts = ix.get("constants")
        self.constants_table: ConstantsTable | None = None
        if consts is not None:
            if not isinstance(consts, dict):
                _fail("'constants' must be an object with a 'tensors' list")
            pid = self._pid(consts.get("payload"), "constants", used)
            self.constants_table = ConstantsTable.from_json(consts, int(self.table["raw"][pid]))
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
        self.tensors: dict[str, TensorEntry] = validate_tensors(self, ix.get("tensors"), used)
        # NDC 1.1 key `moe`: experts stored as chunk groups (runtime/moe_index.py, spec §4.5)
        self.moe = validate_moe(self, ix.get("moe"), used)
        from .lm_index import validate_lm  # NDC 1.1 key `lm`: a language model's tokenizer and settings (spec §4.6)

        self.lm = validate_lm(self, ix.get("lm"), used)

    # -- payloads ------------------------------------------------------------------------------
    def read_payload(self, pid: int) -> bytes:
        """Read one payload by positioned read, verify its checksum, decompress within its raw length."""
        return self._decode(pid, self._pread(int(self.table["offset"][pid]), int(self.table["stored"][pid])))

    def read_payloads(self, pids: Iterable[int], copy: bool = True) -> dict[int, bytes]:
        """Read several payloads, merging reads of neighbouring payloads into one positioned read.
        copy=False: an uncompressed payload is a memoryview into that read's buffer (which it keeps
        alive), for a caller that copies what it needs at once (`read_packed`)."""
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
            buf = memoryview(self._pread(start, end - start) if copy else self._pread_array(start, end - start))
            for pid in pids[i : j + 1]:
                o = int(t["offset"][pid]) - start
                out[pid] = self._decode(pid, buf[o : o + int(t["stored"][pid])], counted=False, copy=copy)
            # disk bytes: the payloads plus the alignment gaps between them
            count_read(self, int(sum(int(t["stored"][p]) for p in pids[i : j + 1])), end - start, j + 1 - i)
            i = j + 1
        return out

    def _decode(self, pid: int, stored, counted: bool = True, copy: bool = True) -> bytes:
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
        return bytes(stored) if copy and not isinstance(stored, bytes) else stored

    def read_json(self, pid: int, what: str | None = None):
        """A JSON payload (graph, profile), parsed within the spec's caps (format.MAX_JSON_PAYLOAD)."""
        return load_json(self.read_payload(pid), what or f"payload {pid}", MAX_JSON_PAYLOAD)

    @property
    def weight_shapes(self) -> dict[str, tuple]:
        """Shape of every chunked weight (rows first), for the engine's size checks of nadoo ops."""
        return {n: e.shape for n, e in self.tensors.items()}

    @property
    def payload_bytes(self) -> int:
        """Bytes of all payloads as stored: the bundle's real content, which scales run-time caps."""
        return int(self.table["stored"].sum(dtype=np.uint64))

    @staticmethod
    def _array(data: bytes, dtype: str, shape) -> np.ndarray:
        return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)

    def read_tensor(self, d: dict) -> np.ndarray:
        """A raw tensor payload described by {name, dtype, shape, payload} (sample inputs/outputs)."""
        return self._array(self.read_payload(d["payload"]), d["dtype"], d["shape"])

    def read_constants(self) -> dict[str, np.ndarray]:
        c = self.constants_table
        if c is None:
            return {}
        blob = self.read_payload(c.payload)
        return {e.name: np.frombuffer(blob, dtype=e.dtype, count=e.count, offset=e.offset).reshape(e.shape)
                for e in c.tensors}

    def graph(self) -> Graph:
        """The graph payload, validated (spec §4.3) against this bundle's constants, tensors and MoE layers."""
        if self.index.get("graph") is None:
            raise BundleError("bundle has no graph")
        g = self.read_json(self.index["graph"], "graph")
        consts = self.constants_table.names if self.constants_table else set()
        return Graph.from_json(g, where="corrupt bundle: graph", constants=consts, weights=self.tensors, moe=self.moe)

    def read_graph(self) -> dict:
        """The validated graph as a JSON-shaped dict (what `engine.Plan` takes)."""
        return self.graph().to_json()

    def profile(self) -> Profile | None:
        """The calibration profile, validated (spec §4.4): layers name chunked tensors, one value per chunk."""
        pid = self.index.get("profile")
        if pid is None:
            return None
        return Profile.from_json(self.read_json(pid, "profile"), chunks={n: e.n_chunks for n, e in self.tensors.items()},
                                 experts={n: m.n_experts for n, m in self.moe.items()})

    def read_profile(self) -> dict | None:
        p = self.profile()
        return None if p is None else p.to_json()

    def decode_chunk(self, tensor: TensorEntry, i: int, tier: str, data: bytes | dict | None = None) -> np.ndarray:
        """Chunk i of a tensor at a tier as float32 [rows_in_chunk, row_len]; all-zero for an empty chunk.
        `data`: the chunk's payload (its first one), or {pid: payload} holding `tensor.chunk_pids(tier, i)`;
        what is missing is read here."""
        r, k = tensor.chunk_rows(i), tensor.row_len
        pids = tensor.chunk_pids(tier, i)
        if not pids:
            return np.zeros((r, k), np.float32)
        have = data if isinstance(data, dict) else ({pids[0]: data} if data is not None else {})
        missing = [p for p in pids if p not in have]
        if missing:
            have = {**have, **self.read_payloads(missing)}
        layout = tensor.layouts[tier][0]
        return layout.decode(tier, [have[p] for p in pids], r, k, tensor.effective_group(layout))

    def read_packed(self, name: str, tier: str, order=None) -> PackedWeight | None:
        """A zp-coded tensor at one tier as stored (every chunk read and counted, like `read_weight`), in
        the inputs of ONNX Runtime's MatMulNBits; None when the tensor is not zp-coded at that tier
        (legacy scale+min, nested planes, float32, or the tier is not stored). A `zp_t` tensor gives the
        PackedWeight of its transpose (`of_transpose`: MatMulNBits computes x·W of the stored W). `order`:
        the packed row of each stored row (a permutation; a row-grouped layout only)."""
        e = self.tensors.get(name)
        if e is None:
            raise BundleError(f"no chunked tensor {name!r} in the bundle")
        layout, ids = e.layouts.get(tier, (None, None))
        if not isinstance(layout, ZeroPointTier) or (order is not None and isinstance(layout, TransposedZeroPointTier)):
            return None  # (a transpose's rows are the tensor's columns: a row order does not apply)
        pids = [int(p) for p in ids[0]]
        sizes = [int(self.table["stored"][p]) if p >= 0 else 0 for p in pids]

        def chunks():  # read in batches of about _PACK_BATCH bytes: the tensor's payloads are never all held
            i = 0
            while i < len(pids):
                j, size = i, 0
                while j < len(pids) and (j == i or size + sizes[j] <= _PACK_BATCH):
                    size += sizes[j]
                    j += 1
                data = self.read_payloads((p for p in pids[i:j] if p >= 0), copy=False)  # copied into the result
                for c in range(i, j):
                    yield e.chunk_rows(c), data.pop(pids[c], None)
                i = j

        return layout.packed(chunks(), e.rows, e.row_len, e.effective_group(layout), order)

    def read_weight(self, name: str, tier: str, transposed: bool = False) -> np.ndarray:
        """The whole tensor at one tier, in its stored shape (rows first); `transposed`: as the contiguous
        [row_len, rows] transpose (each chunk written there as it is decoded: no second pass, no copy)."""
        e = self.tensors[name]
        # filled chunk by chunk: one copy of the tensor is held
        out = np.empty((e.row_len, e.rows) if transposed else (e.rows, e.row_len), np.float32)
        for i in range(e.n_chunks):
            block = self.decode_chunk(e, i, tier)
            if transposed:
                out[:, e.bounds[i] : e.bounds[i + 1]] = block.T
            else:
                out[e.bounds[i] : e.bounds[i + 1]] = block
        return out if transposed else out.reshape(e.shape)

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
