"""runtime/onnx_proto.py writes the same bytes as the onnx package for what the ORT engine builds, and
ONNX Runtime runs its models."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import helper, numpy_helper  # noqa: E402

from nadoo.runtime import onnx_proto as op  # noqa: E402


def build(h, nh, external: bool):
    w = np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5
    nodes = [h.make_node("MatMul", ["x", "w"], ["y0"], name="mm"),
             h.make_node("Gemm", ["y0", "w2", "b"], ["y1"], alpha=0.5, transB=1),
             h.make_node("Reshape", ["y1", "shape"], ["y2"], allowzero=0),
             h.make_node("Transpose", ["y2"], ["y"], perm=[1, 0]),
             h.make_node("ReduceSum", ["y"], ["s"], keepdims=-1, noop_with_empty_axes=0),
             h.make_node("Pad", ["y", "pads"], ["p"], mode="constant"),
             h.make_node("SkipLayerNormalization", ["p", "p", "g"], ["q"], domain="com.microsoft", epsilon=1e-5),
             h.make_node("Split", ["q"], ["q0", "q1"], axis=0, name="")]
    inits = [nh.from_array(np.ones(4, np.float32), "b"), nh.from_array(np.array([4, -1], np.int64), "shape"),
             nh.from_array(np.array([0, 0, 1, 1], np.int64), "pads"), nh.from_array(np.ones(4, np.float32), "g"),
             nh.from_array(np.array(True), "flag"), nh.from_array(np.array([b"a", b"bc"], object), "strs")]
    g = h.make_graph(nodes, "t", [h.make_tensor_value_info("x", h.np_dtype_to_tensor_dtype(np.dtype(np.float32)), [None, "n", 3]),
                                  h.make_tensor_value_info("s0", 7, [])],
                     [h.make_tensor_value_info("y", 1, None), h.make_tensor_value_info("q0", 0, None)], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("com.microsoft", 1)], producer_name="nadoo")
    m.ir_version = 10
    if external:
        t = m.graph.initializer.add(name="w", data_type=1, dims=w.shape, data_location=1)
        t.external_data.add(key="location", value="nadoo-memory")
    else:
        m.graph.initializer.append(nh.from_array(w, "w"))
    m.graph.initializer.append(nh.from_array(w.T.copy(), "w2"))
    return m


@pytest.mark.parametrize("external", [False, True])
def test_same_bytes_as_onnx(external):
    ours = build(op, op, external).SerializeToString()
    theirs = build(helper, numpy_helper, external)
    if external:  # onnx's initializer.add() takes the same keywords
        pass
    assert ours == theirs.SerializeToString()
    assert onnx.ModelProto.FromString(ours) == theirs


def test_attribute_kinds_match_onnx():
    t = op.from_array(np.array([1.5, -2], np.float32))
    for key, value, kw in [("f", 0.25, {}), ("i", -3, {}), ("s", "abc", {}), ("fs", [1.0, 2.5], {}),
                           ("is", [1, -2, 3], {}), ("ss", ["a", "b"], {}), ("e", [], {"attr_type": 7})]:
        mine = op.make_attribute(key, value, **kw)
        ref = helper.make_attribute(key, value, **kw)
        wire = op.Graph([op.Node("X", [], [], None, None)], "g", [], [])
        wire.node[0].attribute.append(mine)
        ref_node = helper.make_node("X", [], [])
        ref_node.attribute.append(ref)
        assert wire.serialize() == helper.make_graph([ref_node], "g", [], []).SerializeToString(), key
    assert op.make_attribute("t", t).type == op.AttributeProto.TENSOR


def test_ort_runs_it():
    h = op
    n = h.make_node("MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft", K=32, N=2, bits=4, block_size=32)
    codes = np.random.default_rng(0).integers(0, 256, (2, 1, 16), dtype=np.uint8)
    scales, zps = np.array([0.5, 0.25], np.float32), np.array([8, 8], np.uint8)
    g = h.make_graph([n], "p", [h.make_tensor_value_info("x", 1, [1, 32])], [h.make_tensor_value_info("y", 1, None)],
                     [h.from_array(codes, "b"), h.from_array(scales, "s"), h.from_array(zps, "z")])
    m = h.make_model(g, [h.make_opsetid("", 18), h.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.linspace(-1, 1, 32, dtype=np.float32)[None]
    lo, hi = codes & 15, codes >> 4
    q = np.stack([lo, hi], -1).reshape(2, 32).astype(np.float32)
    w = (q - 8) * scales[:, None]
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ w.T, rtol=1e-5, atol=1e-5)


def test_type_rules_agree_with_onnx_inference(tmp_path):
    """runtime/onnx_types.py's types equal onnx's on a real graph it covers (a tiny Gemma bundle's), and it
    declines a graph with an operator it has no rule for."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from lm_fixtures import tiny_model

    from nadoo.compiler.lm_compile import compile_lm
    from nadoo.compiler.pipeline import CompileOptions
    from nadoo.runtime import ort_build
    from nadoo.runtime.onnx_types import in_opset, infer_types
    from nadoo.runtime.reader import Bundle

    tiny_model("gemma3", vocab=128).save_pretrained(tmp_path / "hf")
    compile_lm(tmp_path / "hf", tmp_path / "g.ndc", CompileOptions(), quiet=True)
    with Bundle.open(tmp_path / "g.ndc") as b:
        graph, constants = b.read_graph(), b.read_constants()
    known = {i["name"]: np.dtype(i["dtype"]) for i in graph["inputs"]}
    known.update({n: np.asarray(constants[n]).dtype for n in graph.get("constants", [])})
    for n in graph["nodes"]:
        if n.get("domain") == "nadoo":
            known.update({o: np.dtype(np.float32) for o in n["outputs"] if o})
    ours = infer_types(graph, known)
    assert ours is not None and len(ours) > len(known)
    real = ort_build.infer_types
    try:
        ort_build.infer_types = lambda g, k: None  # force the onnx path
        theirs = ort_build.value_types(graph, constants)
    finally:
        ort_build.infer_types = real
    assert ours == theirs
    odd = {**graph, "nodes": graph["nodes"] + [{"op": "Hardmax", "inputs": [graph["inputs"][0]["name"]],
                                                 "outputs": ["h"], "name": "h"}]}
    assert infer_types(odd, known) is None
    assert in_opset("RMSNormalization", 23) and not in_opset("RMSNormalization", 18) and not in_opset("Nope", 99)


def test_ort_engine_builds_segments_without_onnx(tmp_path):
    """Building the segments writes their models with onnx_proto and types them with onnx_types: with
    onnx's model classes unusable the session still builds its segments (only shape settling, at the
    first call, needs onnx)."""
    import subprocess
    import sys

    script = tmp_path / "open.py"
    script.write_text(
        "import sys\nimport numpy as np\nimport torch\n"
        "from nadoo.compiler.pipeline import CompileOptions, compile_model\n"
        "m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8)).eval()\n"
        f"d = r'{tmp_path}'\n"
        "x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)\n"
        "torch.onnx.export(m, (torch.from_numpy(x[:1]),), d + '/m.onnx', input_names=['x'], output_names=['y'],\n"
        "                  dynamic_axes={'x': {0: 'n'}}, dynamo=False)\n"
        "np.savez(d + '/c.npz', x=x)\n"
        "compile_model(d + '/m.onnx', d + '/m.ndc', CompileOptions(calib=d + '/c.npz', min_elements=256), quiet=True)\n")
    env = {**__import__("os").environ}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    probe = ("import onnx, nadoo.runtime as nd\n"
             "def unusable(*a, **k):\n    raise RuntimeError('onnx used')\n"
             "onnx.helper.make_node = onnx.helper.make_model = onnx.numpy_helper.from_array = unusable\n"
             "onnx.shape_inference.infer_shapes = unusable\n"
             f"s = nd.Session(r'{tmp_path}/m.ndc', policy=nd.Policy(bits='4'), engine='ort')\n"
             "print(s.engine, s.ort_nodes > 0)\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "ort True"
