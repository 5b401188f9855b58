"""Validating NDC reader: `Bundle.open(path)` reads the preamble and the index, nothing else.

Everything the spec (format_spec/NDC-v1.md §5) requires is checked at open, before any payload
is touched; each payload is then checked (crc32, zstd frame size) when it is read. Every byte read
from the file is counted, so run statistics can report exactly what an inference cost.
"""

from __future__ import annotations

import mmap as _mmap
import os
import zlib
from typing import Iterable

import numpy as np

from .callstats import count_read
from .errors import BundleError, corrupt
from .files import mapped_read, open_regular
from .format import (
    CODEC_RAW, CODEC_ZSTD, CODECS, MAX_GROUP_SIZE, MAX_INDEX_BYTES, MAX_JSON_PAYLOAD, MAX_PAYLOAD_RAW, PREAMBLE_SIZE,
    TABLE_DTYPE, TIERS, ZSTD_MAX_RATIO, ZSTD_SLACK, Preamble, align_up,
)
from .moe_index import validate_moe
from .schema import (
    ConstantsTable, Graph, Profile, Stats, check_dtype, check_index_info, check_name, check_shape, check_tensor_facts,
    check_zp_tiers, load_json,
)
from .tiers import (
    NESTED, SEPARATE, ZERO_POINT, ZERO_POINT_T, PackedWeight, TierLayout, TransposedZeroPointTier, ZeroPointTier,
)

# Index and table are read in one positioned read when at most this many bytes lie between them (the
# writer pads to 8); a larger gap is legal but never read.
_MAX_READ_GAP = 4096
_TABLE_BLOCK = 1 << 16  # records checked per vectorised step
_PACK_BATCH = 8 << 20  # payload bytes read at a time by read_packed

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
                 "layouts")

    def __init__(self, d: dict):
        self.name = d["name"]
        self.kind = d["kind"]
        self.shape = tuple(d["shape"])
        self.rows = self.shape[0]
        self.row_len = int(np.prod(self.shape[1:], dtype=np.int64))
        self.group_size = d["group_size"]
        self.bounds = np.asarray(d["bounds"], dtype=np.int64)
        self.errors = d.get("errors", {})
        self.meta = d
        # tier -> (layout, payload-id lists); `tiers` maps every tier, nested ones too, to its first
        # list, so policies see what is available and empty chunks (-1) as empty. Nested planes are
        # added by the reader's validation (Bundle._check_nested, `add_layout`).
        self.tiers: dict[str, np.ndarray] = {}
        self.layouts: dict[str, tuple[TierLayout, list[np.ndarray]]] = {}
        for t, pids in d["tiers"].items():
            self.add_layout(SEPARATE[t], [pids])
        for t, pids in d.get(ZeroPointTier.index_key, {}).items():  # (1.2) integer-zero-point tiers
            self.add_layout(ZERO_POINT[t], [pids])
        for t, pids in d.get(TransposedZeroPointTier.index_key, {}).items():  # (1.3) the same over transposes
            self.add_layout(ZERO_POINT_T[t], [pids])

    def add_layout(self, layout: TierLayout, ids: list) -> None:
        ids = [np.asarray(p, dtype=np.int64) for p in ids]
        for t in layout.tiers_of(ids):
            self.layouts[t] = (layout, ids)
            self.tiers[t] = ids[0]

    @property
    def planes(self) -> list[np.ndarray]:
        """The nested bit-plane id lists (A, B, C), [] when the tensor has none."""
        return next((ids for layout, ids in self.layouts.values() if layout is NESTED), [])

    def chunk_pids(self, tier: str, i: int) -> list[int]:
        """Every payload id chunk i at `tier` is decoded from (one, or 1-3 nested planes); [] if empty."""
        layout, ids = self.layouts[tier]
        return layout.chunk_pids(ids, tier, i)

    @property
    def n_chunks(self) -> int:
        return len(self.bounds) - 1

    def chunk_rows(self, i: int) -> int:
        return int(self.bounds[i + 1] - self.bounds[i])

    def effective_group(self, layout: TierLayout) -> int:
        return layout.group(self.row_len, self.group_size)

    def payload_nbytes(self, tier: str, i: int) -> int:
        """Raw bytes a read of chunk i at `tier` takes (every payload it needs)."""
        layout = self.layouts[tier][0]
        return layout.nbytes(tier, self.chunk_rows(i), self.row_len, self.effective_group(layout))

    def chunk_nbytes(self, tier: str) -> np.ndarray:
        """`payload_nbytes` of every chunk at `tier` (one computation per distinct chunk height)."""
        layout = self.layouts[tier][0]
        heights, where = np.unique(np.diff(self.bounds), return_inverse=True)
        g = self.effective_group(layout)
        return np.array([layout.nbytes(tier, int(r), self.row_len, g) for r in heights], np.int64)[where]

    def payload_sizes(self, layout: TierLayout, i: int) -> list[int]:
        """Raw length of each of chunk i's payloads in `layout`."""
        return layout.payload_sizes(self.chunk_rows(i), self.row_len, self.effective_group(layout))


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
        tensors = ix.get("tensors")
        if not isinstance(tensors, list):
            _fail("'tensors' must be a list")
        self.tensors: dict[str, TensorEntry] = {}
        for d in tensors:
            if not isinstance(d, dict):
                _fail("tensor entry must be an object")
            name = check_name(d.get("name"), "tensor name")
            if name in self.tensors:
                _fail(f"tensor {name} listed twice")
            if not isinstance(d.get("kind"), str):
                _fail(f"tensor {name}: missing kind")
            shape = d.get("shape")
            if check_shape(shape, f"tensor {name}") == 0 or len(shape) < 2:
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
            zp = check_zp_tiers(d, f"tensor {name}")
            zp_t = check_zp_tiers(d, f"tensor {name}", key=TransposedZeroPointTier.index_key)  # (1.3)
            if (not isinstance(tiers, dict) or not (tiers or zp or zp_t or nested is not None)
                    or any(t not in TIERS for t in tiers)):
                _fail(f"tensor {name}: tiers must be a non-empty subset of {TIERS}")
            if set(tiers) & set(zp):
                _fail(f"tensor {name}: tier stored both in tiers and in zp")
            if set(zp_t) & (set(tiers) | set(zp)):
                _fail(f"tensor {name}: tier stored both in zp_t and in tiers or zp")
            separate = [*tiers.items(), *zp.items(), *zp_t.items()]
            for t, pids in separate:
                if not isinstance(pids, list) or len(pids) != len(b) - 1:
                    _fail(f"tensor {name}: tier {t} must list one payload per chunk")
                for pid in pids:  # ids are checked before TensorEntry turns them into int64 arrays
                    self._pid(pid, f"tensor {name} tier {t}", used, allow_empty=True)
            e = TensorEntry(d)
            for t, _ in separate:
                p = e.tiers[t]
                bad = np.flatnonzero((p >= 0) & (self.table["raw"][np.maximum(p, 0)].astype(np.int64) != e.chunk_nbytes(t)))
                if bad.size:
                    _fail(f"tensor {name} tier {t} chunk {int(bad[0])}: payload length does not match the layout")
            if nested is not None:
                self._check_nested(e, nested, used)
            check_tensor_facts(d, e.n_chunks, set(e.tiers), f"tensor {name}")
            self.tensors[name] = e
        # NDC 1.1 key `moe`: experts stored as chunk groups (runtime/moe_index.py, spec §4.5)
        self.moe = validate_moe(self, ix.get("moe"), used)
        from .lm_index import validate_lm  # NDC 1.1 key `lm`: a language model's tokenizer and settings (spec §4.6)

        self.lm = validate_lm(self, ix.get("lm"), used)

    def _check_nested(self, e: TensorEntry, nested, used: set) -> None:
        """(1.1) `nested` = {"planes": [A ids, B ids, C ids]} (a prefix of 1-3 planes), spec §4.2b."""
        name, n = e.name, e.n_chunks
        planes = nested.get("planes") if isinstance(nested, dict) else None
        if not isinstance(planes, list) or not 1 <= len(planes) <= NESTED.n_payloads:
            _fail(f"tensor {name}: nested must be an object with a list of 1 to {NESTED.n_payloads} planes")
        if any(t in e.layouts for t in NESTED.tiers_of(planes)):
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
                    if int(self.table["raw"][pid]) != e.payload_sizes(NESTED, i)[p]:
                        _fail(f"tensor {name} nested plane {'ABC'[p]} chunk {i}: payload length does not match the layout")
        e.add_layout(NESTED, planes)

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

    def read_packed(self, name: str, tier: str) -> PackedWeight | None:
        """A zp-coded tensor at one tier as stored (every chunk read and counted, like `read_weight`), in
        the inputs of ONNX Runtime's MatMulNBits; None when the tensor is not zp-coded at that tier
        (legacy scale+min, nested planes, float32, or the tier is not stored). A `zp_t` tensor gives the
        PackedWeight of its transpose (`of_transpose`: MatMulNBits computes x·W of the stored W)."""
        e = self.tensors.get(name)
        if e is None:
            raise BundleError(f"no chunked tensor {name!r} in the bundle")
        layout, ids = e.layouts.get(tier, (None, None))
        if not isinstance(layout, ZeroPointTier):
            return None
        pids = [int(p) for p in ids[0]]
        sizes = [int(self.table["stored"][p]) if p >= 0 else 0 for p in pids]

        def chunks():  # read in batches of about _PACK_BATCH bytes: the tensor's payloads are never all held
            i = 0
            while i < len(pids):
                j, size = i, 0
                while j < len(pids) and (j == i or size + sizes[j] <= _PACK_BATCH):
                    size += sizes[j]
                    j += 1
                data = self.read_payloads(p for p in pids[i:j] if p >= 0)
                for c in range(i, j):
                    yield e.chunk_rows(c), data.pop(pids[c], None)
                i = j

        return layout.packed(chunks(), e.rows, e.row_len, e.effective_group(layout))

    def read_weight(self, name: str, tier: str) -> np.ndarray:
        """The whole tensor at one tier, in its stored shape (rows first)."""
        e = self.tensors[name]
        out = np.empty((e.rows, e.row_len), np.float32)  # filled chunk by chunk: one copy of the tensor is held
        for i in range(e.n_chunks):
            out[e.bounds[i] : e.bounds[i + 1]] = self.decode_chunk(e, i, tier)
        return out.reshape(e.shape)

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
