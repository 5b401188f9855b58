"""A gated MLP's down projection quantized along its input axis (NDC 1.3 key `zp_t`, runtime/tiers.py
`TransposedZeroPointTier`): the exact decode of a chunk's transpose, `Bundle.read_packed` against ONNX
Runtime's MatMulNBits (K = the neurons), the container rules, the compiler's layout of down, both engines
on a tiny LM, and bundles of the previous layout (groups along down's outputs) still running."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from nadoo.compiler.quantize import quantize_chunks_transposed  # noqa: E402
from nadoo.compiler.writer import BundleWriter  # noqa: E402
from nadoo.runtime import qcodec  # noqa: E402
from nadoo.runtime.errors import BundleError  # noqa: E402
from nadoo.runtime.reader import Bundle  # noqa: E402
from nadoo.runtime.tiers import ZERO_POINT, ZERO_POINT_T, layouts_of  # noqa: E402
from test_zp_codec import _matmul_nbits, mutated_copy  # noqa: E402

R, N, G = 80, 48, 32
BOUNDS = (0, 32, 64, 80)  # the last chunk is short: its one group of rows is padded


def _down_bundle(path, tiers=("q8", "q4", "q2"), empty=(), seed=0):
    """One tensor `d` [R neurons, N outputs] in chunks BOUNDS, quantized along its rows (zp_t)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((R, N)).astype(np.float32)
    entry = {"name": "d", "kind": "ffn_down", "shape": [R, N], "group_size": G, "bounds": list(BOUNDS), "tiers": {}}
    with BundleWriter(path) as wr:
        for t in tiers:
            layout = ZERO_POINT_T[t]
            chunks = quantize_chunks_transposed(w, list(BOUNDS), layout.bits, G, method="rtn")
            layout.record(entry, [[-1 if c in empty else wr.add_payload(p, compress="never")
                                   for c, (p, _) in enumerate(chunks)]])
        wr.finish({"format": "ndc", "graph": None, "constants": None, "profile": None, "sample": None,
                   "tensors": [entry]})
    return w, entry


def test_chunks_decode_as_transposed_zp_payloads(tmp_path):
    p = tmp_path / "d.ndc"
    w, entry = _down_bundle(p)
    assert set(entry["zp_t"]) == {"q8", "q4", "q2"} and "zp" not in entry
    assert {t: type(lay).__name__ for t, (lay, _) in layouts_of(entry).items()} == \
        dict.fromkeys(("q8", "q4", "q2"), "TransposedZeroPointTier")
    with Bundle.open(p) as b:
        assert (b.preamble.major, b.preamble.minor) == (1, 3)
        e = b.tensors["d"]
        for t, tol in (("q8", 0.02), ("q4", 0.3), ("q2", 1.5)):
            got = b.read_weight("d", t)
            for i, (lo, hi) in enumerate(zip(BOUNDS, BOUNDS[1:])):
                buf = b.read_payload(int(e.chunk_pids(t, i)[0]))
                assert len(buf) == e.payload_nbytes(t, i) == qcodec.zp_payload_nbytes(N, hi - lo, G, ZERO_POINT_T[t].bits)
                q, s, z = qcodec.unpack_zp(buf, N, hi - lo, G, ZERO_POINT_T[t].bits)  # of the transpose [N, r]
                g = np.arange(hi - lo) // G
                want = (s.astype(np.float32)[:, g] * (q.astype(np.float32) - z.astype(np.float32)[:, g])).T
                np.testing.assert_array_equal(got[lo:hi], want)
            # groups of 32 rows per output column: a real quantization of w, not any grid
            assert np.abs(got - w).max() < tol * np.abs(w).max()


@pytest.mark.parametrize("tier", ["q8", "q4", "q2"])
def test_read_packed_is_matmulnbits_over_the_neurons(tmp_path, tier):
    ort = pytest.importorskip("onnxruntime")
    p = tmp_path / "d.ndc"
    _down_bundle(p, tiers=(tier,), empty=(1,) if tier == "q4" else ())
    with Bundle.open(p) as b:
        b.reset_counters()
        pk = b.read_packed("d", tier)
        e = b.tensors["d"]
        assert b.bytes_read == sum(e.payload_nbytes(tier, i) for i in range(3) if e.chunk_pids(tier, i))
        w = b.read_weight("d", tier)
    bits = ZERO_POINT_T[tier].bits
    assert pk.of_transpose and (pk.rows, pk.row_len, pk.block_size, pk.bits) == (N, R, G, bits)
    assert pk.codes.shape == (N, 3, G * bits // 8) and pk.scales.shape == (N, 3)
    assert pk.zero_points.shape == (N, -(-3 * bits // 8))
    if tier == "q4":  # the empty chunk: zeros in the packed blocks and in the decode
        assert not pk.scales[:, 1].any() and not w[32:64].any() and w[64:].any()
    A = np.random.default_rng(7).standard_normal((5, R)).astype(np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    (y,) = ort.InferenceSession(_matmul_nbits(pk, 5), so, providers=["CPUExecutionProvider"]).run(None, {"A": A})
    ref = A @ w  # down as stored: x·W, W [neurons, outputs]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_quantizer_errors_are_those_of_the_decode():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((R, N)).astype(np.float32)
    H = np.cov(rng.standard_normal((R, 400)) * np.linspace(0.2, 3, R)[:, None]) + 0.1 * np.eye(R)
    for method, h in (("rtn", None), ("search", None), ("search", H)):
        kw = {"method": method, **({"hessian": h} if h is not None else {})}
        chunks = quantize_chunks_transposed(w, list(BOUNDS), 4, G, **kw)
        for (lo, hi), (buf, err) in zip(zip(BOUNDS, BOUNDS[1:]), chunks):
            wh = ZERO_POINT_T["q4"].decode("q4", [buf], hi - lo, N, G)
            assert err["mse"] == pytest.approx(float(((w[lo:hi] - wh) ** 2).mean()), rel=1e-6)
    # GPTQ with the input's second moment lowers the output error x·(W - Ŵ) against round-to-nearest
    x = rng.standard_normal((2000, R)) @ np.linalg.cholesky(H).T

    def out_err(**kw):
        wh = np.concatenate([ZERO_POINT_T["q4"].decode("q4", [b], hi - lo, N, G) for (lo, hi), (b, _) in
                             zip(zip(BOUNDS, BOUNDS[1:]), quantize_chunks_transposed(w, list(BOUNDS), 4, G, **kw))])
        return float(((x @ (w - wh)) ** 2).mean())

    assert out_err(method="search", hessian=H) < out_err(method="rtn")


def test_writer_records_minor_3_for_zp_t():
    from nadoo.compiler.writer import minor_version

    assert minor_version({"format": "ndc", "tensors": [{"name": "w", "tiers": {}, "zp_t": {}}]}) == 3
    assert minor_version({"format": "ndc", "tensors": [{"name": "w", "tiers": {}, "zp": {}}]}) == 2


@pytest.mark.parametrize("mutate,msg", [
    (lambda e: e.update(bounds=[0, 30, 64, 80]), "multiple of group_size"),
    (lambda e: e.update(group_size=24), "group_size"),
    (lambda e: e.update(zp={"q4": e["zp_t"]["q4"]}), "both"),
    (lambda e: e["zp_t"].update(f32=e["zp_t"]["q4"]), "zp_t must map"),
    (lambda e: e["zp_t"].update(q4=e["zp_t"]["q4"][:2]), "one payload per chunk"),
])
def test_bad_zp_t_entries_are_refused(tmp_path, mutate, msg):
    p = tmp_path / "d.ndc"
    mutated_copy(p, _down_bundle(p, tiers=("q4",))[1], mutate)
    with pytest.raises(BundleError, match=msg):
        Bundle.open(p)


# ------------------------------------------------------------------------------ a tiny LM, both layouts
@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    """The tiny Gemma 3 compiled as now (down: zp_t) and with the previous writer path (down's zp groups
    along its outputs, as every other tensor), from the same source and calibration."""
    pytest.importorskip("transformers")
    from lm_fixtures import tiny_model
    from nadoo.compiler import lm_compile
    from nadoo.compiler.lm_source import lm_source_from_model
    from nadoo.compiler.pipeline import CompileOptions

    d = tmp_path_factory.mktemp("down_lm")
    src = lm_source_from_model(tiny_model("gemma3", intermediate_size=80))  # 3 neuron groups, the last short
    opts = CompileOptions(keep_float=True)
    lm_compile.compile_lm_source(src, d / "new.ndc", opts, quiet=True)
    mp = pytest.MonkeyPatch()
    mp.setattr(lm_compile, "down_layout", lambda layout: layout)
    mp.setattr(lm_compile, "down_group", lambda layouts, group_size: group_size)
    try:
        lm_compile.compile_lm_source(src, d / "old.ndc", opts, quiet=True)
    finally:
        mp.undo()
    return {"new": d / "new.ndc", "old": d / "old.ndc"}


def _downs(b):
    return [e for e in b.tensors.values() if e.kind == "ffn_down"]


def test_the_compiler_writes_down_grouped_along_its_neurons(lms):
    with Bundle.open(lms["new"]) as b:
        assert b.preamble.minor == 3
        for e in _downs(b):
            assert e.group_size == 32 and e.bounds.tolist() == [0, 32, 64, 80]
            assert {t: type(lay).__name__ for t, (lay, _) in e.layouts.items()} == {
                "f32": "SeparateTier", **dict.fromkeys(("q8", "q4", "q3", "q2"), "TransposedZeroPointTier")}
            w = b.read_weight(e.name, "f32")
            for t, tol in (("q8", 0.01), ("q4", 0.2)):
                assert np.abs(b.read_weight(e.name, t) - w).max() < tol * np.abs(w).max()
        others = [e for e in b.tensors.values() if e.kind != "ffn_down"]
        assert others and all(type(e.layouts["q4"][0]).__name__ == "ZeroPointTier" for e in others)
    with Bundle.open(lms["old"]) as b:
        assert b.preamble.minor == 3  # the q3 tier (1.3) alone: down in the row-grouped zp layout
        assert all("zp_t" not in e.meta and "q4" in e.meta["zp"] for e in _downs(b))


def _segment_ops(bundle, tier, int8):
    """The ONNX ops SegmentExporter makes of every GatedFFN, and the MatMulNBits fed by the product h."""
    from nadoo.runtime.chunked.gated_ffn import GatedFFN
    from nadoo.runtime.ort_engine import SegmentExporter

    with Bundle.open(bundle) as b:
        ex = SegmentExporter(b, dict.fromkeys(b.tensors, tier), int8)
        for n in b.read_graph()["nodes"]:
            if n["op"] == "GatedFFN":
                GatedFFN.export(n, ex)
        mul_outs = {o for n in ex.nodes if n.op_type == "Mul" for o in n.output}
        down = [n.op_type for n in ex.nodes if n.input and n.input[0] in mul_outs and "MatMul" in n.op_type]
    return [n.op_type for n in ex.nodes].count("MatMulNBits"), down


@pytest.mark.parametrize("tier,int8,new_down,old_down", [
    ("q4", False, "MatMulNBits", "MatMul"),   # exact 4-bit: down on its codes now, float before
    ("q8", False, "MatMul", "MatMul"),        # exact 8/2-bit products stay float (as for every layer)
    ("q2", False, "MatMul", "MatMul"),
    ("q8", True, "MatMulNBits", "MatMul"),    # int8 activations: every width on its codes
    ("q2", True, "MatMulNBits", "MatMul"),
])
def test_ort_hands_down_over_as_matmulnbits(lms, tier, int8, new_down, old_down):
    layers = 4
    n_new, down_new = _segment_ops(lms["new"], tier, int8)
    n_old, down_old = _segment_ops(lms["old"], tier, int8)
    assert down_new == [new_down] * layers and down_old == [old_down] * layers
    assert n_new - n_old == (layers if new_down == "MatMulNBits" else 0)


@pytest.mark.parametrize("which", ["new", "old"])
@pytest.mark.parametrize("bits", ["8", "4", "2"])
def test_both_engines_agree(lms, which, bits):
    pytest.importorskip("onnxruntime")
    from nadoo.runtime.policy import Policy
    from nadoo.runtime.session import Session

    prompt = np.random.default_rng(0).integers(4, 128, 7)
    feeds = {"input_ids": prompt[None], "position_ids": np.arange(7)[None], "logits_to_keep": np.array([0])}
    got = {}
    for engine, int8 in (("numpy", False), ("ort", False), ("ort", True)):
        with Session(lms[which], Policy(bits=bits), engine=engine, ort_int8=int8) as s:
            got[engine, int8] = (s.run(None, feeds)[0], s.resident_weight_bytes)
    ref, exact, fast = got["numpy", False], got["ort", False], got["ort", True]
    np.testing.assert_allclose(exact[0], ref[0], rtol=1e-4, atol=1e-4 * float(np.abs(ref[0]).max()))
    assert np.abs(fast[0] - ref[0]).max() < 0.1 * np.abs(ref[0]).max()  # int8 activations: close, not equal
    if which == "new" and bits == "4":  # down resident as codes, not float32
        with Session(lms["old"], Policy(bits=bits), engine="ort") as s:
            assert exact[1] < s.resident_weight_bytes


@pytest.mark.parametrize("which", ["new", "old"])
def test_ffn_sparsity_zero_is_dense_and_sparsity_skips(lms, which):
    from nadoo.runtime.policy import Policy
    from nadoo.runtime.session import Session

    prompt = np.random.default_rng(2).integers(4, 128, 6).tolist()
    runs = {}
    for sp in (0.0, 0.5):
        with Session(lms[which], Policy(bits="4", ffn_sparsity=sp)) as s:
            r = s.generate(prompt_ids=prompt, max_new_tokens=5, stop_at_eos=False)
            runs[sp] = (r.token_ids, r.stats)
    with Session(lms[which], Policy(bits="4")) as s:
        dense = s.generate(prompt_ids=prompt, max_new_tokens=5, stop_at_eos=False).token_ids
    assert runs[0.0][0] == dense
    assert runs[0.5][1]["ffn_sparsity"] > 0.2
