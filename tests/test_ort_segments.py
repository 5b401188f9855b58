"""How the ORT engine splits a plan into segments and runs them (runtime/ort_engine.py): generators
sized by shapes run in ORT, sized by an input's data they stay in NumPy under the plan's caps; a shape
a segment cannot settle is settled once, not per call; and a run's peak-RSS statistic is this
process's own, also when started from a bigger parent."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from nadoo.compiler.pipeline import CompileOptions, compile_model  # noqa: E402
from nadoo.runtime import Policy, Session  # noqa: E402
from nadoo.runtime.errors import ModelError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def bundle(tmp_path, nodes, inputs, y_shape, inits=()) -> Path:
    """An ONNX graph with one float output y, compiled as it is (no weights to chunk)."""
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                          list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(m, tmp_path / "m.onnx")
    compile_model(str(tmp_path / "m.onnx"), str(tmp_path / "m.ndc"), CompileOptions(keep_float=True), quiet=True)
    return tmp_path / "m.ndc"


def i64(name, *v):
    return helper.make_tensor(name, TensorProto.INT64, [len(v)] if len(v) != 1 else [], list(v))


def numpy_steps(s) -> list[str]:
    """The ops of the nodes a session's plan runs in NumPy."""
    return [lab[1] for st, lab in zip(s.plan._steps, s.plan._labels) if st[3] is not None]


@pytest.fixture(scope="module")
def positions(tmp_path_factory):
    """y = x + positions: Range over x's sequence length, Expand to x's shape (as transformers' position ids)."""
    d = tmp_path_factory.mktemp("positions")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "n"])
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "one"], ["n"], axis=0),
             helper.make_node("Range", ["zero", "n", "one"], ["pos"]),
             helper.make_node("Cast", ["pos"], ["posf"], to=TensorProto.FLOAT),
             helper.make_node("Expand", ["posf", "shape"], ["grid"]),
             helper.make_node("Add", ["x", "grid"], ["y"])]
    return bundle(d, nodes, [x], ["b", "n"], [i64("zero", 0), i64("one", 1)])


def test_shape_sized_generators_run_in_ort(positions):
    with Session(positions, Policy(bits="float"), engine="ort") as o, \
            Session(positions, Policy(bits="float"), engine="numpy") as n:
        assert not numpy_steps(o) and len(o.segments) == 1  # Range and Expand did not split the plan
        for shape in ((2, 5), (3, 11)):  # each new shape settled before ORT runs
            x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            np.testing.assert_allclose(o.run(None, {"x": x})[0], x + np.arange(shape[1], dtype=np.float32))
            np.testing.assert_array_equal(o.run(None, {"x": x})[0], n.run(None, {"x": x})[0])
        o.plan.max_elements = 40  # the Expand's 3 x 20 output is over it: refused before ORT computes it
        with pytest.raises(ModelError, match="over the run's cap"):
            o.run(None, {"x": np.zeros((3, 20), np.float32)})


def test_data_sized_generator_stays_in_numpy_under_the_cap(tmp_path):
    """Range's length is the largest token id: a value, not a shape. It runs in NumPy, whose size rule
    refuses a huge one before allocating, on both engines alike."""
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "n"])
    nodes = [helper.make_node("ReduceMax", ["ids"], ["top"], keepdims=0),
             helper.make_node("Range", ["zero", "top", "one"], ["r"]),
             helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["rf"], ["y"], keepdims=0)]
    path = bundle(tmp_path, nodes, [ids], [], [i64("zero", 0), i64("one", 1)])
    for engine in ("numpy", "ort"):
        with Session(path, Policy(bits="float"), engine=engine) as s:
            assert "Range" in numpy_steps(s)
            assert s.run(None, {"ids": np.array([[3, 9, 4]])})[0] == sum(range(9))
            with pytest.raises(ModelError, match="over the run's cap"):
                s.run(None, {"ids": np.array([[2 ** 40]])})


def test_a_shape_that_cannot_be_settled_is_settled_once(tmp_path, monkeypatch):
    """NonZero's output length depends on the data: its segment runs its nodes in NumPy, and the shape
    inference that found so is not repeated on every call."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    nodes = [helper.make_node("NonZero", ["x"], ["nz"]),
             helper.make_node("Cast", ["nz"], ["nzf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["nzf"], ["y"], keepdims=0)]
    path = bundle(tmp_path, nodes, [x], [])
    calls = []
    real = onnx.shape_inference.infer_shapes
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", lambda *a, **k: calls.append(1) or real(*a, **k))
    with Session(path, Policy(bits="float"), engine="ort") as s:
        assert len(s.segments) == 1
        x = np.array([0, 1, 0, 2, 3], np.float32)
        s.run(None, {"x": x})
        first = len(calls)
        assert first >= 1
        for _ in range(3):
            assert s.run(None, {"x": x})[0] == 1 + 3 + 4
        assert len(calls) == first


def test_peak_rss_is_this_process_own(tmp_path):
    """A process started from a parent with a bigger peak reports its own (getrusage would say the
    parent's), and the fast path agrees with /proc/self/status once the peak has grown."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("VmHWM is Linux's")
    child = ("import json, numpy as np; from nadoo.runtime import session as s; a = s.peak_rss_bytes(); "
             "b = np.ones(48 << 17); b += 1; print(json.dumps([a, s.peak_rss_bytes(), s._status_peak()]))")
    parent = ("import subprocess, sys, numpy as np; big = np.ones(200 << 17); big += 1; "
              f"sys.stdout.write(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, "
              "text=True, check=True).stdout)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / ".pp"), os.environ.get("PYTHONPATH", "")) if p))
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr[-500:]
    before, after, status = json.loads(out.stdout)
    assert before < (200 << 20)  # not the parent's 200 MiB
    assert after >= before + (40 << 20) and abs(after - status) < (4 << 20)


def test_scalar_constants_stay_scalars_in_a_segment(tmp_path):
    """ViT's class-token pick: Gather with a 0-d index gives [b, d], which a Gemm takes; a 0-d constant
    written as [1] would give [b, 1, d] and ORT's Gemm would refuse it (the zoo's ViT did, on the ORT engine)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, 8])
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 8], np.linspace(-1, 1, 24).tolist())
    nodes = [helper.make_node("Gather", ["x", "zero"], ["cls"], axis=1),
             helper.make_node("Gemm", ["cls", "w"], ["y"], transB=1)]
    path = bundle(tmp_path, nodes, [x], ["b", 3], [i64("zero", 0), w])
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)}
    with Session(path, Policy(bits="float"), engine="numpy") as a, Session(path, Policy(bits="float"), engine="ort") as b:
        want, got = a.run(None, feeds)[0], b.run(None, feeds)[0]
        assert b.ort_nodes == 2
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(want, feeds["x"][:, 0] @ np.linspace(-1, 1, 24, dtype=np.float32).reshape(3, 8).T,
                               rtol=1e-5, atol=1e-6)
