"""Adding a chunked op is one class: registered here, in the test, it runs in a Session on a real bundle
(the golden one, with a graph naming the new op), counts its statistics, and `nadoo info` / export
handle it, with no change anywhere else."""

import json
from pathlib import Path

import numpy as np
import pytest

from nadoo.compiler.writer import BundleWriter
from nadoo.runtime import Policy, Session, UnsupportedError, callstats
from nadoo.runtime.chunked import REGISTRY, WeightOp, register
from nadoo.runtime.info import bundle_facts
from nadoo.runtime.reader import Bundle

GOLDEN = Path(__file__).resolve().parents[1] / "format_spec" / "golden"
W = np.asarray(json.loads((GOLDEN / "tiny.expected.json").read_text())["fc.weight"], np.float32)  # [4, 8], 2 chunks


class ChunkedScaleRows(WeightOp):
    """y = W * s[:, None]: row r of the stored tensor scaled by s[r]; only chunks with a non-zero scale
    are read."""

    op_type = "ChunkedScaleRows"

    def bind(self, node, ctx, env):
        e = self.tensor()
        self.start(e, env.policy.plan(e, env.layer_profile(e.name)))

    def __call__(self, s):
        e, b = self.entry, self.entry.bounds
        before = callstats.bytes_read()
        ids = [i for i in range(e.n_chunks) if np.any(s[b[i] : b[i + 1]])]
        y = np.zeros(e.shape, np.float32)
        for i, w in zip(ids, self.env.store.chunks(e, ids, self.plan.tiers)):
            y[b[i] : b[i + 1]] = w * s[b[i] : b[i + 1], None]
        rows = sum(int(b[i + 1] - b[i]) for i in ids)
        self.count(before, len(ids), rows * e.row_len, e.rows * e.row_len)
        return y

    @classmethod
    def export(cls, node, ex):
        name, axes, col = node["attrs"]["weight"], ex.fresh("axes"), ex.fresh("col")
        ex.initializer(name, ex.weight(name))
        ex.initializer(axes, np.array([1], np.int64))
        ex.add("Unsqueeze", [node["inputs"][0], axes], [col])
        ex.add("Mul", [name, col], node["outputs"])


@pytest.fixture
def scale_rows():
    register(ChunkedScaleRows)
    yield
    del REGISTRY[ChunkedScaleRows.op_type]


@pytest.fixture
def bundle(tmp_path):
    """The golden bundle with a graph of two ScaleRows nodes on its one chunked tensor: y = W*s + W*t."""
    node = lambda name, x: {"op": "ChunkedScaleRows", "domain": "nadoo", "name": name, "inputs": [x],  # noqa: E731
                            "outputs": [f"y_{x}"], "attrs": {"weight": "fc.weight"}}
    return with_graph(tmp_path / "scale.ndc", [node("a", "s"), node("b", "t"),
                      {"op": "Add", "domain": "", "name": "sum", "inputs": ["y_s", "y_t"], "outputs": ["y"], "attrs": {}}],
                      {"s": [4], "t": [4]}, [4, 8])


def with_graph(path, nodes: list, inputs: dict, out_shape: list):
    """The golden bundle (one chunked tensor fc.weight [4, 8]) with a graph of `nodes` computing y."""
    graph = {"opset": {"": 18, "nadoo": 1},
             "inputs": [{"name": n, "dtype": "float32", "shape": s} for n, s in inputs.items()],
             "outputs": [{"name": "y", "dtype": "float32", "shape": out_shape}], "nodes": nodes, "constants": []}
    with Bundle.open(GOLDEN / "tiny.ndc") as b:
        payloads = [b.read_payload(i) for i in range(len(b.table))]
        index = json.loads(json.dumps(b.index))
    payloads[index["graph"]] = json.dumps(graph).encode()
    with BundleWriter(path) as w:
        for p in payloads:
            w.add_payload(p, compress="never")
        w.finish(index)
    return path


def _stored(path, tier, chunk) -> int:
    with Bundle.open(path) as b:
        return int(b.table["stored"][b.tensors["fc.weight"].tiers[tier][chunk]])


def test_registered_op_runs_and_counts(scale_rows, bundle):
    s0, t0 = np.array([1, 2, 0, 0], np.float32), np.zeros(4, np.float32)
    s1, t1 = np.array([1, 0, 0, 3], np.float32), np.array([0, 1, 0, 0], np.float32)
    with Session(bundle, Policy(bits="4")) as sess:  # the golden weights decode exactly at every tier
        (y,), st = sess.run_with_stats(None, {"s": s0, "t": t0})
        np.testing.assert_array_equal(y, W * s0[:, None])
        layer = st["layers"]["fc.weight"]
        assert (layer["chunks_read"], layer["chunks_total"], layer["tiers"]) == (1, 2, ["q4"])
        assert st["bytes_read"] == layer["bytes_read"] == _stored(bundle, "q4", 0)  # chunk 1 never read
        (y,), st = sess.run_with_stats(None, {"s": s1, "t": t1})
        np.testing.assert_array_equal(y, W * (s1 + t1)[:, None])
        layer = st["layers"]["fc.weight"]
        # node a read both chunks, node b chunk 0: one layer, its chunks counted once
        assert (layer["chunks_read"], layer["chunks_total"]) == (3, 2) and (st["chunks_read"], st["chunks_total"]) == (3, 2)
        assert st["bytes_read"] == _stored(bundle, "q4", 1)  # chunk 0 came from the cache
        assert layer["macs"] == 3 * 2 * 8 and layer["dense_macs"] == 2 * 4 * 8
    with Bundle.open(bundle) as b:
        assert bundle_facts(b)["graph"]["ops"]["nadoo.ChunkedScaleRows"] == 2


def test_registered_op_exports(scale_rows, bundle):
    pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    from nadoo.runtime.export_onnx import bundle_to_onnx

    s, t = np.array([0.5, 0, 2, -1], np.float32), np.array([0, 1, 0, 1], np.float32)
    with Bundle.open(bundle) as b:
        (y,) = ReferenceEvaluator(bundle_to_onnx(b, "q8")).run(None, {"s": s, "t": t})
    np.testing.assert_array_equal(y, W * (s + t)[:, None])


def test_unregistered_op_is_one_clear_error(bundle):
    assert "ChunkedScaleRows" not in REGISTRY
    with pytest.raises(UnsupportedError, match="ChunkedScaleRows"):
        Session(bundle)


@pytest.mark.parametrize("op,attrs", [
    ("ChunkedConvTranspose", {"weight": "fc.weight"}),  # a 2-D tensor is no kernel
    ("ChunkedRecurrent", {"cell": "Elman", "weight": "fc.weight", "recurrence": "fc.weight"}),
    ("ChunkedRecurrent", {"cell": "LSTM", "weight": "fc.weight", "recurrence": "fc.weight"}),  # 4 rows, not 4·8
])
def test_weight_op_refuses_a_tensor_of_the_wrong_form_in_one_line(tmp_path, op, attrs):
    from nadoo.runtime.errors import ModelError

    node = {"op": op, "domain": "nadoo", "name": "n", "inputs": ["x"], "outputs": ["y"], "attrs": attrs}
    path = with_graph(tmp_path / "bad.ndc", [node], {"x": [1, 4, 3]}, None)
    with pytest.raises(ModelError, match=f"{op}") as e:
        Session(path)
    assert "\n" not in str(e.value)
