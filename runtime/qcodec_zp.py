"""The integer-zero-point payload codec (NDC 1.2, spec §4.2c, key "zp"; the default of new compiles).

Per group of G columns (G a power of two in ZP_GROUPS) one float16 scale and one integer zero point
z in [0, 2^b - 1]:  w = f32(scale) * (f32(q) - f32(z)).  The payload is laid out exactly as ONNX
Runtime's com.microsoft MatMulNBits takes its B, scales and zero_points inputs, so an engine can hand
the stored bytes over without re-packing:
  codes   [R, ng, G*b/8] bytes: per row, per group, G codes packed LSB-first
  scales  float16 LE [R, ng]
  zps     [R, ceil(ng*b/8)] bytes: per row, the ng zero points packed LSB-first (pad bits 0)
Every length or argument mismatch on the decoding side raises BundleError (as qcodec.py's codecs).
"""
from __future__ import annotations

import numpy as np

from .bitpack import F16LE, bit_planes, check_dims, code_lut, from_bit_planes, pack_stream, unpack_stream
from .errors import BundleError

ZP_GROUPS = (16, 32, 64, 128, 256)


def zp_group(row_len: int, group_size: int) -> int:
    """The effective group of a zp-coded tensor: `group_size`, or for a shorter row the smallest power
    of two >= row_len (at least 16), the columns past row_len being padding."""
    if row_len >= group_size:
        return group_size
    return max(ZP_GROUPS[0], 1 << (int(row_len) - 1).bit_length())


def _check_zp(rows, row_len, group_size, bits, exc=BundleError):
    rows, row_len, group_size, bits = check_dims(rows, row_len, group_size, bits, exc)
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
    return (pack_stream(c.reshape(-1), bits) + scales.astype(F16LE).tobytes()
            + pack_zero_points(zero_points, bits).tobytes())


def pack_zero_points(zero_points: np.ndarray, bits: int) -> np.ndarray:
    """Zero points (integers in [0, 2^bits - 1]) [R, ng] -> uint8 [R, ceil(ng*bits/8)], each row's packed
    LSB-first with spare bits 0 (inverse of :func:`unpack_zero_points`)."""
    rows, ng = zero_points.shape
    zb = -(-(ng * bits) // 8)
    if 8 % bits:  # codes cross bytes (3 bits): each row's zero points still start on a byte, row by row
        zbits = np.zeros((rows, zb * 8), np.uint8)
        zbits[:, :ng * bits] = bit_planes(np.asarray(zero_points, np.uint8), bits)
        return np.packbits(zbits, axis=1, bitorder="little")
    z = np.zeros((rows, zb * 8 // bits), np.uint8)
    z[:, :ng] = zero_points
    return np.frombuffer(pack_stream(z.reshape(-1), bits), np.uint8).reshape(rows, zb)


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
            raw[code_bytes:s_end].view(F16LE).reshape(rows, ng), raw[s_end:].reshape(rows, zb))


def unpack_zero_points(zps: np.ndarray, ng: int, bits: int) -> np.ndarray:
    """Zero-point bytes uint8 [R, zb] -> zero points uint8 [R, ng]."""
    rows, zb = zps.shape
    if 8 % bits:  # packed row by row (pack_zp)
        return from_bit_planes(np.unpackbits(np.ascontiguousarray(zps), axis=1, bitorder="little"), bits, ng)
    return unpack_stream(np.ascontiguousarray(zps).reshape(-1), bits, rows * zb * 8 // bits).reshape(rows, -1)[:, :ng]


def unpack_zp(buf, rows: int, row_len: int, group_size: int, bits: int):
    """A zp payload -> fresh (codes uint8 [R, K], scales float16 [R, ng], zero points uint8 [R, ng])."""
    codes, scales, zps = split_zp(buf, rows, row_len, group_size, bits)
    ng, k_pad = scales.shape[1], scales.shape[1] * group_size
    q = unpack_stream(codes.reshape(-1), bits, rows * k_pad).reshape(rows, k_pad)[:, :row_len]
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
        q = unpack_stream(raw, bits, rows * ng * group_size).astype(np.float32)
    else:
        q = code_lut(bits)[raw].view(np.float32)
    q = q.reshape(rows, ng, group_size)
    q -= unpack_zero_points(zps, ng, bits).astype(np.float32)[:, :, None]
    q *= s32[:, :, None]
    out = q.reshape(rows, ng * group_size)
    return np.ascontiguousarray(out[:, :row_len]) if ng * group_size != row_len else out
