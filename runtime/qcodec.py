"""Grouped asymmetric quantization payload codecs (.ndc format v1), pure NumPy: the scale+min codec
below (NDC 1.0, spec §4.2), its nested bit-planes (1.1, §4.2b) and the integer-zero-point codec at the
end of this module (1.2, §4.2c, the default of new compiles).

A quantized chunk is a matrix W of ``rows`` (R) x ``row_len`` (K). Along K the columns are cut
into groups of ``group_size`` (G) columns; ``ng = ceil(K / G)`` and ``K_pad = ng * G`` (the
caller passes the *effective* group size, i.e. ``G = K`` when ``K`` is smaller than the compile
option). Every group has one float16 ``scale`` and one float16 ``min``.

Payload layout (no padding between the parts)::

    codes   ceil(R * K_pad * bits / 8) bytes: the row-major [R, K_pad] code array (columns >= K
            are padding, written as 0 and ignored on decode) flattened to a stream of codes and
            bit-packed LSB-first: code i occupies bits (i*bits mod 8).. of byte floor(i*bits/8)
    scales  float16 little-endian [R, ng] row-major
    mins    float16 little-endian [R, ng] row-major

Decoding (float32): ``w[r, k] = f32(scale[r, k // G]) * f32(q[r, k]) + f32(min[r, k // G])``.

Every length or argument mismatch on the decoding side raises :class:`BundleError`, so a
truncated or mis-described chunk can never decode to silently wrong numbers.
"""
from __future__ import annotations

import numpy as np

from .errors import BundleError

__all__ = ["SUPPORTED_BITS", "payload_nbytes", "pack", "unpack", "dequantize", "NESTED_PLANES", "NESTED_TIER_PLANES",
           "nested_plane_nbytes", "pack_nested", "nested_codes", "dequantize_nested", "ZP_GROUPS", "zp_group",
           "zp_payload_nbytes", "pack_zp", "pack_zero_points", "split_zp", "unpack_zp", "unpack_zero_points", "dequantize_zp"]

SUPPORTED_BITS = (8, 4, 3, 2)
_F16LE = np.dtype("<f2")


def _check_dims(rows, row_len, group_size, bits, exc=BundleError):
    for name, v in (("rows", rows), ("row_len", row_len), ("group_size", group_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise exc(f"quantized chunk: {name} must be a positive integer, got {v!r}")
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise exc(f"quantized chunk: bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return int(rows), int(row_len), int(group_size), int(bits)


def _layout(rows, row_len, group_size, bits):
    ng = -(-row_len // group_size)
    k_pad = ng * group_size
    code_bytes = -(-(rows * k_pad * bits) // 8)
    return ng, k_pad, code_bytes


def payload_nbytes(rows: int, row_len: int, group_size: int, bits: int) -> int:
    """Exact payload length in bytes: ceil(R*K_pad*bits/8) + 4*R*ng."""
    rows, row_len, group_size, bits = _check_dims(rows, row_len, group_size, bits)
    ng, _, code_bytes = _layout(rows, row_len, group_size, bits)
    return code_bytes + 4 * rows * ng


# ----------------------------------------------------------------------------------- packing
def _bit_planes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., n] -> their bits [..., n * bits], each code LSB first (the stream order of a
    width that does not divide 8, where codes straddle bytes)."""
    return ((codes[..., None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(*codes.shape[:-1], -1)


def _from_bit_planes(bitstream: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`_bit_planes` on the last axis: bits [..., >= n * bits] -> uint8 codes [..., n]."""
    b = bitstream[..., :n * bits].reshape(*bitstream.shape[:-1], n, bits)
    return (b << np.arange(bits, dtype=np.uint8)).sum(-1, dtype=np.uint8)


def _pack_stream(stream: np.ndarray, bits: int) -> bytes:
    """Bit-pack a flat uint8 code stream LSB-first."""
    if bits == 8:
        return stream.tobytes()
    if 8 % bits:
        return np.packbits(_bit_planes(stream, bits), bitorder="little").tobytes()
    per = 8 // bits
    n = stream.size
    pad = (-n) % per
    if pad:
        stream = np.concatenate([stream, np.zeros(pad, np.uint8)])
    s = stream.reshape(-1, per)
    out = s[:, 0].copy()
    for j in range(1, per):
        out |= s[:, j] << np.uint8(j * bits)
    return out.tobytes()


def _unpack_stream(raw: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`_pack_stream`: uint8 bytes -> flat uint8 codes (first ``n``)."""
    if bits == 8:
        return raw[:n]
    if 8 % bits:
        return _from_bit_planes(np.unpackbits(raw, bitorder="little"), bits, n)
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    out = np.empty((raw.size, per), np.uint8)
    for j in range(per):
        if j == 0:
            np.bitwise_and(raw, mask, out=out[:, 0])
        elif j == per - 1:
            np.right_shift(raw, np.uint8(j * bits), out=out[:, j])
        else:
            np.right_shift(raw, np.uint8(j * bits), out=out[:, j])
            out[:, j] &= mask
    return out.reshape(-1)[:n]


def pack(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray, bits: int, group_size: int) -> bytes:
    """Serialize codes uint8 [R, K] (unpadded), scales/mins float16 [R, ng] into a payload.

    Raises ValueError on inconsistent arguments (this is the compiler side)."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"pack: codes must be 2-D [rows, row_len], got shape {codes.shape}")
    rows, row_len = codes.shape
    rows, row_len, group_size, bits = _check_dims(rows, row_len, group_size, bits, ValueError)
    ng, k_pad, _ = _layout(rows, row_len, group_size, bits)
    if codes.dtype.kind not in "ui":
        raise ValueError(f"pack: codes must be an integer array, got {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() > (1 << bits) - 1):
        raise ValueError(f"pack: codes out of range [0, {(1 << bits) - 1}] for {bits}-bit")
    scales = np.asarray(scales)
    mins = np.asarray(mins)
    for name, a in (("scales", scales), ("mins", mins)):
        if a.shape != (rows, ng):
            raise ValueError(f"pack: {name} must have shape {(rows, ng)}, got {a.shape}")
        if a.dtype != np.float16:
            raise ValueError(f"pack: {name} must be float16, got {a.dtype}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"pack: {name} contain non-finite values")
    c = codes.astype(np.uint8, copy=False)
    if k_pad != row_len:
        cp = np.zeros((rows, k_pad), np.uint8)
        cp[:, :row_len] = c
        c = cp
    body = _pack_stream(np.ascontiguousarray(c).reshape(-1), bits)
    return body + scales.astype(_F16LE).tobytes() + mins.astype(_F16LE).tobytes()


def _split(buf, rows, row_len, group_size, bits):
    rows, row_len, group_size, bits = _check_dims(rows, row_len, group_size, bits)
    ng, k_pad, code_bytes = _layout(rows, row_len, group_size, bits)
    want = code_bytes + 4 * rows * ng
    try:
        raw = np.frombuffer(buf, dtype=np.uint8)
    except (TypeError, ValueError) as e:
        raise BundleError(f"quantized chunk: payload is not a byte buffer ({e})") from None
    if raw.size != want:
        raise BundleError(
            f"quantized chunk: payload is {raw.size} bytes, expected {want} for "
            f"{rows}x{row_len} at {bits}-bit, group {group_size}")
    scales = raw[code_bytes:code_bytes + 2 * rows * ng].view(_F16LE).reshape(rows, ng)
    mins = raw[code_bytes + 2 * rows * ng:].view(_F16LE).reshape(rows, ng)
    return raw[:code_bytes], scales, mins, (rows, row_len, group_size, bits, ng, k_pad)


def unpack(buf, rows: int, row_len: int, group_size: int, bits: int):
    """Payload -> (codes uint8 [R, K], scales float16 [R, ng], mins float16 [R, ng])."""
    raw, scales, mins, (rows, row_len, group_size, bits, ng, k_pad) = _split(
        buf, rows, row_len, group_size, bits)
    codes = _unpack_stream(raw, bits, rows * k_pad).reshape(rows, k_pad)[:, :row_len]
    # always fresh, writable arrays (never views into the caller's buffer)
    return (np.array(codes, dtype=np.uint8, order="C", copy=True),
            scales.astype(np.float16), mins.astype(np.float16))


# ---------------------------------------------------------------------------- dequantization
_LUT_CACHE: dict = {}


def _code_lut(bits: int) -> np.ndarray:
    """1-D table of 256 entries: byte value -> the 8//bits float32 codes it holds, packed in one
    wide element (uint64 for 4-bit, complex128 for 2-bit) so the lookup is a single fast gather;
    viewing the result as float32 gives the codes in stream order."""
    lut = _LUT_CACHE.get(bits)
    if lut is None:
        b = np.arange(256, dtype=np.uint8)[:, None]
        per = 8 // bits
        shifts = (np.arange(per, dtype=np.uint8) * bits)[None, :]
        tab = np.ascontiguousarray(((b >> shifts) & ((1 << bits) - 1)).astype("<f4"))
        lut = tab.view(np.uint64 if bits == 4 else np.complex128).reshape(256)
        _LUT_CACHE[bits] = lut
    return lut


def dequantize(buf, rows: int, row_len: int, group_size: int, bits: int) -> np.ndarray:
    """Payload -> float32 [R, K] using w = f32(scale) * f32(q) + f32(min) (no fused multiply-add).

    Raises BundleError on a wrong payload length or non-finite scales/mins (a corrupt chunk)."""
    raw, scales, mins, (rows, row_len, group_size, bits, ng, k_pad) = _split(
        buf, rows, row_len, group_size, bits)
    s32 = scales.astype(np.float32)
    m32 = mins.astype(np.float32)
    if not (np.isfinite(s32).all() and np.isfinite(m32).all()):
        raise BundleError("quantized chunk: scales/mins contain non-finite values (corrupt payload)")
    n = rows * k_pad
    if bits == 8:
        q = raw.astype(np.float32)
    elif 8 % bits:  # codes straddle bytes: no per-byte table
        q = _unpack_stream(raw, bits, n).astype(np.float32)
    else:
        # One table lookup per byte yields its 2 or 4 codes already as float32.
        q = _code_lut(bits)[raw].view(np.float32)
        if q.size != n:
            q = q[:n]
    q = q.reshape(rows, ng, group_size)
    q *= s32[:, :, None]
    q += m32[:, :, None]
    out = q.reshape(rows, k_pad)
    if k_pad != row_len:
        out = np.ascontiguousarray(out[:, :row_len])
    return out


# ------------------------------------------------------------------ nested bit-planes (NDC 1.1)
# One 8-bit quantization (codes q8, float16 scale/min per group) stored as three *planes* per chunk:
#   plane A: bits 7-6 of q8 as a 2-bit stream + scales + mins   (exactly the q2 layout above)
#   plane B: bits 5-4 of q8 as a 2-bit stream
#   plane C: bits 3-0 of q8 as a 4-bit stream
# A b-bit read (b = 2, 4, 8) fetches the first 1, 2 or 3 planes; its code q_b = q8 >> (8 - b) is the
# bin of 2^(8-b) consecutive 8-bit codes, decoded at the bin's centre:
#   w = f32(scale) * f32(2^(8-b) * q_b + (2^(8-b) - 1) / 2) + f32(min)      (b = 8: scale * q8 + min)
NESTED_PLANES = ((2, True), (2, False), (4, False))  # (code bits, carries scales + mins) of A, B, C
NESTED_TIER_PLANES = {2: 1, 4: 2, 8: 3}               # bits of a read -> planes it needs


def nested_plane_nbytes(rows: int, row_len: int, group_size: int, plane: int) -> int:
    """Exact length of nested plane ``plane`` (0 = A, 1 = B, 2 = C) of a rows x row_len chunk."""
    rows, row_len, group_size, _ = _check_dims(rows, row_len, group_size, 8)
    if plane not in (0, 1, 2):
        raise BundleError(f"nested chunk: plane must be 0, 1 or 2, got {plane!r}")
    bits, params = NESTED_PLANES[plane]
    ng, k_pad, _ = _layout(rows, row_len, group_size, 8)
    return -(-(rows * k_pad * bits) // 8) + (4 * rows * ng if params else 0)


def pack_nested(codes8: np.ndarray, scales: np.ndarray, mins: np.ndarray, group_size: int) -> list[bytes]:
    """8-bit codes uint8 [R, K] + float16 scales/mins [R, ng] -> [plane A, plane B, plane C] bytes."""
    c = np.asarray(codes8)
    a = pack(c >> 6, scales, mins, 2, group_size)
    rows, row_len = c.shape
    ng, k_pad, _ = _layout(rows, row_len, group_size, 8)
    cp = np.zeros((rows, k_pad), np.uint8)
    cp[:, :row_len] = c
    flat = cp.reshape(-1)
    return [a, _pack_stream((flat >> 4) & 3, 2), _pack_stream(flat & 15, 4)]


def nested_codes(planes, rows: int, row_len: int, group_size: int, bits: int):
    """The first NESTED_TIER_PLANES[bits] planes -> (q_b uint8 [R, K_pad], scales, mins, ng, k_pad)."""
    rows, row_len, group_size, bits = _check_dims(rows, row_len, group_size, bits)
    need = NESTED_TIER_PLANES[bits]
    if len(planes) < need:
        raise BundleError(f"nested chunk: a {bits}-bit read needs {need} planes, got {len(planes)}")
    ng, k_pad, _ = _layout(rows, row_len, group_size, 8)
    bufs = []
    for p in range(need):
        want = nested_plane_nbytes(rows, row_len, group_size, p)
        try:
            raw = np.frombuffer(planes[p], dtype=np.uint8)
        except (TypeError, ValueError) as e:
            raise BundleError(f"nested chunk: plane {p} is not a byte buffer ({e})") from None
        if raw.size != want:
            raise BundleError(f"nested chunk: plane {'ABC'[p]} is {raw.size} bytes, expected {want} for "
                              f"{rows}x{row_len}, group {group_size}")
        bufs.append(raw)
    n = rows * k_pad
    code_a = -(-(n * 2) // 8)
    q = _unpack_stream(bufs[0][:code_a], 2, n).astype(np.uint8)
    if need >= 2:
        q = (q << 2) | _unpack_stream(bufs[1], 2, n)
    if need >= 3:
        q = (q << 4) | _unpack_stream(bufs[2], 4, n)
    scales = bufs[0][code_a:code_a + 2 * rows * ng].view(_F16LE).reshape(rows, ng)
    mins = bufs[0][code_a + 2 * rows * ng:].view(_F16LE).reshape(rows, ng)
    return q.reshape(rows, k_pad), scales, mins, ng, k_pad


def dequantize_nested(planes, rows: int, row_len: int, group_size: int, bits: int) -> np.ndarray:
    """Planes (A[, B[, C]]) -> float32 [R, K] at ``bits`` by the nested formula above."""
    q, scales, mins, ng, k_pad = nested_codes(planes, rows, row_len, group_size, bits)
    s32 = scales.astype(np.float32)
    m32 = mins.astype(np.float32)
    if not (np.isfinite(s32).all() and np.isfinite(m32).all()):
        raise BundleError("nested chunk: scales/mins contain non-finite values (corrupt payload)")
    step = 1 << (8 - bits)
    c = q.astype(np.float32)
    if step > 1:
        c *= np.float32(step)          # exact: integers < 256
        c += np.float32((step - 1) / 2)
    c = c.reshape(rows, ng, group_size)
    c *= s32[:, :, None]
    c += m32[:, :, None]
    out = c.reshape(rows, k_pad)
    return np.ascontiguousarray(out[:, :row_len]) if k_pad != row_len else out


# ------------------------------------------------------------- integer zero points (NDC 1.2, "zp")
# Per group of G columns (G a power of two in ZP_GROUPS) one float16 scale and one integer zero point
# z in [0, 2^b - 1]:  w = f32(scale) * (f32(q) - f32(z)).  The payload is laid out exactly as ONNX
# Runtime's com.microsoft MatMulNBits takes its B, scales and zero_points inputs, so an engine can hand
# the stored bytes over without re-packing:
#   codes   [R, ng, G*b/8] bytes: per row, per group, G codes packed LSB-first
#   scales  float16 LE [R, ng]
#   zps     [R, ceil(ng*b/8)] bytes: per row, the ng zero points packed LSB-first (pad bits 0)
ZP_GROUPS = (16, 32, 64, 128, 256)


def zp_group(row_len: int, group_size: int) -> int:
    """The effective group of a zp-coded tensor: `group_size`, or for a shorter row the smallest power
    of two >= row_len (at least 16), the columns past row_len being padding."""
    if row_len >= group_size:
        return group_size
    return max(ZP_GROUPS[0], 1 << (int(row_len) - 1).bit_length())


def _check_zp(rows, row_len, group_size, bits, exc=BundleError):
    rows, row_len, group_size, bits = _check_dims(rows, row_len, group_size, bits, exc)
    if group_size not in ZP_GROUPS:
        raise exc(f"zp chunk: group size must be one of {ZP_GROUPS}, got {group_size}")
    ng = -(-row_len // group_size)
    code_bytes = rows * ng * group_size * bits // 8
    zb = -(-(ng * bits) // 8)  # zero-point bytes per row
    return rows, row_len, group_size, bits, ng, code_bytes, zb


def zp_payload_nbytes(rows: int, row_len: int, group_size: int, bits: int) -> int:
    """Exact zp payload length: R*ng*G*b/8 + 2*R*ng + R*ceil(ng*b/8)."""
    rows, _, _, _, ng, code_bytes, zb = _check_zp(rows, row_len, group_size, bits)
    return code_bytes + 2 * rows * ng + rows * zb


def pack_zp(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int, group_size: int) -> bytes:
    """codes uint8 [R, K] (unpadded), scales float16 [R, ng], zero points integers [R, ng] -> a zp payload.
    Raises ValueError on inconsistent arguments (the compiler side)."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"pack_zp: codes must be 2-D [rows, row_len], got shape {codes.shape}")
    rows, row_len, group_size, bits, ng, _, _ = _check_zp(*codes.shape, group_size, bits, ValueError)
    qmax = (1 << bits) - 1
    zero_points = np.asarray(zero_points)
    scales = np.asarray(scales)
    for name, a, kinds in (("codes", codes, "ui"), ("zero_points", zero_points, "ui")):
        if a.dtype.kind not in kinds:
            raise ValueError(f"pack_zp: {name} must be an integer array, got {a.dtype}")
        if a.size and (a.min() < 0 or a.max() > qmax):
            raise ValueError(f"pack_zp: {name} out of range [0, {qmax}] for {bits}-bit")
    if zero_points.shape != (rows, ng) or scales.shape != (rows, ng):
        raise ValueError(f"pack_zp: scales and zero_points must have shape {(rows, ng)}, "
                         f"got {scales.shape} and {zero_points.shape}")
    if scales.dtype != np.float16 or not np.all(np.isfinite(scales)):
        raise ValueError("pack_zp: scales must be finite float16")
    c = np.zeros((rows, ng * group_size), np.uint8)
    c[:, :row_len] = codes
    return (_pack_stream(c.reshape(-1), bits) + scales.astype(_F16LE).tobytes()
            + pack_zero_points(zero_points, bits).tobytes())


def pack_zero_points(zero_points: np.ndarray, bits: int) -> np.ndarray:
    """Zero points (integers in [0, 2^bits - 1]) [R, ng] -> uint8 [R, ceil(ng*bits/8)], each row's packed
    LSB-first with spare bits 0 (inverse of :func:`unpack_zero_points`)."""
    rows, ng = zero_points.shape
    zb = -(-(ng * bits) // 8)
    if 8 % bits:  # codes cross bytes (3 bits): each row's zero points still start on a byte, row by row
        zbits = np.zeros((rows, zb * 8), np.uint8)
        zbits[:, :ng * bits] = _bit_planes(np.asarray(zero_points, np.uint8), bits)
        return np.packbits(zbits, axis=1, bitorder="little")
    z = np.zeros((rows, zb * 8 // bits), np.uint8)
    z[:, :ng] = zero_points
    return np.frombuffer(_pack_stream(z.reshape(-1), bits), np.uint8).reshape(rows, zb)


def split_zp(buf, rows: int, row_len: int, group_size: int, bits: int):
    """A zp payload -> views (codes uint8 [R, ng, G*b/8], scales float16 [R, ng], zero-point bytes uint8
    [R, zb]) into it, as stored (the MatMulNBits inputs). BundleError on a wrong length."""
    rows, row_len, group_size, bits, ng, code_bytes, zb = _check_zp(rows, row_len, group_size, bits)
    want = code_bytes + 2 * rows * ng + rows * zb
    try:
        raw = np.frombuffer(buf, dtype=np.uint8)
    except (TypeError, ValueError) as e:
        raise BundleError(f"zp chunk: payload is not a byte buffer ({e})") from None
    if raw.size != want:
        raise BundleError(f"zp chunk: payload is {raw.size} bytes, expected {want} for {rows}x{row_len} "
                          f"at {bits}-bit, group {group_size}")
    s_end = code_bytes + 2 * rows * ng
    return (raw[:code_bytes].reshape(rows, ng, group_size * bits // 8),
            raw[code_bytes:s_end].view(_F16LE).reshape(rows, ng), raw[s_end:].reshape(rows, zb))


def unpack_zero_points(zps: np.ndarray, ng: int, bits: int) -> np.ndarray:
    """Zero-point bytes uint8 [R, zb] -> zero points uint8 [R, ng]."""
    rows, zb = zps.shape
    if 8 % bits:  # packed row by row (pack_zp)
        return _from_bit_planes(np.unpackbits(np.ascontiguousarray(zps), axis=1, bitorder="little"), bits, ng)
    return _unpack_stream(np.ascontiguousarray(zps).reshape(-1), bits, rows * zb * 8 // bits).reshape(rows, -1)[:, :ng]


def unpack_zp(buf, rows: int, row_len: int, group_size: int, bits: int):
    """A zp payload -> fresh (codes uint8 [R, K], scales float16 [R, ng], zero points uint8 [R, ng])."""
    codes, scales, zps = split_zp(buf, rows, row_len, group_size, bits)
    ng, k_pad = scales.shape[1], scales.shape[1] * group_size
    q = _unpack_stream(codes.reshape(-1), bits, rows * k_pad).reshape(rows, k_pad)[:, :row_len]
    return (np.array(q, np.uint8, order="C"), scales.astype(np.float16),
            np.array(unpack_zero_points(zps, ng, bits), np.uint8, order="C"))


def dequantize_zp(buf, rows: int, row_len: int, group_size: int, bits: int) -> np.ndarray:
    """A zp payload -> float32 [R, K] by w = f32(scale) * (f32(q) - f32(z)), exactly in float32
    (q - z is an exact small integer, so the product is the one rounding).
    BundleError on a wrong payload length or non-finite scales (a corrupt chunk)."""
    codes, scales, zps = split_zp(buf, rows, row_len, group_size, bits)
    ng = scales.shape[1]
    s32 = scales.astype(np.float32)
    if not np.isfinite(s32).all():
        raise BundleError("zp chunk: scales contain non-finite values (corrupt payload)")
    raw = codes.reshape(-1)
    if bits == 8:
        q = raw.astype(np.float32)
    elif 8 % bits:  # a block of G codes is whole bytes (G a multiple of 8), so the stream is the blocks'
        q = _unpack_stream(raw, bits, rows * ng * group_size).astype(np.float32)
    else:
        q = _code_lut(bits)[raw].view(np.float32)
    q = q.reshape(rows, ng, group_size)
    q -= unpack_zero_points(zps, ng, bits).astype(np.float32)[:, :, None]
    q *= s32[:, :, None]
    out = q.reshape(rows, ng * group_size)
    return np.ascontiguousarray(out[:, :row_len]) if ng * group_size != row_len else out
