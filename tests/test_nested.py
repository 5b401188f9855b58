"""Nested bit-plane tiers (#5, NDC 1.1 §4.2b): codec, reader validation, compile + run."""
import numpy as np
import pytest

from nadoo.compiler.quantize import quantize
from nadoo.compiler.quantize_nested import quantize_nested
from nadoo.compiler.writer import BundleWriter
from nadoo.runtime import qcodec
from nadoo.runtime.errors import BundleError
from nadoo.runtime.reader import Bundle

from test_container import rewrite


def _formula(q8, s, m, G, bits):
    """The spec's dequantization of a truncated code, written out independently."""
    step = 2 ** (8 - bits)
    qb = (q8 >> (8 - bits)).astype(np.float32)
    c = qb * np.float32(step) + np.float32((step - 1) / 2)
    S = np.repeat(s.astype(np.float32), G, axis=1)[:, :q8.shape[1]]
    M = np.repeat(m.astype(np.float32), G, axis=1)[:, :q8.shape[1]]
    return S * c + M


@pytest.mark.parametrize("R,K,G", [(3, 10, 4), (5, 64, 64), (2, 7, 16), (1, 1, 1)])
def test_nested_round_trip_is_the_formula(R, K, G):
    rng = np.random.default_rng(R * 100 + K)
    ng = -(-K // G)
    q8 = rng.integers(0, 256, (R, K)).astype(np.uint8)
    s = rng.uniform(0.001, 0.1, (R, ng)).astype(np.float16)
    m = rng.uniform(-1, 1, (R, ng)).astype(np.float16)
    planes = qcodec.pack_nested(q8, s, m, G)
    assert [len(p) for p in planes] == [qcodec.nested_plane_nbytes(R, K, G, p) for p in range(3)]
    # plane A is exactly a q2 payload of the top two bits
    assert planes[0] == qcodec.pack(q8 >> 6, s, m, 2, G)
    for bits, n in ((2, 1), (4, 2), (8, 3)):
        got = qcodec.dequantize_nested(planes[:n], R, K, G, bits)
        np.testing.assert_array_equal(got, _formula(q8, s, m, G, bits))
    np.testing.assert_array_equal(qcodec.dequantize_nested(planes, R, K, G, 8),
                                  qcodec.dequantize(qcodec.pack(q8, s, m, 8, G), R, K, G, 8))
    with pytest.raises(BundleError):
        qcodec.dequantize_nested(planes[:1], R, K, G, 4)
    with pytest.raises(BundleError):
        qcodec.dequantize_nested([planes[0], planes[1][:-1] + b""], R, K, G, 4) if len(planes[1]) else \
            qcodec.dequantize_nested([planes[0], b"x"], R, K, G, 4)


def test_quantize_nested_truncation_is_the_4bit_quantization():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 96)).astype(np.float32)
    x = rng.standard_normal((256, 96)).astype(np.float32)
    H = x.T @ x / len(x)
    (planes, errs), = quantize_nested(w, [0, 8], 32, (x * x).mean(0), hessian=H)
    c4, s4, m4 = quantize(w, 4, 32, (x * x).mean(0), hessian=H, codec="minmax")  # the planes' grid
    q, *_ = qcodec.nested_codes(planes, 8, 96, 32, 8)
    np.testing.assert_array_equal(q[:, :96] >> 4, c4)          # the high nibble is the GPTQ 4-bit code
    w4 = qcodec.dequantize_nested(planes[:2], 8, 96, 32, 4)
    ref4 = qcodec.dequantize(qcodec.pack(c4, s4, m4, 4, 32), 8, 96, 32, 4)
    assert np.abs(w4 - ref4).max() <= 1e-3 * np.abs(w).max()    # same grid up to float16 rounding of min
    assert errs["q8"]["mse"] < errs["q4"]["mse"] / 20 and "q2" not in errs   # no nested 2-bit tier


def _nested_bundle(path, chunks=((3, 10), (2, 10)), G=4, tiers=None):
    """A tensor [5, 10] in two chunks stored only as nested planes; returns the expected q8 codes."""
    rng = np.random.default_rng(1)
    R = sum(r for r, _ in chunks)
    K = chunks[0][1]
    q8 = rng.integers(0, 256, (R, K)).astype(np.uint8)
    s = rng.uniform(0.01, 0.1, (R, -(-K // G))).astype(np.float16)
    m = rng.uniform(-1, 0, (R, -(-K // G))).astype(np.float16)
    planes = [[], [], []]
    with BundleWriter(path) as wr:
        lo = 0
        for r, _ in chunks:
            for p, data in enumerate(qcodec.pack_nested(q8[lo:lo + r], s[lo:lo + r], m[lo:lo + r], G)):
                planes[p].append(wr.add_payload(data, compress="never"))
            lo += r
        wr.finish({"format": "ndc", "graph": None, "constants": None, "profile": None, "sample": None,
                   "tensors": [{"name": "w", "kind": "linear", "shape": [R, K], "group_size": G,
                                "bounds": [0, chunks[0][0], R], "tiers": tiers or {}, "nested": {"planes": planes}}]})
    return q8, s, m


def test_reader_serves_q8_q4_from_planes_reading_only_their_bytes(tmp_path):
    p = tmp_path / "n.ndc"
    q8, s, m = _nested_bundle(p)
    with Bundle.open(p) as b:
        e = b.tensors["w"]
        assert {"q8", "q4"} <= set(e.tiers) and "q2" not in e.tiers  # plane A alone is no tier
        for tier, bits, n in (("q4", 4, 2), ("q8", 8, 3)):
            b.reset_counters()
            got = b.read_weight("w", tier)
            np.testing.assert_array_equal(got, _formula(q8, s, m, 4, bits))
            want = sum(int(b.table["stored"][pl[c]]) for pl in e.planes[:n] for c in range(2))
            assert b.bytes_read == want
            assert want == sum(e.payload_nbytes(tier, c) for c in range(2))
        # merged: a 4-bit read of one chunk is one positioned read of planes A+B
        b.reset_counters()
        data = b.read_payloads(e.chunk_pids("q4", 1))
        np.testing.assert_array_equal(b.decode_chunk(e, 1, "q4", data), _formula(q8, s, m, 4, 4)[3:])
        assert b.payloads_read == 2


def test_session_dense_4bit_reads_exactly_planes_a_and_b(tmp_path):
    torch = pytest.importorskip("torch")
    from examples.models import digits_data, train_digits_mlp
    from nadoo.compiler.pipeline import CompileOptions, compile_model
    from nadoo.runtime import Policy, Session

    Xtr, ytr, Xte, yte = digits_data()
    mlp = train_digits_mlp()
    torch.jit.save(torch.jit.trace(mlp, torch.zeros(1, 64)), tmp_path / "m.pt")
    np.savez(tmp_path / "c.npz", input=Xtr[:128])
    compile_model(str(tmp_path / "m.pt"), str(tmp_path / "m.ndc"),
                  CompileOptions(calib=str(tmp_path / "c.npz"), chunks=8, nested=True, bits_per_weight=6.0), quiet=True)
    with torch.no_grad():
        ref = float((mlp(torch.from_numpy(Xte)).argmax(1).numpy() == yte).mean())
    with Bundle.open(tmp_path / "m.ndc") as b:
        ab = sum(int(b.table["stored"][pl[c]]) for e in b.tensors.values() for pl in e.planes[:2]
                 for c in range(e.n_chunks) if pl[c] >= 0)
        assert all(not e.meta["tiers"] and len(e.planes) == 3 for e in b.tensors.values())
    acc = {}
    for bits in ("8", "4", "alloc"):  # the NumPy engine reads planes per call (ORT's at open)
        with Session(tmp_path / "m.ndc", Policy(bits=bits), engine="numpy") as s:
            pred = s.run(None, {"input": Xte})[0].argmax(1)
            acc[bits] = float(np.mean(pred == yte))
            if bits == "4":
                assert s.last_stats["bytes_read"] == ab
    from nadoo.runtime.errors import InputError
    with pytest.raises(InputError, match="no q2 tier"):  # nested offers no 2-bit tier: one clear error
        with Session(tmp_path / "m.ndc", Policy(bits="2"), engine="numpy") as s:
            s.run(None, {"input": Xte})
    assert acc["8"] >= ref - 0.01 and acc["4"] >= ref - 0.01 and acc["alloc"] >= ref - 0.02, (acc, ref)


def _mut(fn):
    def f(ix):
        fn(ix["tensors"][0])
    return f


BAD_NESTED = {
    "not an object": _mut(lambda t: t.__setitem__("nested", [1])),
    "four planes": _mut(lambda t: t["nested"]["planes"].append([90, 91])),
    "no planes": _mut(lambda t: t["nested"].__setitem__("planes", [])),
    "plane too short": _mut(lambda t: t["nested"]["planes"][1].pop()),
    "id out of range": _mut(lambda t: t["nested"]["planes"][2].__setitem__(0, 999)),
    "id not int": _mut(lambda t: t["nested"]["planes"][2].__setitem__(0, "3")),
    "id twice": _mut(lambda t: t["nested"]["planes"][2].__setitem__(1, t["nested"]["planes"][2][0])),
    "wrong length (A and B swapped)": _mut(lambda t: t["nested"].__setitem__(
        "planes", [t["nested"]["planes"][1], t["nested"]["planes"][0], t["nested"]["planes"][2]])),
    "empty in one plane only": _mut(lambda t: t["nested"]["planes"][1].__setitem__(0, -1)),
    "tier stored twice": _mut(lambda t: t["tiers"].__setitem__("q8", [-1, -1])),
    "no tiers and no nested": _mut(lambda t: t.pop("nested")),
}


@pytest.mark.parametrize("case", sorted(BAD_NESTED))
def test_reader_refuses_bad_nested_entries(tmp_path, case):
    p = tmp_path / "n.ndc"
    _nested_bundle(p)
    bad = tmp_path / "bad.ndc"
    bad.write_bytes(rewrite(p.read_bytes(), index=BAD_NESTED[case]))
    with pytest.raises(BundleError, match="corrupt bundle"):
        Bundle.open(bad)


def test_nested_beside_f32_and_a_two_plane_prefix(tmp_path):
    p = tmp_path / "n.ndc"
    _nested_bundle(p)
    ok = tmp_path / "ok.ndc"
    ok.write_bytes(rewrite(p.read_bytes(), index=_mut(lambda t: t["nested"]["planes"].pop())))
    with Bundle.open(ok) as b:   # planes A+B only: serves q4, not q8
        assert "q4" in b.tensors["w"].tiers and not {"q8", "q2"} & set(b.tensors["w"].tiers)
