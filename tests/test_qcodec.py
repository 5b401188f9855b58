"""Property and hand-checked tests of the .ndc v1 grouped quantization payload codec."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nadoo.runtime import qcodec
from nadoo.runtime.errors import BundleError


@st.composite
def chunks(draw):
    bits = draw(st.sampled_from([8, 4, 2]))
    rows = draw(st.integers(1, 9))
    row_len = draw(st.integers(1, 150))
    g_opt = draw(st.sampled_from([1, 3, 8, 32, 64]))
    G = min(g_opt, row_len)                      # effective group size
    ng = -(-row_len // G)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, (rows, row_len)).astype(np.uint8)
    scales = (rng.standard_normal((rows, ng)) * 0.1).astype(np.float16)
    mins = (rng.standard_normal((rows, ng))).astype(np.float16)
    return codes, scales, mins, bits, G


def naive_stream_pack(codes, bits, G):
    R, K = codes.shape
    ng = -(-K // G)
    pad = np.zeros((R, ng * G), np.uint8)
    pad[:, :K] = codes
    stream = pad.reshape(-1)
    out = bytearray(-(-(stream.size * bits) // 8))
    for i, c in enumerate(stream):
        out[(i * bits) // 8] |= int(c) << ((i * bits) % 8)
    return bytes(out)


@settings(max_examples=300, deadline=None)
@given(chunks())
def test_roundtrip_and_length(ch):
    codes, scales, mins, bits, G = ch
    R, K = codes.shape
    p = qcodec.pack(codes, scales, mins, bits, G)
    assert len(p) == qcodec.payload_nbytes(R, K, G, bits)
    ng = -(-K // G)
    assert len(p) == -(-(R * ng * G * bits) // 8) + 4 * R * ng
    c2, s2, m2 = qcodec.unpack(p, R, K, G, bits)
    assert c2.dtype == np.uint8 and c2.shape == (R, K)
    assert np.array_equal(c2, codes)
    assert s2.dtype == np.float16 and np.array_equal(s2.view(np.uint16), scales.view(np.uint16))
    assert m2.dtype == np.float16 and np.array_equal(m2.view(np.uint16), mins.view(np.uint16))
    # bit layout: compare against a one-code-at-a-time LSB-first packer
    code_bytes = -(-(R * ng * G * bits) // 8)
    assert p[:code_bytes] == naive_stream_pack(codes, bits, G)
    assert p[code_bytes:] == scales.astype("<f2").tobytes() + mins.astype("<f2").tobytes()


@settings(max_examples=300, deadline=None)
@given(chunks())
def test_dequantize_matches_formula(ch):
    codes, scales, mins, bits, G = ch
    R, K = codes.shape
    p = qcodec.pack(codes, scales, mins, bits, G)
    w = qcodec.dequantize(memoryview(p), R, K, G, bits)
    assert w.dtype == np.float32 and w.shape == (R, K)
    ref = np.empty((R, K), np.float32)
    for r in range(R):
        for k in range(K):
            s = np.float32(scales[r, k // G])
            m = np.float32(mins[r, k // G])
            ref[r, k] = np.float32(s * np.float32(codes[r, k])) + m
    assert np.array_equal(w, ref)


@settings(max_examples=100, deadline=None)
@given(chunks(), st.integers(-5, 5).filter(lambda d: d != 0))
def test_wrong_length_raises(ch, delta):
    codes, scales, mins, bits, G = ch
    R, K = codes.shape
    p = qcodec.pack(codes, scales, mins, bits, G)
    bad = p + b"\0" * delta if delta > 0 else p[:delta]
    with pytest.raises(BundleError):
        qcodec.dequantize(bad, R, K, G, bits)
    with pytest.raises(BundleError):
        qcodec.unpack(bad, R, K, G, bits)


def test_hand_checked_2bit():
    p = qcodec.pack(np.array([[0, 1, 2, 3]], np.uint8), np.array([[1.0]], np.float16),
                    np.array([[0.5]], np.float16), bits=2, group_size=4)
    assert p[0] == 0b11100100
    assert p[1:3] == np.float16(1.0).tobytes() and p[3:5] == np.float16(0.5).tobytes()
    assert len(p) == 5
    assert qcodec.dequantize(p, 1, 4, 4, 2).tolist() == [[0.5, 1.5, 2.5, 3.5]]


def test_hand_checked_4bit_padding():
    # K=3 with G=2: K_pad=4, row stream = [1, 2, 3, pad 0]; nibbles low=even
    p = qcodec.pack(np.array([[1, 2, 3]], np.uint8), np.ones((1, 2), np.float16),
                    np.zeros((1, 2), np.float16), bits=4, group_size=2)
    assert p[:2] == bytes([0x21, 0x03])
    assert len(p) == qcodec.payload_nbytes(1, 3, 2, 4) == 2 + 8
    # odd code count: R=1, K=3, G=3 at 4-bit -> 2 code bytes, last high nibble unused
    assert qcodec.payload_nbytes(1, 3, 3, 4) == 2 + 4
    assert qcodec.payload_nbytes(3, 5, 5, 2) == 4 + 12


@pytest.mark.parametrize("args", [(0, 4, 4, 8), (1, 0, 4, 8), (1, 4, 0, 8), (1, 4, 4, 7),
                                  (1, 4, 4, 16), (1.5, 4, 4, 8), (True, 4, 4, 8)])
def test_bad_dims_raise(args):
    with pytest.raises(BundleError):
        qcodec.payload_nbytes(*args)
    with pytest.raises(BundleError):
        qcodec.dequantize(b"\0" * 16, *args)


def test_nonfinite_params_raise_on_decode():
    p = bytearray(qcodec.pack(np.zeros((1, 4), np.uint8), np.ones((1, 1), np.float16),
                              np.zeros((1, 1), np.float16), 8, 4))
    p[4:6] = np.float16(np.inf).tobytes()
    with pytest.raises(BundleError):
        qcodec.dequantize(bytes(p), 1, 4, 4, 8)


def test_pack_rejects_bad_input():
    s = np.ones((1, 1), np.float16)
    with pytest.raises(ValueError):
        qcodec.pack(np.array([[4, 0]], np.uint8), s, s, 2, 2)           # code out of range
    with pytest.raises(ValueError):
        qcodec.pack(np.zeros((1, 2), np.uint8), s.astype(np.float32), s, 2, 2)
    with pytest.raises(ValueError):
        qcodec.pack(np.zeros((1, 4), np.uint8), s, s, 2, 2)             # needs ng=2
