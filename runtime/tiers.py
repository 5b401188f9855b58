"""Precision tiers: the one tier table of the project, and the two layouts a tensor stores tiers in.

The table: every tier an index may name (`TIERS`), its bits, the `--bits` spellings that select it
and the order in which a missing tier is replaced by the nearest stored one.

A layout (`TierLayout`) is a codec for one way of storing tiers; it knows both directions:
- which payloads a read of chunk i at a tier needs and how many bytes each has,
- `pack` (the compiler's writer: codes -> payload bytes) and `decode` (the reader: payloads -> float32).
Four implementations (format_spec/NDC-v1.md §4.2, §4.2b, §4.2c, §4.2d):
- `SeparateTier`: one payload per chunk for one tier (float32, or the scale+min grouped codec);
- `ZeroPointTier`: one payload per chunk for one quantized tier in the integer-zero-point codec (1.2),
  laid out as ONNX Runtime's MatMulNBits takes it (`PackedWeight`), the default of new compiles;
- `TransposedZeroPointTier` (1.3): the same codec over each chunk's transpose, so the groups run along
  the rows: for a weight stored [inputs, outputs] (a gated MLP's down projection) the groups are along
  its input axis, as MatMulNBits and GPTQ want them;
- `NestedTiers`: one 8-bit quantization stored as bit-planes A, B, C; q4 reads A+B, q8 A+B+C.
The byte-level work stays in runtime/qcodec.py; a layout only decides which of its functions apply.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import qcodec
from .errors import BundleError
from .format import TIERS  # the index's tier names, highest precision first

TIER_BITS = {"f32": 32, "q8": 8, "q6": 6, "q5": 5, "q4": 4, "q3": 3, "q2": 2}
QUANT_TIERS = tuple(t for t in TIERS if TIER_BITS[t] < 32)  # ("q8", "q6", "q5", "q4", "q3", "q2")
FLOAT_TIER = "f32"
# the quantized tiers a compile stores unless told otherwise (`--tiers`): q6 and q5 (1.4) are asked for,
# since most models get what they need from 8 and 4 bits and every stored tier costs compile time and file
DEFAULT_TIERS = ("q8", "q4", "q3", "q2")
# user-facing --bits spellings (run, export) -> tier
BITS_TO_TIER = {"8": "q8", "6": "q6", "5": "q5", "4": "q4", "3": "q3", "2": "q2", "float": "f32", "32": "f32",
                "f32": "f32"}


def _nearest(tier: str) -> tuple[str, ...]:
    # more bits first (the closest above, then upwards), then fewer (the closest below first); float32 last,
    # so a missing tier is never silently replaced by float32 while a quantized one is stored
    b = TIER_BITS[tier]
    up = sorted((t for t in QUANT_TIERS if TIER_BITS[t] > b), key=TIER_BITS.get)
    down = sorted((t for t in QUANT_TIERS if TIER_BITS[t] < b), key=TIER_BITS.get, reverse=True)
    return (tier, *up, *down, FLOAT_TIER)


# a tier the bundle lacks is replaced by the nearest one it has
NEAREST = {t: _nearest(t) for t in QUANT_TIERS}
# the widths ONNX Runtime's MatMulNBits takes (a 3-bit tier is handed over dequantized)
MATMUL_NBITS_BITS = (2, 4, 8)


# --bits source: the bits a tier needs to hold a GGUF format's values (the compiler records each tensor's
# format, NDC 1.4 `source_format`). Symmetric blocks (Q8_0, Q5_0, Q4_0, Q6_K's codes) fit a zp tier of their
# bits; formats with float minimums (Q4_1, Q5_1, the K-quants' mins) or sub-block scales cannot sit on an
# integer zero point exactly, so they take a tier one step up, where re-rounding costs a quarter of the
# file's own step. A float or unknown format: 8 bits.
SOURCE_BITS = {"Q8_0": 8, "Q8_1": 8, "Q8_K": 8, "Q6_K": 6, "Q5_0": 5, "Q5_1": 6, "Q5_K": 6, "Q4_0": 4,
               "Q4_1": 5, "Q4_K": 5, "Q3_K": 4, "Q2_K": 3}


def source_tier(fmt: str) -> str:
    """The tier that runs a tensor the source stored in format `fmt` at the file's precision."""
    return BITS_TO_TIER[str(SOURCE_BITS.get(str(fmt), 8))]


def tier_within(bits_per_weight: float, stored=QUANT_TIERS) -> str:
    """The quantized tier of `stored` with the most bits that fit a bits/weight budget (the lowest if none does)."""
    have = [t for t in QUANT_TIERS if t in stored] or list(QUANT_TIERS)
    return next((t for t in have if TIER_BITS[t] <= bits_per_weight), have[-1])


class TierLayout:
    """How a tensor stores the tiers in `serves`. `key` names the layout where the compiler reports
    its bytes; every chunk has `n_payloads` payloads (lists of ids `ids[p][chunk]`, -1 = empty chunk),
    of which a read at a tier needs the first `read_count(tier)`."""

    key: str
    serves: tuple[str, ...]
    n_payloads: int
    bits: int  # bits of the codes its payloads are packed from (32: float32, not quantized)
    quantized: bool

    def read_count(self, tier: str) -> int:
        raise NotImplementedError

    def payload_sizes(self, rows: int, row_len: int, group_size: int) -> list[int]:
        """Exact raw length of each of a chunk's payloads."""
        raise NotImplementedError

    def decode(self, tier: str, bufs: list, rows: int, row_len: int, group_size: int) -> np.ndarray:
        """The payloads `chunk_pids` names, in that order -> float32 [rows, row_len]."""
        raise NotImplementedError

    def group(self, row_len: int, group_size: int) -> int:
        """The effective group size of rows of `row_len` under the index's `group_size` (what the other
        methods take as `group_size`)."""
        return min(group_size, row_len)

    def pack(self, *args) -> list[bytes]:
        """One chunk's values -> its `n_payloads` payloads (the compiler's writer)."""
        raise NotImplementedError

    def ids_of(self, entry: dict) -> list | None:
        """This layout's payload-id lists in a tensor index entry, or None when it has none."""
        raise NotImplementedError

    def record(self, entry: dict, ids: list[list[int]]) -> None:
        """Write this layout's payload-id lists into a tensor index entry (compiler side)."""
        raise NotImplementedError

    def tiers_of(self, ids: list) -> tuple[str, ...]:
        """The tiers stored payload lists `ids` can serve (a nested prefix of planes serves fewer)."""
        return tuple(t for t in self.serves if self.read_count(t) <= len(ids))

    def chunk_pids(self, ids: list, tier: str, i: int) -> list[int]:
        """Every payload id chunk i at `tier` is decoded from; [] for an empty chunk."""
        pids = [int(p[i]) for p in ids[: self.read_count(tier)]]
        return [] if pids[0] < 0 else pids

    def nbytes(self, tier: str, rows: int, row_len: int, group_size: int) -> int:
        """Raw bytes a read of one chunk at `tier` takes."""
        return sum(self.payload_sizes(rows, row_len, group_size)[: self.read_count(tier)])


class SeparateTier(TierLayout):
    """One tier, one payload per chunk: float32 little-endian, or the grouped quantized codec."""

    n_payloads = 1
    codec = "minmax"  # of its quantized payloads (a key of CODECS)

    def __init__(self, tier: str):
        self.key = tier
        self.serves = (tier,)
        self.bits = TIER_BITS[tier]
        self.quantized = self.bits < 32

    def __repr__(self) -> str:
        return f"SeparateTier({self.key!r})"

    def read_count(self, tier: str) -> int:
        return 1

    def payload_sizes(self, rows, row_len, group_size):
        if not self.quantized:
            return [rows * row_len * 4]
        return [qcodec.payload_nbytes(rows, row_len, group_size, self.bits)]

    def decode(self, tier, bufs, rows, row_len, group_size):
        if not self.quantized:
            return np.frombuffer(bufs[0], dtype="<f4").reshape(rows, row_len)
        return qcodec.dequantize(bufs[0], rows, row_len, group_size, self.bits)

    def pack(self, values, scales=None, mins=None, group_size=None) -> list[bytes]:
        """float32: pack(weights); quantized: pack(codes, scales, mins, group_size)."""
        if not self.quantized:
            a = np.ascontiguousarray(values, np.float32)
            return [a.astype("<f4", copy=False).tobytes()]
        return [qcodec.pack(values, scales, mins, self.bits, group_size)]

    index_key = "tiers"  # the tensor entry's key that lists this layout's payload ids per tier

    def ids_of(self, entry):
        ids = entry.get(self.index_key, {}).get(self.key)
        return None if ids is None else [ids]

    def record(self, entry, ids):
        entry.setdefault(self.index_key, {})[self.key] = ids[0]


@dataclass(frozen=True)
class PackedWeight:
    """A zp-coded tensor as stored, in the inputs of ONNX Runtime's com.microsoft MatMulNBits (B, scales,
    zero_points with attributes N = rows, K = row_len, bits, block_size): w[r, k] =
    scales[r, k // block_size] * (code[r, k] - zero_point[r, k // block_size])."""

    codes: np.ndarray        # uint8 [rows, ng, block_size * bits // 8], per block LSB-first
    scales: np.ndarray       # float32 [rows, ng] (stored as float16: exact)
    zero_points: np.ndarray  # uint8 [rows, ceil(ng * bits / 8)], per row LSB-first
    bits: int
    block_size: int
    rows: int
    row_len: int
    of_transpose: bool = False  # the matrix packed is the stored tensor's transpose (x·W, not x·Wᵀ)

    def widened(self) -> "PackedWeight":
        """The same values with 8-bit codes and zero points: ONNX Runtime's kernels take 2, 4 and 8 bits,
        so a 6-, 5- or 3-bit tier runs as 8-bit MatMulNBits (exact: the codes and scales are unchanged,
        the resident bytes those of 8 bits instead of float32's)."""
        if self.bits == 8:
            return self
        rows, ng = self.scales.shape
        codes = qcodec.unpack_stream(np.ascontiguousarray(self.codes).reshape(-1), self.bits,
                                     rows * ng * self.block_size).reshape(rows, ng, self.block_size)
        zps = qcodec.unpack_zero_points(self.zero_points, ng, self.bits)
        return PackedWeight(codes, self.scales, np.ascontiguousarray(zps), 8, self.block_size, self.rows,
                            self.row_len, self.of_transpose)


class ZeroPointTier(SeparateTier):
    """One quantized tier, one payload per chunk, in the integer-zero-point codec (qcodec `*_zp`, NDC 1.2).
    Its payload ids are listed under the entry's `zp` key, not `tiers`: a 1.1 reader, which would decode
    them as scale+min payloads, finds no tier it knows there and refuses the tensor instead of misreading."""

    index_key = "zp"
    codec = "zp"

    def __init__(self, tier: str):
        super().__init__(tier)
        assert self.quantized

    def __repr__(self) -> str:
        return f"ZeroPointTier({self.key!r})"

    def group(self, row_len, group_size):
        return qcodec.zp_group(row_len, group_size)

    def payload_sizes(self, rows, row_len, group_size):
        return [qcodec.zp_payload_nbytes(rows, row_len, group_size, self.bits)]

    def decode(self, tier, bufs, rows, row_len, group_size):
        return qcodec.dequantize_zp(bufs[0], rows, row_len, group_size, self.bits)

    def pack(self, codes, scales, zero_points, group_size) -> list[bytes]:
        """codes uint8 [R, K], scales float16 [R, ng], zero points [R, ng] (integers in [0, 2^bits - 1])."""
        return [qcodec.pack_zp(codes, scales, zero_points, self.bits, group_size)]

    def packed(self, chunks, rows: int, row_len: int, group_size: int, order=None) -> PackedWeight:
        """[(rows, payload or None for an empty chunk)] of a whole tensor of `rows` rows, in row order (any
        iterable: each chunk is copied into the result and may then be dropped) -> its PackedWeight.
        An empty chunk is all codes, zero points and scales 0 (it decodes to zeros). `order`: the packed
        row of each stored row (a permutation): a tensor stored in another row order (a vocabulary-routed
        LM head) is packed straight in the order its product takes, without a second copy of its codes."""
        ng = -(-row_len // group_size)
        blob, zb = group_size * self.bits // 8, -(-(ng * self.bits) // 8)
        codes, s32 = np.zeros((rows, ng, blob), np.uint8), np.zeros((rows, ng), np.float32)
        zps = np.zeros((rows, zb), np.uint8)
        at = 0
        for r, buf in chunks:
            if buf is not None:
                c, s, z = qcodec.split_zp(buf, r, row_len, group_size, self.bits)
                dst = slice(at, at + r) if order is None else order[at : at + r]
                codes[dst], s32[dst], zps[dst] = c, s, z
            at += r
        if at != rows:
            raise BundleError(f"zp tensor: chunks hold {at} rows, expected {rows}")
        if not np.isfinite(s32).all():
            raise BundleError("zp chunk: scales contain non-finite values (corrupt payload)")
        return PackedWeight(codes, s32, zps, self.bits, group_size, rows, row_len)


class TransposedZeroPointTier(ZeroPointTier):
    """One quantized tier in the zp codec over the transpose of each chunk (NDC 1.3, §4.2d): chunk i of
    r rows x K columns is stored as the zp payload of its transpose [K, r] with group G = the entry's
    group_size, so each of the K columns has ceil(r/G) groups of G consecutive rows. With every chunk
    boundary but the last on a multiple of G, the chunks' blocks side by side are the tensor's transpose
    in MatMulNBits' layout (K = the tensor's rows). Listed under `zp_t`: a 1.2 reader does not know the
    key and so never decodes these payloads as row-grouped ones."""

    index_key = "zp_t"

    def __repr__(self) -> str:
        return f"TransposedZeroPointTier({self.key!r})"

    def group(self, row_len, group_size):
        return group_size  # groups run along the rows, which chunk bounds on multiples of G keep whole

    def payload_sizes(self, rows, row_len, group_size):
        return [qcodec.zp_payload_nbytes(row_len, rows, group_size, self.bits)]

    def decode(self, tier, bufs, rows, row_len, group_size):
        return np.ascontiguousarray(qcodec.dequantize_zp(bufs[0], row_len, rows, group_size, self.bits).T)

    # pack (inherited): the chunk's transpose, codes [K, r], scales and zero points [K, ceil(r/G)]

    def packed(self, chunks, rows: int, row_len: int, group_size: int, order=None) -> PackedWeight:
        """[(rows, payload or None)] of a whole tensor [R = rows, K], in row order -> the PackedWeight of its
        transpose (MatMulNBits N = K, K = R): every chunk's blocks concatenated along the block axis, the
        zero points re-packed per output (they are bit-packed across blocks). Empty chunks are zeros.
        A transpose's rows are the tensor's columns: it takes no row `order`."""
        if order is not None:
            raise ValueError("a transposed zp tensor is packed in its stored order only")
        chunks = list(chunks)
        if sum(r for r, _ in chunks) != rows:
            raise BundleError(f"zp_t tensor: chunks hold {sum(r for r, _ in chunks)} rows, expected {rows}")
        if any(r % group_size for r, _ in chunks[:-1]):
            raise BundleError("zp_t tensor: a chunk boundary is not on a multiple of the group size")
        codes, scales, zps = [], [], []
        for r, buf in chunks:
            ng = -(-r // group_size)
            if buf is None:
                c, s, z = (np.zeros((row_len, ng, group_size * self.bits // 8), np.uint8),
                           np.zeros((row_len, ng), np.float16), np.zeros((row_len, ng), np.uint8))
            else:
                c, s, zb = qcodec.split_zp(buf, row_len, r, group_size, self.bits)
                z = qcodec.unpack_zero_points(zb, ng, self.bits)
            codes.append(c)
            scales.append(s)
            zps.append(z)
        s32 = np.concatenate(scales, axis=1).astype(np.float32)
        if not np.isfinite(s32).all():
            raise BundleError("zp chunk: scales contain non-finite values (corrupt payload)")
        return PackedWeight(np.concatenate(codes, axis=1), s32,
                            qcodec.pack_zero_points(np.concatenate(zps, axis=1), self.bits), self.bits, group_size,
                            row_len, rows, of_transpose=True)


class NestedTiers(TierLayout):
    """q8 and q4 from one 8-bit quantization stored as bit-planes (runtime/qcodec.py, NDC 1.1)."""

    key = "nested"
    # Not q2: plane A alone is the top 2 bits of a code chosen for 4 bits, which decodes far worse than
    # a 2-bit quantization of its own (MiniLM cosine 0.25 vs 0.74); a nested bundle offers no tier
    # worse than the separate one, so a 2-bit request falls back to q4 (NEAREST).
    serves = ("q8", "q4")
    n_payloads = len(qcodec.NESTED_PLANES)
    bits = 8
    quantized = True

    def __repr__(self) -> str:
        return "NestedTiers()"

    def read_count(self, tier: str) -> int:
        return qcodec.NESTED_TIER_PLANES[TIER_BITS[tier]]

    def payload_sizes(self, rows, row_len, group_size):
        return [qcodec.nested_plane_nbytes(rows, row_len, group_size, p) for p in range(self.n_payloads)]

    def decode(self, tier, bufs, rows, row_len, group_size):
        return qcodec.dequantize_nested(bufs, rows, row_len, group_size, TIER_BITS[tier])

    def pack(self, codes8, scales, mins, group_size) -> list[bytes]:
        return qcodec.pack_nested(codes8, scales, mins, group_size)

    def ids_of(self, entry):
        nested = entry.get("nested")
        return nested.get("planes") if isinstance(nested, dict) else None

    def record(self, entry, ids):
        entry["nested"] = {"planes": ids}


SEPARATE = {t: SeparateTier(t) for t in TIERS}
ZERO_POINT = {t: ZeroPointTier(t) for t in QUANT_TIERS}
ZERO_POINT_T = {t: TransposedZeroPointTier(t) for t in QUANT_TIERS}
NESTED = NestedTiers()
# The codecs of separate quantized tiers: "zp" (1.2, the default of compiles) and the scale+min "minmax".
# The legacy scale+min codec keeps the 1.1 tiers (q3 came with 1.3, q6 and q5 with 1.4), so its bundles stay
# readable by 1.1 readers.
CODECS = {"zp": ZERO_POINT, "minmax": {t: SEPARATE[t] for t in ("q8", "q4", "q2")}}
DEFAULT_CODEC = "zp"


def layouts_of(entry: dict) -> dict[str, tuple[TierLayout, list]]:
    """tier -> (layout, payload-id lists) of one tensor (or MoE expert matrix) index entry: its separate
    tiers (`tiers`, `zp`, `zp_t`), then nested ones."""
    found = {}
    for table in (SEPARATE, ZERO_POINT, ZERO_POINT_T):
        for t, ids in entry.get(table[QUANT_TIERS[0]].index_key, {}).items():
            found[t] = (table[t], [ids])
    planes = NESTED.ids_of(entry)
    if planes:
        for t in NESTED.tiers_of(planes):
            found[t] = (NESTED, planes)
    return found


def compile_layouts(keep_float: bool, nested: bool, codec: str = DEFAULT_CODEC,
                    tiers: tuple[str, ...] = DEFAULT_TIERS) -> list[TierLayout]:
    """The layouts a compile writes, in write order: float32 if kept, then nested planes or the quantized
    `tiers` (highest first) that `codec` (a key of CODECS) has."""
    if codec not in CODECS:
        raise ValueError(f"unknown quantization codec {codec!r} (one of {', '.join(CODECS)})")
    out = [SEPARATE[FLOAT_TIER]] if keep_float else []
    return out + ([NESTED] if nested else [CODECS[codec][t] for t in QUANT_TIERS if t in tiers and t in CODECS[codec]])


def parse_tiers(spec: str) -> tuple[str, ...]:
    """`--tiers 8,6,5,4` -> ("q8", "q6", "q5", "q4"); a ValueError names what is wrong."""
    names = [p.strip() for p in str(spec).split(",") if p.strip()]
    bad = [p for p in names if BITS_TO_TIER.get(p) not in QUANT_TIERS]
    if not names or bad:
        raise ValueError(f"--tiers {spec!r}: give quantized widths separated by commas, from "
                         f"{', '.join(str(TIER_BITS[t]) for t in QUANT_TIERS)} (e.g. 8,6,5,4)")
    want = {BITS_TO_TIER[p] for p in names}
    return tuple(t for t in QUANT_TIERS if t in want)
