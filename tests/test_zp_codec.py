"""The integer-zero-point codec (NDC 1.2, runtime/qcodec.py `*_zp`, runtime/tiers.py `ZeroPointTier`):
byte layout, exact decode formula, corrupt payloads, the container key `zp`, and `Bundle.read_packed`
against ONNX Runtime's MatMulNBits."""

import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nadoo.compiler.writer import BundleWriter
from nadoo.runtime import qcodec
from nadoo.runtime.errors import BundleError
from nadoo.runtime.reader import Bundle
from nadoo.runtime.tiers import ZERO_POINT, PackedWeight, compile_layouts, layouts_of


def _grid(rng, R, K, G, bits):
    ng = -(-K // G)
    codes = rng.integers(0, 1 << bits, (R, K)).astype(np.uint8)
    scales = rng.uniform(-0.5, 0.5, (R, ng)).astype(np.float16)
    zps = rng.integers(0, 1 << bits, (R, ng)).astype(np.uint8)
    return codes, scales, zps


def _naive_pack(values: np.ndarray, bits: int) -> bytes:
    """One value at a time, LSB-first, into a byte stream."""
    out = bytearray(-(-(values.size * bits) // 8))
    for i, c in enumerate(values.reshape(-1)):
        v = int(c) << ((i * bits) % 8)   # a 3-bit code may spill into the next byte
        out[(i * bits) // 8] |= v & 0xFF
        if v >> 8:
            out[(i * bits) // 8 + 1] |= v >> 8
    return bytes(out)


@st.composite
def zp_chunks(draw):
    bits = draw(st.sampled_from([8, 6, 5, 4, 3, 2]))
    rows = draw(st.integers(1, 7))
    row_len = draw(st.integers(1, 300))
    G = qcodec.zp_group(row_len, draw(st.sampled_from(qcodec.ZP_GROUPS)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return (*_grid(rng, rows, row_len, G, bits), bits, G)


@settings(max_examples=200, deadline=None)
@given(zp_chunks())
def test_layout_bytes_roundtrip_and_exact_formula(ch):
    codes, scales, zps, bits, G = ch
    R, K = codes.shape
    ng = scales.shape[1]
    p = qcodec.pack_zp(codes, scales, zps, bits, G)
    zb = -(-(ng * bits) // 8)
    assert len(p) == qcodec.zp_payload_nbytes(R, K, G, bits) == R * ng * G * bits // 8 + 2 * R * ng + R * zb
    # bytes: per row and block, the block's G codes packed (padding columns 0), then scales, then zero
    # points packed per row (the MatMulNBits B / scales / zero_points inputs)
    padded = np.zeros((R, ng * G), np.uint8)
    padded[:, :K] = codes
    want = b"".join(_naive_pack(padded[r, b * G:(b + 1) * G], bits) for r in range(R) for b in range(ng))
    want += scales.astype("<f2").tobytes()
    want += b"".join(_naive_pack(zps[r], bits).ljust(zb, b"\0") for r in range(R))
    assert p == want
    c2, s2, z2 = qcodec.unpack_zp(p, R, K, G, bits)
    assert np.array_equal(c2, codes) and np.array_equal(z2, zps)
    assert np.array_equal(s2.view(np.uint16), scales.view(np.uint16))
    w = qcodec.dequantize_zp(memoryview(p), R, K, G, bits)
    ref = np.empty((R, K), np.float32)
    for r in range(R):
        for k in range(K):
            ref[r, k] = np.float32(scales[r, k // G]) * (np.float32(codes[r, k]) - np.float32(zps[r, k // G]))
    assert w.dtype == np.float32 and np.array_equal(w, ref)


@pytest.mark.parametrize("K,G,want", [(1, 64, 16), (16, 64, 16), (17, 64, 32), (40, 64, 64), (64, 64, 64),
                                      (100, 64, 64), (300, 256, 256), (200, 256, 256), (129, 256, 256)])
def test_effective_group_is_a_power_of_two_at_least_16(K, G, want):
    assert qcodec.zp_group(K, G) == want == ZERO_POINT["q4"].group(K, G)


@settings(max_examples=60, deadline=None)
@given(zp_chunks(), st.integers(-5, 5).filter(lambda d: d != 0))
def test_wrong_length_is_a_bundle_error(ch, delta):
    codes, scales, zps, bits, G = ch
    R, K = codes.shape
    p = qcodec.pack_zp(codes, scales, zps, bits, G)
    bad = p[:delta] if delta < 0 else p + b"\0" * delta
    for f in (qcodec.dequantize_zp, qcodec.unpack_zp, qcodec.split_zp):
        with pytest.raises(BundleError):
            f(bad, R, K, G, bits)


def test_corrupt_scales_and_bad_arguments():
    rng = np.random.default_rng(0)
    codes, scales, zps = _grid(rng, 3, 40, 16, 4)
    p = bytearray(qcodec.pack_zp(codes, scales, zps, 4, 16))
    code_bytes = 3 * 3 * 16 * 4 // 8
    p[code_bytes:code_bytes + 2] = np.float16(np.nan).tobytes()
    with pytest.raises(BundleError, match="non-finite"):
        qcodec.dequantize_zp(bytes(p), 3, 40, 16, 4)
    with pytest.raises(BundleError, match="group size"):
        qcodec.dequantize_zp(bytes(p), 3, 40, 8, 4)     # not a zp group size
    with pytest.raises(BundleError, match="bits"):
        qcodec.zp_payload_nbytes(3, 40, 16, 7)
    with pytest.raises(ValueError):
        qcodec.pack_zp(codes, scales, zps + 16, 4, 16)  # zero point out of range
    with pytest.raises(ValueError):
        qcodec.pack_zp(codes, scales.astype(np.float32), zps, 4, 16)


# ------------------------------------------------------------------------------------- container
def _zp_bundle(path, tiers=("q8", "q4", "q2"), R=12, K=40, G=16, bounds=(0, 5, 12), empty=(), float_tier=False,
               seed=3):
    """One tensor `w` [R, K] in chunks `bounds`, stored zp-coded at `tiers` (chunks in `empty` as -1)."""
    rng = np.random.default_rng(seed)
    entry = {"name": "w", "kind": "linear", "shape": [R, K], "group_size": G, "bounds": list(bounds), "tiers": {}}
    with BundleWriter(path) as wr:
        if float_tier:
            compile_layouts(True, False)[0].record(entry, [[wr.add_array(rng.standard_normal((R, K)).astype(
                np.float32)[lo:hi]) for lo, hi in zip(bounds, bounds[1:])]])
        for t in tiers:
            layout = ZERO_POINT[t]
            g = layout.group(K, G)
            codes, scales, zps = _grid(rng, R, K, g, layout.bits)
            ids = [-1 if c in empty else wr.add_payload(layout.pack(codes[lo:hi], scales[lo:hi], zps[lo:hi], g)[0],
                                                      compress="never")
                   for c, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]
            layout.record(entry, [ids])
        wr.finish({"format": "ndc", "graph": None, "constants": None, "profile": None, "sample": None,
                   "tensors": [entry]})
    return entry


def test_zp_tiers_read_as_1_2_and_decode(tmp_path):
    p = tmp_path / "z.ndc"
    entry = _zp_bundle(p, float_tier=True)
    assert set(entry["zp"]) == {"q8", "q4", "q2"} and list(entry["tiers"]) == ["f32"]
    assert {t: lay.codec for t, (lay, _) in layouts_of(entry).items()} == \
        {"f32": "minmax", "q8": "zp", "q4": "zp", "q2": "zp"}
    with Bundle.open(p) as b:
        assert (b.preamble.major, b.preamble.minor) == (1, 2)
        e = b.tensors["w"]
        assert set(e.tiers) == {"f32", "q8", "q4", "q2"}
        for t in ("q8", "q4", "q2"):
            b.reset_counters()
            w = b.read_weight("w", t)
            assert b.bytes_read == sum(e.payload_nbytes(t, i) for i in range(2))
            pk = b.read_packed("w", t)
            codes = qcodec.unpack_stream(pk.codes.reshape(-1), pk.bits, pk.codes.size * 8 // pk.bits)
            q = codes.reshape(12, -1)[:, :40].astype(np.float32)
            z = qcodec.unpack_zero_points(pk.zero_points, pk.scales.shape[1], pk.bits).astype(np.float32)
            g = np.arange(40) // pk.block_size
            np.testing.assert_array_equal(w, pk.scales[:, g] * (q - z[:, g]))
        assert b.read_packed("w", "f32") is None
        with pytest.raises(BundleError):
            b.read_packed("nope", "q4")


def test_read_packed_empty_chunk_decodes_to_zeros(tmp_path):
    p = tmp_path / "z.ndc"
    _zp_bundle(p, tiers=("q4",), empty=(0,))
    with Bundle.open(p) as b:
        pk = b.read_packed("w", "q4")
        assert isinstance(pk, PackedWeight) and (pk.rows, pk.row_len, pk.block_size) == (12, 40, 16)
        assert pk.codes.shape == (12, 3, 8) and pk.scales.shape == (12, 3) and pk.zero_points.shape == (12, 2)
        assert not pk.scales[:5].any() and not b.read_weight("w", "q4")[:5].any()
        assert b.read_weight("w", "q4")[5:].any()


def test_read_packed_of_a_bundle_truncated_while_open(tmp_path):
    """read_packed reads its batches into NumPy buffers (`_pread_array`): a file cut short after the
    open is one BundleError, as for every other read."""
    p = tmp_path / "z.ndc"
    _zp_bundle(p, tiers=("q4",))
    with Bundle.open(p) as b:
        pk = b.read_packed("w", "q4")
        assert b.bytes_read == sum(b.tensors["w"].payload_nbytes("q4", i) for i in range(2))
        assert pk.codes.any()
        os.truncate(p, int(b.table["offset"][0]) + 8)
        with pytest.raises(BundleError, match="truncated bundle"):
            b.read_packed("w", "q4")


def mutated_copy(p, entry: dict, mutate) -> None:
    """Rewrite the one-tensor bundle at `p` with its own payloads and `entry` (its tensor's index entry)
    changed by `mutate`: a corrupt index for the reader to refuse."""
    import json

    with Bundle.open(p) as b:
        payloads = [b.read_payload(i) for i in range(len(b.table))]
    mutate(entry)
    with BundleWriter(p) as wr:
        for data in payloads:
            wr.add_payload(data, compress="never")
        wr.finish({"format": "ndc", "tensors": [json.loads(json.dumps(entry))]})


@pytest.mark.parametrize("mutate,msg", [
    (lambda e: e.update(group_size=24), "group_size"),
    (lambda e: e["zp"].update(f32=e["zp"]["q4"]), "zp must map"),
    (lambda e: e.update(zp=[]), "zp must map"),
    (lambda e: e["zp"].update(q4=e["zp"]["q4"][:1]), "one payload per chunk"),
    (lambda e: e["tiers"].update(q4=e["zp"]["q4"]), "both"),
    (lambda e: e["zp"].update(q2=e["zp"]["q4"]), "length|twice"),
])
def test_bad_zp_entries_are_refused(tmp_path, mutate, msg):
    p = tmp_path / "z.ndc"
    mutated_copy(p, _zp_bundle(p, tiers=("q4",)), mutate)
    with pytest.raises(BundleError, match=msg):
        Bundle.open(p)


# ------------------------------------------------------------------------------ ONNX Runtime
def _matmul_nbits(pk: PackedWeight, M: int):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(pk.codes, "B"), numpy_helper.from_array(pk.scales.reshape(-1), "scales"),
             numpy_helper.from_array(pk.zero_points.reshape(-1), "zero_points")]
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zero_points"], ["Y"], domain="com.microsoft",
                            K=pk.row_len, N=pk.rows, bits=pk.bits, block_size=pk.block_size, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [M, pk.row_len])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [M, pk.rows])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


@pytest.mark.parametrize("tier", ["q8", "q4", "q2"])
@pytest.mark.parametrize("K,G", [(40, 16), (100, 32), (72, 64), (10, 64)])
def test_read_packed_feeds_onnxruntime_matmulnbits(tmp_path, tier, K, G):
    ort = pytest.importorskip("onnxruntime")
    p = tmp_path / "z.ndc"
    _zp_bundle(p, tiers=(tier,), R=24, K=K, G=G, bounds=(0, 7, 24), empty=(0,) if K == 100 else ())
    with Bundle.open(p) as b:
        b.reset_counters()
        pk = b.read_packed("w", tier)
        assert b.bytes_read == sum(b.tensors["w"].payload_nbytes(tier, i) for i in range(2)
                                   if b.tensors["w"].chunk_pids(tier, i))
        w = b.read_weight("w", tier)
    assert K % pk.block_size != 0
    A = np.random.default_rng(7).standard_normal((5, K)).astype(np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(_matmul_nbits(pk, 5), so, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"A": A})
    ref = A @ w.T
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


@pytest.mark.parametrize("tier", ["q6", "q5", "q3"])
def test_widths_ort_lacks_feed_matmulnbits_as_8_bit_codes(tmp_path, tier):
    """6, 5 and 3 bits are handed to ONNX Runtime as 8-bit codes with the same scales and zero points
    (PackedWeight.widened): the same matrix, at 8 bits' resident bytes."""
    ort = pytest.importorskip("onnxruntime")
    p = tmp_path / "z.ndc"
    _zp_bundle(p, tiers=(tier,), R=24, K=100, G=32, bounds=(0, 7, 24))
    with Bundle.open(p) as b:
        pk = b.read_packed("w", tier)
        w = b.read_weight("w", tier)
    wide = pk.widened()
    assert wide.bits == 8 and wide.codes.nbytes == pk.codes.nbytes * 8 // pk.bits
    np.testing.assert_array_equal(wide.scales, pk.scales)
    A = np.random.default_rng(7).standard_normal((5, 100)).astype(np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    (y,) = ort.InferenceSession(_matmul_nbits(wide, 5), so, providers=["CPUExecutionProvider"]).run(None, {"A": A})
    ref = A @ w.T
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_scale_min_bundles_still_read(tmp_path):
    """A bundle of the legacy scale+min codec (no `zp` key) is written as 1.0 and decodes as §4.2."""
    rng = np.random.default_rng(5)
    R, K, G = 6, 40, 16
    entry = {"name": "w", "kind": "linear", "shape": [R, K], "group_size": G, "bounds": [0, 2, 6], "tiers": {}}
    codes, scales, mins = {}, {}, {}
    p = tmp_path / "legacy.ndc"
    with BundleWriter(p) as wr:
        for layout in compile_layouts(False, False, codec="minmax"):
            ng = -(-K // G)
            c = rng.integers(0, 1 << layout.bits, (R, K)).astype(np.uint8)
            s, m = (rng.uniform(-1, 1, (R, ng)).astype(np.float16) for _ in range(2))
            codes[layout.key], scales[layout.key], mins[layout.key] = c, s, m
            layout.record(entry, [[wr.add_payload(qcodec.pack(c[lo:hi], s[lo:hi], m[lo:hi], layout.bits, G))
                                   for lo, hi in ((0, 2), (2, 6))]])
        wr.finish({"format": "ndc", "tensors": [entry]})
    assert "zp" not in entry
    with Bundle.open(p) as b:
        assert (b.preamble.major, b.preamble.minor) == (1, 0)
        for t, bits in (("q8", 8), ("q4", 4), ("q2", 2)):
            want = qcodec.dequantize(qcodec.pack(codes[t], scales[t], mins[t], bits, G), R, K, G, bits)
            np.testing.assert_array_equal(b.read_weight("w", t), want)
            assert b.read_packed("w", t) is None   # not in the MatMulNBits layout


def test_compile_options_need_a_zp_group_size():
    from nadoo.compiler.pipeline import CompileOptions, check_layout_options
    from nadoo.runtime.errors import CompileError

    check_layout_options(CompileOptions(group_size=128))
    check_layout_options(CompileOptions(group_size=48, codec="minmax"))
    for bad in (CompileOptions(group_size=48), CompileOptions(group_size=512), CompileOptions(group_size=8),
                CompileOptions(codec="nf4")):
        with pytest.raises(CompileError):
            check_layout_options(bad)


def test_a_chunk_of_the_wrong_length_is_named(tmp_path):
    """Every chunk's payload length is checked at open against its layout (chunks of unequal height)."""
    rng = np.random.default_rng(5)
    R, K, G, bounds = 12, 40, 16, (0, 5, 9, 12)
    layout = ZERO_POINT["q4"]
    g = layout.group(K, G)
    codes, scales, zps = _grid(rng, R, K, g, layout.bits)
    for bad in range(3):
        p = tmp_path / f"bad{bad}.ndc"
        entry = {"name": "w", "kind": "linear", "shape": [R, K], "group_size": G, "bounds": list(bounds), "tiers": {}}
        with BundleWriter(p) as wr:
            ids = [wr.add_payload(layout.pack(codes[lo:hi], scales[lo:hi], zps[lo:hi], g)[0] + b"\0" * (c == bad),
                                  compress="never") for c, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]
            layout.record(entry, [ids])
            wr.finish({"format": "ndc", "graph": None, "constants": None, "profile": None, "sample": None,
                       "tensors": [entry]})
        with pytest.raises(BundleError, match=f"tensor w tier q4 chunk {bad}: payload length"):
            Bundle.open(p)


def test_read_packed_in_small_batches_is_the_same(tmp_path, monkeypatch):
    from nadoo.runtime import reader

    p = tmp_path / "z.ndc"
    _zp_bundle(p, tiers=("q4",), R=40, bounds=(0, 5, 12, 20, 33, 40), empty=(2,))
    with Bundle.open(p) as b:
        whole = b.read_packed("w", "q4")
        monkeypatch.setattr(reader, "_PACK_BATCH", 1)  # one chunk per read
        b.reset_counters()
        one = b.read_packed("w", "q4")
        assert b.payloads_read == 4
    for k in ("codes", "scales", "zero_points"):
        np.testing.assert_array_equal(getattr(one, k), getattr(whole, k))
