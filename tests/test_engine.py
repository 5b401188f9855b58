"""End-to-end engine tests: digits MLP, digits CNN and all-MiniLM-L6-v2 exported with torch's dynamo exporter,
converted with onnx_to_graph and run by Plan, compared with onnxruntime and torch. Plus input validation."""
from __future__ import annotations

import json
import os
import sys
import warnings

import numpy as np
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from examples import models  # noqa: E402
from nadoo.compiler.onnx_to_graph import onnx_to_graph  # noqa: E402
from nadoo.runtime.engine import Plan  # noqa: E402
from nadoo.runtime.errors import InputError  # noqa: E402


def _ort(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _roundtrip_json(graph):
    return json.loads(json.dumps(graph))


@pytest.fixture(scope="module")
def digits():
    return models.digits_data()


@pytest.fixture(scope="module")
def mlp(tmp_path_factory, digits):
    m = models.train_digits_mlp()
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models.export_onnx(m, (torch.from_numpy(digits[2][:2]),), path, ["x"], ["logits"], {"x": {0: "batch"}})
    g, c = onnx_to_graph(onnx.load(str(path)))
    return m, path, Plan(_roundtrip_json(g), c), g


@pytest.fixture(scope="module")
def cnn(tmp_path_factory, digits):
    m = models.train_digits_cnn()
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    x = torch.from_numpy(digits[2][:2].reshape(-1, 1, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models.export_onnx(m, (x,), path, ["x"], ["logits"], {"x": {0: "batch"}})
    g, c = onnx_to_graph(onnx.load(str(path)))
    return m, path, Plan(_roundtrip_json(g), c), g


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    tok, m = models.load_minilm()
    inp = models.minilm_inputs(tok, models.SENTENCES[:2], seq_len=16)
    path = tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    axes = {k: {0: "batch", 1: "seq"} for k in inp}
    axes.update({"last_hidden_state": {0: "batch", 1: "seq"}, "pooler_output": {0: "batch"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models.export_onnx(m, inp, path, list(inp), ["last_hidden_state", "pooler_output"], axes)
    g, c = onnx_to_graph(onnx.load(str(path)))
    return tok, m, path, Plan(_roundtrip_json(g), c), g


# ------------------------------------------------------------------------------------------------ fixtures
def test_digits_models_accuracy(mlp, cnn, digits):
    _, _, X_test, y_test = digits
    with torch.no_grad():
        acc_mlp = (mlp[0](torch.from_numpy(X_test)).argmax(1).numpy() == y_test).mean()
        acc_cnn = (cnn[0](torch.from_numpy(X_test.reshape(-1, 1, 8, 8))).argmax(1).numpy() == y_test).mean()
    assert acc_mlp >= 0.95 and acc_cnn >= 0.95


def test_sentences_fixture():
    assert len(models.SENTENCES) >= 60 and len(set(models.SENTENCES)) == len(models.SENTENCES)


# ------------------------------------------------------------------------------------------------ MLP/CNN
@pytest.mark.parametrize("batch", [1, 3])
def test_mlp_matches_ort_and_torch(mlp, digits, batch):
    m, path, plan, g = mlp
    x = digits[2][:batch]
    (y,) = plan.run({"x": x})
    (ref,) = _ort(path).run(None, {"x": x})
    with torch.no_grad():
        tref = m(torch.from_numpy(x)).numpy()
    assert y.shape == (batch, 10) and y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(y, tref, rtol=1e-4, atol=1e-5)
    assert g["inputs"][0]["shape"] == ["batch", 64]


@pytest.mark.parametrize("batch", [1, 3])
def test_cnn_matches_ort_and_torch(cnn, digits, batch):
    m, path, plan, g = cnn
    x = digits[2][:batch].reshape(-1, 1, 8, 8)
    (y,) = plan.run({"x": x})
    (ref,) = _ort(path).run(None, {"x": x})
    with torch.no_grad():
        tref = m(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(y, tref, rtol=1e-4, atol=1e-5)
    assert {n["op"] for n in g["nodes"]} >= {"Conv", "MaxPool"}


def test_cnn_accuracy_through_engine(cnn, digits):
    _, _, X_test, y_test = digits
    (y,) = cnn[2].run({"x": X_test.reshape(-1, 1, 8, 8)})
    assert (y.argmax(1) == y_test).mean() >= 0.95


# ------------------------------------------------------------------------------------------------ MiniLM
@pytest.mark.parametrize("batch,seq_len", [(1, 32), (3, 32), (1, 9), (3, 20)])
def test_minilm_matches_ort_and_torch(minilm, batch, seq_len):
    tok, m, path, plan, g = minilm
    feeds = models.minilm_inputs(tok, models.SENTENCES[5:5 + batch], seq_len=seq_len)
    out = plan.run(feeds)
    ref = _ort(path).run(None, feeds)
    assert [o.shape for o in out] == [(batch, seq_len, 384), (batch, 384)]
    for a, b in zip(out, ref):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        t = m(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    np.testing.assert_allclose(out[0], t.last_hidden_state.numpy(), rtol=1e-4, atol=2e-4)


def test_minilm_graph_keeps_symbolic_dims(minilm):
    g = minilm[4]
    assert [i["name"] for i in g["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    for i in g["inputs"]:
        assert i["dtype"] == "int64" and i["shape"] == ["batch", "seq"]
    assert g["outputs"][0]["shape"] == ["batch", "seq", 384]


# ------------------------------------------------------------------------------------------------ validation
def test_input_validation(mlp):
    plan = mlp[2]
    x = np.zeros((2, 64), np.float32)
    with pytest.raises(InputError, match="missing input 'x'"):
        plan.run({})
    with pytest.raises(InputError, match="unknown input 'y'"):
        plan.run({"x": x, "y": x})
    with pytest.raises(InputError, match="rank"):
        plan.run({"x": x.reshape(2, 8, 8)})
    with pytest.raises(InputError, match="dimension 1 must be 64"):
        plan.run({"x": np.zeros((2, 63), np.float32)})
    with pytest.raises(InputError, match="dtype"):
        plan.run({"x": np.zeros((2, 64), np.complex64)})
    with pytest.raises(InputError, match="dtype"):
        plan.run({"x": np.zeros((2, 64), np.int64)})
    # float64 -> float32 is a safe, accepted cast
    (y,) = plan.run({"x": x.astype(np.float64)})
    assert y.dtype == np.float32


def test_input_validation_int_cast_and_symbols(minilm):
    tok, _, _, plan, _ = minilm
    feeds = models.minilm_inputs(tok, models.SENTENCES[:2], seq_len=8)
    ref = plan.run(feeds)
    out = plan.run({k: v.astype(np.int32) for k, v in feeds.items()})  # int32 -> int64 accepted
    np.testing.assert_array_equal(out[0], ref[0])
    with pytest.raises(InputError, match="dtype"):
        plan.run({**feeds, "input_ids": feeds["input_ids"].astype(np.float32)})
    bad = dict(feeds)
    bad["attention_mask"] = np.ones((2, 9), np.int64)
    with pytest.raises(InputError, match="seq"):
        plan.run(bad)


def test_plan_reusable_and_outputs_independent(mlp):
    plan = mlp[2]
    x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    (a,) = plan.run({"x": x})
    a_copy = a.copy()
    a[...] = 0
    (b,) = plan.run({"x": x})
    np.testing.assert_array_equal(b, a_copy)
    assert plan.input_names == ["x"] and plan.output_names == ["logits"]
