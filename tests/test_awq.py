"""Activation-aware scaling (compiler/awq.py): the scaled bundle computes the source's function, and the
α search lowers a layer's measured output error when its inputs have outlier channels."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from examples.models import export_onnx
    from test_encoder_attention import _feeds, _tiny

    model = _tiny("bert", hidden=64, seed=1)  # 64 wide: whole groups of 64 inputs
    m = model.m
    with torch.no_grad():  # outlier channels in the LayerNorm outputs, as trained encoders have
        for ln in (m.embeddings.LayerNorm, m.encoder.layer[0].output.LayerNorm,
                   m.encoder.layer[0].attention.output.LayerNorm):
            ln.weight[:4] *= 8
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("awq")
    names = ["input_ids", "attention_mask"]
    export_onnx(model, _feeds(rng, 2, 12), d / "m.onnx", names, ["h"], {n: {0: "batch", 1: "seq"} for n in names})
    np.savez(d / "calib.npz", **_feeds(rng, 16, 24))
    feeds = _feeds(rng, 4, 30)
    with torch.no_grad():
        ref = model(*(torch.from_numpy(feeds[n]) for n in names)).numpy()
    return d, feeds, ref


_COMPILED: dict = {}


def _compile(d, awq):
    """The bundle (and compile report) of the fixture model with scaling on or off, compiled once."""
    from nadoo.compiler.pipeline import CompileOptions, compile_model

    if (d, awq) not in _COMPILED:
        out = d / f"m_{int(awq)}.ndc"
        rep = compile_model(d / "m.onnx", str(out), CompileOptions(calib=str(d / "calib.npz"), keep_float=True,
                                                                   awq=awq), quiet=True)
        _COMPILED[d, awq] = out, rep
    return _COMPILED[d, awq]


def _run(path, feeds, bits, engine="numpy"):
    from nadoo.runtime import Policy, Session

    with Session(path, Policy(bits=bits), engine=engine) as s:
        return s.run(None, feeds)[0]


def test_scaled_float_bundle_equals_torch_and_scaled_weights_are_stored(bert):
    from nadoo.runtime.reader import Bundle

    d, feeds, ref = bert
    path, rep = _compile(d, True)
    assert any(n.startswith("activation-aware scaling") for n in rep.notes)
    with Bundle.open(path) as b:
        ops = [n["op"] for n in b.read_graph()["nodes"]]
    assert ops.count("Mul") >= 2  # the 1/s of the q/k/v and FFN inputs (V → output projection needs none)
    for engine in ("numpy", "ort"):
        if engine == "ort":
            pytest.importorskip("onnxruntime")
        np.testing.assert_allclose(_run(path, feeds, "float", engine), ref, rtol=1e-5, atol=1e-5)


def test_scaling_lowers_the_4bit_error_on_outlier_inputs(bert):
    d, feeds, ref = bert
    err = {}
    for awq in (False, True):
        path, _ = _compile(d, awq)
        err[awq] = float(np.mean((_run(path, feeds, "4") - ref) ** 2))
    assert err[True] < err[False]


def test_alpha_search_prefers_scaling_for_outlier_channels():
    from nadoo.compiler.awq import search_alpha

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2048, 128)).astype(np.float32)
    x[:, :3] *= 20  # three outlier channels
    H = (x.T @ x / len(x)).astype(np.float64)
    w = rng.standard_normal((96, 128)).astype(np.float32)
    a, s, errs = search_alpha([w], H, 64, "zp")
    assert a > 0 and errs[a] < 0.8 * errs[0.0]
    assert s[:3].min() > s[3:].max()  # the outlier channels get the largest scales
    assert np.isclose(np.exp(np.mean(np.log(s))), 1.0, atol=1e-5)
