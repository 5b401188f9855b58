"""NDC container constants and the fixed preamble (see format_spec/NDC-v1.md).

Versioning policy (as in ExecuTorch's flatbuffer header): a *minor* version may add fields at the
end of the preamble (growing `preamble_size`), add keys to the index JSON, add codecs or tiers that
older readers can ignore; anything an old reader would misread bumps the *major* version, and a
reader refuses a major it does not know. The magic changes only if the file stops being NDC at all.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from .errors import BundleError

MAGIC = b"\x89NDC\r\n\x1a\n"  # PNG-style: catches text-mode and 7-bit transfer damage
MAJOR = 1
MINOR = 4  # the newest minor this code reads and writes; files say the lowest minor that describes them

# <8s magic, H major, H minor, I preamble_size, I alignment, I flags,
#  Q index_offset, Q index_length, Q table_offset, Q table_count, I index_crc32>, then I preamble_crc32
_PREAMBLE = struct.Struct("<8sHHIIIQQQQI")
PREAMBLE_SIZE = _PREAMBLE.size + 4  # = 64, the crc32 of everything before it closes the preamble
assert PREAMBLE_SIZE == 64

# One payload-table record: offset, stored length, raw length, crc32 of the stored bytes, codec.
TABLE_DTYPE = np.dtype(
    [("offset", "<u8"), ("stored", "<u8"), ("raw", "<u8"), ("crc32", "<u4"), ("codec", "u1"), ("reserved", "V3")]
)
assert TABLE_DTYPE.itemsize == 32

CODEC_RAW = 0
CODEC_ZSTD = 1
CODECS = {CODEC_RAW: "raw", CODEC_ZSTD: "zstd"}

# Hard caps: the reader checks every one before it allocates anything (spec §5).
MAX_PREAMBLE_SIZE = 4096
MIN_ALIGNMENT, MAX_ALIGNMENT = 8, 1 << 20
MAX_INDEX_BYTES = 16 << 20  # measured: MiniLM's index is 0.2 MiB, a 270M-parameter LM's ~1.5 MiB
MAX_PAYLOADS = 1 << 22
MAX_PAYLOAD_RAW = 1 << 31
MAX_JSON_PAYLOAD = 16 << 20  # graph and profile, decoded; measured: MiniLM's graph is 43 KiB
# Parsed JSON costs Python ~25x its text in objects and arrays, ~10x in numbers and strings: at most
# one object/array per JSON_BYTES_PER_CONTAINER bytes (+ a floor) keeps a parse within ~15x the text.
# Measured on real bundles: >= 29 bytes per object/array (a graph of small nodes), indexes >= 69.
JSON_BYTES_PER_CONTAINER = 8
MAX_JSON_CONTAINERS_FLOOR = 1024
# The decoded size of all zstd payloads together: <= ZSTD_MAX_RATIO x their stored size + ZSTD_SLACK.
# Measured aggregate ratios: 1.1 (quantized tiers) to 9.4 (a pruned model's mostly-zero chunks); single
# small payloads reach ~740x (an all-but-empty chunk), which is why the bound is on the sum.
ZSTD_MAX_RATIO = 64
ZSTD_SLACK = 16 << 20  # a small file may still decode to 16 MiB (its q2 weights to ~13x that in float32)
MAX_NAME_LEN = 512
MAX_GROUP_SIZE = 1 << 16
MAX_RANK = 8
MAX_DIM = 1 << 31
MAX_ELEMENTS = 1 << 34

# Run-time caps (spec §5, "running"): no operator may produce a value (a broadcast view counts at its
# logical size) of more than max(MIN_VALUE_CAP, VALUE_CAP_PER_BYTE x (model bytes + input bytes))
# elements, nor MAX_ELEMENTS; a MatMul/Gemm/Conv/pool may do at most WORK_PER_ELEMENT multiply-adds per
# element of that cap. So a small bundle cannot make a run allocate or compute without bound, while a
# big model or a big input scales its own cap.
MIN_VALUE_CAP = 1 << 26  # elements: 256 MiB of float32
VALUE_CAP_PER_BYTE = 16
WORK_PER_ELEMENT = 1024

# Precision tiers a chunk may be stored at, the names the index uses (their bits, layouts and --bits
# spellings: runtime/tiers.py).
TIERS = ("f32", "q8", "q6", "q5", "q4", "q3", "q2")

DTYPES = frozenset(
    ["float32", "float16", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool"]
)


@dataclass(frozen=True)
class Preamble:
    major: int
    minor: int
    preamble_size: int
    alignment: int
    flags: int
    index_offset: int
    index_length: int
    table_offset: int
    table_count: int
    index_crc32: int

    def pack(self) -> bytes:
        head = _PREAMBLE.pack(
            MAGIC, self.major, self.minor, self.preamble_size, self.alignment, self.flags,
            self.index_offset, self.index_length, self.table_offset, self.table_count, self.index_crc32,
        )
        return head + struct.pack("<I", zlib.crc32(head))

    @classmethod
    def parse(cls, data: bytes, file_size: int) -> "Preamble":
        """Parse and check the preamble against the file size; every rule here is in spec §5.1."""
        if len(data) < PREAMBLE_SIZE:
            raise BundleError(f"not an NDC bundle: file is {file_size} bytes, shorter than the {PREAMBLE_SIZE}-byte preamble")
        if data[:8] != MAGIC:
            raise BundleError("not an NDC bundle: bad magic bytes")
        fields = _PREAMBLE.unpack_from(data, 0)
        (crc,) = struct.unpack_from("<I", data, _PREAMBLE.size)
        if zlib.crc32(data[: _PREAMBLE.size]) != crc:
            raise BundleError("corrupt bundle: preamble checksum mismatch")
        p = cls(*fields[1:])
        if p.major != MAJOR:
            raise BundleError(f"unsupported NDC major version {p.major} (this nadoo reads major {MAJOR})")
        if not PREAMBLE_SIZE <= p.preamble_size <= MAX_PREAMBLE_SIZE:
            raise BundleError(f"corrupt bundle: preamble size {p.preamble_size} out of range")
        a = p.alignment
        if not (MIN_ALIGNMENT <= a <= MAX_ALIGNMENT and a & (a - 1) == 0):
            raise BundleError(f"corrupt bundle: alignment {a} is not a power of two in [{MIN_ALIGNMENT}, {MAX_ALIGNMENT}]")
        if p.index_length > MAX_INDEX_BYTES:
            raise BundleError(f"corrupt bundle: index length {p.index_length} exceeds the cap {MAX_INDEX_BYTES}")
        if p.table_count > MAX_PAYLOADS:
            raise BundleError(f"corrupt bundle: payload count {p.table_count} exceeds the cap {MAX_PAYLOADS}")
        # Python ints do not overflow, so these sums are the checked arithmetic the spec asks for.
        if p.index_offset < p.preamble_size or p.index_offset + p.index_length > file_size:
            raise BundleError("corrupt or truncated bundle: index lies outside the file")
        if p.table_offset % 8 or p.table_offset < p.index_offset + p.index_length:
            raise BundleError("corrupt bundle: payload table misplaced")
        if p.table_offset + p.table_count * TABLE_DTYPE.itemsize != file_size:
            raise BundleError("corrupt or truncated bundle: payload table does not end at the end of the file")
        return p


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment
