"""Grouped asymmetric quantization payload codecs (.ndc format v1), pure NumPy: the scale+min codec
below (NDC 1.0, spec §4.2), its nested bit-planes (1.1, §4.2b) and, re-exported from qcodec_zp.py, the
integer-zero-point codec (1.2, §4.2c, the default of new compiles); the bit packing is bitpack.py.

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

from .bitpack import SUPPORTED_BITS, F16LE, check_dims, code_lut, pack_stream, unpack_stream
from .errors import BundleError
from .qcodec_zp import (ZP_GROUPS, dequantize_zp, pack_zero_points, pack_zp, split_zp, unpack_zero_points,  # noqa: F401
                        unpack_zp, zp_group, zp_payload_nbytes)  # (re-exported: one module names every codec)

__all__ = ["SUPPORTED_BITS", "payload_nbytes", "pack", "unpack", "dequantize", "NESTED_PLANES", "NESTED_TIER_PLANES",
           "nested_plane_nbytes", "pack_nested", "nested_codes", "dequantize_nested", "ZP_GROUPS", "zp_group",
           "zp_payload_nbytes", "pack_zp", "pack_zero_points", "split_zp", "unpack_zp", "unpack_zero_points", "dequantize_zp"]


def _layout(rows, row_len, group_size, bits):
    ng = -(-row_len // group_size)
    k_pad = ng * group_size
    code_bytes = -(-(rows * k_pad * bits) // 8)
    return ng, k_pad, code_bytes


def payload_nbytes(rows: int, row_len: int, group_size: int, bits: int) -> int:
    """Exact payload length in bytes: ceil(R*K_pad*bits/8) + 4*R*ng."""
    rows, row_len, group_size, bits = check_dims(rows, row_len, group_size, bits)
    ng, _, code_bytes = _layout(rows, row_len, group_size, bits)
    return code_bytes + 4 * rows * ng


def pack(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray, bits: int, group_size: int) -> bytes:
    """Serialize codes uint8 [R, K] (unpadded), scales/mins float16 [R, ng] into a payload.

    Raises ValueError on inconsistent arguments (this is the compiler side)."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"pack: codes must be 2-D [rows, row_len], got shape {codes.shape}")
    rows, row_len = codes.shape
    rows, row_len, group_size, bits = check_dims(rows, row_len, group_size, bits, ValueError)
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
    body = pack_stream(np.ascontiguousarray(c).reshape(-1), bits)
    return body + scales.astype(F16LE).tobytes() + mins.astype(F16LE).tobytes()


def _split(buf, rows, row_len, group_size, bits):
    rows, row_len, group_size, bits = check_dims(rows, row_len, group_size, bits)
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
    scales = raw[code_bytes:code_bytes + 2 * rows * ng].view(F16LE).reshape(rows, ng)
    mins = raw[code_bytes + 2 * rows * ng:].view(F16LE).reshape(rows, ng)
    return raw[:code_bytes], scales, mins, (rows, row_len, group_size, bits, ng, k_pad)


def unpack(buf, rows: int, row_len: int, group_size: int, bits: int):
    """Payload -> (codes uint8 [R, K], scales float16 [R, ng], mins float16 [R, ng])."""
    raw, scales, mins, (rows, row_len, group_size, bits, ng, k_pad) = _split(
        buf, rows, row_len, group_size, bits)
    codes = unpack_stream(raw, bits, rows * k_pad).reshape(rows, k_pad)[:, :row_len]
    # always fresh, writable arrays (never views into the caller's buffer)
    return (np.array(codes, dtype=np.uint8, order="C", copy=True),
            scales.astype(np.float16), mins.astype(np.float16))


# ---------------------------------------------------------------------------- dequantization
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
        q = unpack_stream(raw, bits, n).astype(np.float32)
    else:
        # One table lookup per byte yields its 2 or 4 codes already as float32.
        q = code_lut(bits)[raw].view(np.float32)
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
    rows, row_len, group_size, _ = check_dims(rows, row_len, group_size, 8)
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
    return [a, pack_stream((flat >> 4) & 3, 2), pack_stream(flat & 15, 4)]


def nested_codes(planes, rows: int, row_len: int, group_size: int, bits: int):
    """The first NESTED_TIER_PLANES[bits] planes -> (q_b uint8 [R, K_pad], scales, mins, ng, k_pad)."""
    rows, row_len, group_size, bits = check_dims(rows, row_len, group_size, bits)
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
    q = unpack_stream(bufs[0][:code_a], 2, n).astype(np.uint8)
    if need >= 2:
        q = (q << 2) | unpack_stream(bufs[1], 2, n)
    if need >= 3:
        q = (q << 4) | unpack_stream(bufs[2], 4, n)
    scales = bufs[0][code_a:code_a + 2 * rows * ng].view(F16LE).reshape(rows, ng)
    mins = bufs[0][code_a + 2 * rows * ng:].view(F16LE).reshape(rows, ng)
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
