"""onnx_to_graph + per-operator checks of the NumPy engine against onnxruntime on tiny hand-built models."""
from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from nadoo.compiler.onnx_to_graph import onnx_to_graph  # noqa: E402
from nadoo.runtime.engine import Plan  # noqa: E402
from nadoo.runtime.errors import UnsupportedError  # noqa: E402

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _model(nodes, inputs, outputs, inits=(), opset=18, extra_opsets=()):
    g = helper.make_graph(nodes, "t", inputs, outputs, initializer=list(inits))
    ops = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    m = helper.make_model(g, opset_imports=ops)
    m.ir_version = 9
    return m


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _run_both(model, feeds, rtol=1e-5, atol=1e-6):
    graph, consts = onnx_to_graph(model)
    graph = json.loads(json.dumps(graph))
    ours = Plan(graph, consts).run(feeds)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, feeds)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape, (a.shape, b.shape)
        assert a.dtype == b.dtype, (a.dtype, b.dtype)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
    return graph, ours


def _single(op, feeds, out_elem=F, attrs=None, inits=(), n_out=1, opset=18, extra_inputs=()):
    """One-node model; feeds: name -> array (graph inputs); inits: numpy initializers by name."""
    in_names = list(feeds) + [n for n, _ in inits] + list(extra_inputs)
    ins = [_vi(n, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape)) for n, a in feeds.items()]
    outs = [_vi(f"y{k}", out_elem, None) for k in range(n_out)]
    node = helper.make_node(op, in_names, [f"y{k}" for k in range(n_out)], **(attrs or {}))
    init = [numpy_helper.from_array(np.asarray(a), n) for n, a in inits]
    return _model([node], ins, outs, init, opset=opset)


rng = np.random.default_rng(0)


def _r(*shape):
    return np.asarray(rng.standard_normal(shape), dtype=np.float32)


# ------------------------------------------------------------------------------------------------ conv/pool
@pytest.mark.parametrize("cfg", [
    dict(c=4, m=6, k=(3, 3), group=1, strides=[1, 1], pads=[1, 1, 1, 1], dil=[1, 1]),
    dict(c=4, m=8, k=(3, 3), group=2, strides=[2, 2], pads=[0, 1, 1, 0], dil=[1, 1]),
    dict(c=6, m=6, k=(3, 2), group=6, strides=[1, 2], pads=[2, 1, 0, 1], dil=[2, 1]),
    dict(c=3, m=4, k=(1, 1), group=1, strides=[1, 1], pads=[0, 0, 0, 0], dil=[1, 1]),
])
def test_conv2d(cfg):
    x = _r(2, cfg["c"], 9, 8)
    w = _r(cfg["m"], cfg["c"] // cfg["group"], *cfg["k"])
    b = _r(cfg["m"])
    m = _single("Conv", {"x": x}, inits=[("w", w), ("b", b)],
                attrs=dict(group=cfg["group"], strides=cfg["strides"], pads=cfg["pads"], dilations=cfg["dil"]))
    _run_both(m, {"x": x}, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_conv_auto_pad_1d_dynamic_weight(auto_pad):
    x, w = _r(1, 2, 11), _r(3, 2, 4)
    m = _single("Conv", {"x": x, "w": w}, attrs=dict(auto_pad=auto_pad, strides=[2]))
    _run_both(m, {"x": x, "w": w}, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op,attrs", [
    ("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2])),
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    ("MaxPool", dict(kernel_shape=[2, 2], dilations=[2, 2])),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)),
    ("AveragePool", dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)),
    ("GlobalAveragePool", {}),
    ("GlobalMaxPool", {}),
])
def test_pool(op, attrs):
    x = _r(2, 3, 7, 8)
    _run_both(_single(op, {"x": x}, attrs=attrs), {"x": x})


# ------------------------------------------------------------------------------------------------ indexing
@pytest.mark.parametrize("starts,ends,axes,steps", [
    ([0, 1], [3, -1], [0, 1], [1, 1]),
    ([-1], [-1000], [1], [-1]),
    ([5, 4], [0, -100], [0, 1], [-2, -3]),
    ([1], [1000], [-1], [2]),
    ([2], [-2], None, None),
])
def test_slice(starts, ends, axes, steps):
    x = _r(6, 7)
    inits = [("s", np.array(starts, np.int64)), ("e", np.array(ends, np.int64))]
    if axes is not None:
        inits.append(("a", np.array(axes, np.int64)))
    if steps is not None:
        inits.append(("st", np.array(steps, np.int64)))
    _run_both(_single("Slice", {"x": x}, inits=inits), {"x": x})


def test_slice_dynamic_starts():
    x = _r(6, 7)
    feeds = {"x": x, "s": np.array([-2], np.int64), "e": np.array([-7], np.int64),
             "a": np.array([1], np.int64), "st": np.array([-1], np.int64)}
    _run_both(_single("Slice", feeds), feeds)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_negative_indices(axis):
    x = _r(4, 5, 6)
    idx = np.array([[0, -1], [-2, 2]], np.int64)
    _run_both(_single("Gather", {"x": x, "i": idx}, attrs=dict(axis=axis)), {"x": x, "i": idx})


def test_gather_scalar_index_constant():
    x = _r(4, 5)
    m = _single("Gather", {"x": x}, inits=[("i", np.array(-1, np.int64))], attrs=dict(axis=1))
    _run_both(m, {"x": x})


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_elements(axis):
    x = _r(3, 4, 5)
    shape = list(x.shape)
    shape[axis] = 2
    d = x.shape[axis]
    idx = rng.integers(-d, d, size=shape).astype(np.int64)
    _run_both(_single("GatherElements", {"x": x, "i": idx}, attrs=dict(axis=axis)), {"x": x, "i": idx})


@pytest.mark.parametrize("batch_dims", [0, 1])
def test_gather_nd(batch_dims):
    x = _r(2, 3, 4)
    idx = np.array([[[0, 1], [1, -1]], [[1, 0], [2, 3]]], np.int64) if batch_dims else \
        np.array([[0, 1], [1, -2]], np.int64)
    _run_both(_single("GatherND", {"x": x, "i": idx}, attrs=dict(batch_dims=batch_dims)), {"x": x, "i": idx})


# ------------------------------------------------------------------------------------------------ broadcasting etc.
@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"])
@pytest.mark.parametrize("sa,sb", [((3, 1, 5), (4, 1)), ((1,), (2, 3)), ((), (2, 3)), ((2, 3, 4), (2, 3, 4))])
def test_broadcast_binary(op, sa, sb):
    a = np.asarray(np.abs(_r(*sa)) + 0.5, dtype=np.float32) if op == "Pow" else _r(*sa)
    b = _r(*sb)
    _run_both(_single(op, {"a": a, "b": b}), {"a": a, "b": b}, rtol=1e-5, atol=1e-5)


def test_integer_div_truncates_and_compare_where():
    a = np.array([7, -7, 7, -7, 0], np.int64)
    b = np.array([2, 2, -2, -2, 3], np.int64)
    _run_both(_single("Div", {"a": a, "b": b}, out_elem=I64), {"a": a, "b": b})
    c, x, y = _r(3, 1) > 0, _r(1, 4), _r(3, 4)
    _run_both(_single("Where", {"c": c, "x": x, "y": y}), {"c": c, "x": x, "y": y})


@pytest.mark.parametrize("op,attrs", [
    ("Softmax", dict(axis=1)), ("LogSoftmax", dict(axis=-1)), ("Erf", {}), ("Gelu", {}),
    ("Gelu", dict(approximate="tanh")), ("Sigmoid", {}), ("Tanh", {}), ("Relu", {}),
    ("LeakyRelu", dict(alpha=0.1)), ("ReduceMean", dict(keepdims=0)), ("ReduceMax", {}),
    ("Transpose", dict(perm=[2, 0, 1])), ("Flatten", dict(axis=2)), ("Shape", dict(start=1)),
    ("ArgMax", dict(axis=1, keepdims=0)), ("Cast", dict(to=TensorProto.INT64)),
])
def test_unary_like(op, attrs):
    x = _r(2, 3, 4) * 3
    out_elem = I64 if op in ("Shape", "ArgMax") or attrs.get("to") == I64 else F
    m = _single(op, {"x": x}, attrs=attrs, out_elem=out_elem, opset=20 if op == "Gelu" else 18)
    _run_both(m, {"x": x}, rtol=1e-5, atol=2e-6)


def test_reduce_with_axes_input_and_layernorm():
    x = _r(2, 3, 4)
    _run_both(_single("ReduceSum", {"x": x}, inits=[("a", np.array([0, -1], np.int64))]), {"x": x})
    s, b = _r(4), _r(4)
    m = _single("LayerNormalization", {"x": x}, inits=[("s", s), ("b", b)], attrs=dict(epsilon=1e-5))
    _run_both(m, {"x": x}, rtol=1e-5, atol=1e-5)


def test_shape_ops_chain():
    """Reshape with 0/-1, Unsqueeze/Squeeze with axes inputs, Concat, Split, Expand, Range, ConstantOfShape."""
    x = _r(2, 3, 4)
    nodes = [
        helper.make_node("Reshape", ["x", "shp"], ["r"]),
        helper.make_node("Unsqueeze", ["r", "ax0"], ["u"]),
        helper.make_node("Squeeze", ["u", "ax0"], ["q"]),
        helper.make_node("Concat", ["q", "q"], ["c"], axis=-1),
        helper.make_node("Split", ["c"], ["s0", "s1"], axis=1, num_outputs=2),
        helper.make_node("Shape", ["x"], ["sh"]),
        helper.make_node("Expand", ["one", "sh"], ["ex"]),
        helper.make_node("Range", ["zero", "n", "step"], ["rg"]),
        helper.make_node("ConstantOfShape", ["sh"], ["cs"],
                         value=numpy_helper.from_array(np.array([2.5], np.float32))),
        helper.make_node("Add", ["ex", "cs"], ["y2"]),
    ]
    inits = [numpy_helper.from_array(np.array([0, -1], np.int64), "shp"),
             numpy_helper.from_array(np.array([0], np.int64), "ax0"),
             numpy_helper.from_array(np.ones((1, 4), np.float32), "one"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array(2, np.int64), "step")]
    m = _model(nodes, [_vi("x", F, [2, 3, 4]), _vi("n", I64, [])],
               [_vi("s0", F, None), _vi("s1", F, None), _vi("y2", F, None), _vi("rg", I64, None)], inits)
    feeds = {"x": x, "n": np.array(9, np.int64)}
    graph, _ = _run_both(m, feeds)
    # Shape(x) of a static input is not folded (x is an input), but Expand of constants ... stays a node only
    # if it depends on runtime values
    assert graph["nodes"]


def test_matmul_gemm_variants():
    a, b = _r(2, 3, 5, 4), _r(4, 6)
    _run_both(_single("MatMul", {"a": a}, inits=[("b", b)]), {"a": a}, rtol=1e-5, atol=1e-5)
    b2 = _r(2, 3, 4, 6)
    _run_both(_single("MatMul", {"a": a, "b": b2}), {"a": a, "b": b2}, rtol=1e-5, atol=1e-5)
    x, w, c = _r(5, 4), _r(6, 4), _r(6)
    m = _single("Gemm", {"x": x}, inits=[("w", w), ("c", c)], attrs=dict(transB=1, alpha=0.5, beta=2.0))
    _run_both(m, {"x": x}, rtol=1e-5, atol=1e-5)
    xt = _r(4, 5)
    m = _single("Gemm", {"x": xt, "w": w}, attrs=dict(transA=1, transB=1))
    _run_both(m, {"x": xt, "w": w}, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ converter
def test_constant_folding_and_dead_nodes():
    w = _r(4, 3)
    nodes = [
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array([2.0], np.float32))),
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),           # weight transform: folded
        helper.make_node("Mul", ["wt", "k"], ["wk"]),                        # folded
        helper.make_node("MatMul", ["x", "wk"], ["y"]),                      # runtime
        helper.make_node("Relu", ["x"], ["dead"]),                           # unused: removed
        helper.make_node("ConstantOfShape", ["big_shape"], ["big"],          # 4 MB: kept as a node
                         value=numpy_helper.from_array(np.array([1.0], np.float32))),
        helper.make_node("ReduceSum", ["big"], ["bs"], keepdims=0),
        helper.make_node("Add", ["y", "bs"], ["out"]),
    ]
    inits = [numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.array([1024, 1024], np.int64), "big_shape")]
    m = _model(nodes, [_vi("x", F, ["n", 3])], [_vi("out", F, ["n", 4])], inits)
    graph, consts = onnx_to_graph(m)
    ops = [n["op"] for n in graph["nodes"]]
    assert ops == ["MatMul", "ConstantOfShape", "ReduceSum", "Add"]
    # the folded weight takes back its source's name (the source itself is gone)
    assert "wk" not in consts and "w" in consts and consts["w"].shape == (3, 4)
    assert set(graph["constants"]) == set(consts)
    assert graph["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["n", 3]}]
    cos = graph["nodes"][1]
    assert cos["attrs"]["value"] == {"tensor": {"dtype": "float32", "shape": [1], "data": [1.0]}}
    json.dumps(graph)
    x = _r(2, 3)
    (y,) = Plan(graph, consts).run({"x": x})
    np.testing.assert_allclose(y, x @ (w.T * 2) + 1024 * 1024, rtol=1e-5)


def test_attribute_encoding_keeps_types():
    m = _single("LeakyRelu", {"x": _r(2)}, attrs=dict(alpha=1.0))
    graph, _ = onnx_to_graph(m)
    a = graph["nodes"][0]["attrs"]["alpha"]
    assert isinstance(a, float) and json.dumps(a) == "1.0"
    m = _single("Transpose", {"x": _r(2, 3)}, attrs=dict(perm=[1, 0]))
    assert onnx_to_graph(m)[0]["nodes"][0]["attrs"] == {"perm": [1, 0]}
    m = _single("Gelu", {"x": _r(2)}, attrs=dict(approximate="tanh"))
    assert onnx_to_graph(m)[0]["nodes"][0]["attrs"] == {"approximate": "tanh"}


def test_opset_and_domains():
    m = _single("Relu", {"x": _r(2)}, opset=17)
    assert onnx_to_graph(m)[0]["opset"] == {"": 17}


def test_unknown_op_raises_unsupported():
    node = helper.make_node("FrobnicateTensor", ["x"], ["y"], domain="acme.ops")
    m = _model([node], [_vi("x", F, [2])], [_vi("y", F, None)], extra_opsets=[("acme.ops", 1)])
    with pytest.raises(UnsupportedError, match="FrobnicateTensor"):
        onnx_to_graph(m)
    # and a hand-written graph reaching the engine fails the same way
    graph = {"opset": {"": 18, "acme.ops": 1}, "inputs": [{"name": "x", "dtype": "float32", "shape": [2]}],
             "outputs": [{"name": "y", "dtype": "float32", "shape": [2]}],
             "nodes": [{"op": "FrobnicateTensor", "domain": "acme.ops", "name": "n", "inputs": ["x"],
                        "outputs": ["y"], "attrs": {}}], "constants": []}
    with pytest.raises(UnsupportedError, match=r"unsupported operator FrobnicateTensor \(domain 'acme.ops'\)"):
        Plan(graph, {})


def test_control_flow_unsupported():
    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [], [_vi("t", F, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [_vi("e", F, None)])
    node = helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)
    m = _model([node], [_vi("c", TensorProto.BOOL, []), _vi("x", F, [2])], [_vi("y", F, None)])
    with pytest.raises(UnsupportedError, match="If"):
        onnx_to_graph(m)


def test_reference_fallback_for_non_native_ops():
    x = _r(3, 5)
    graph, out = _run_both(_single("Hardmax", {"x": x}, attrs=dict(axis=1)), {"x": x})
    assert graph["nodes"][0]["op"] == "Hardmax"
    a, b = _r(2, 3, 4), _r(2, 4, 5)
    _run_both(_single("Einsum", {"a": a, "b": b}, attrs=dict(equation="bij,bjk->bik")), {"a": a, "b": b},
              rtol=1e-5, atol=1e-5)


def test_custom_ops_take_precedence():
    m = _single("Relu", {"x": _r(3)})
    graph, consts = onnx_to_graph(m)
    calls = []

    def builder(node, ctx):
        calls.append(node["op"])
        return lambda x: x * 0 - 1

    plan = Plan(graph, consts, custom_ops={("", "Relu"): builder})
    (y,) = plan.run({"x": np.ones(3, np.float32)})
    assert calls == ["Relu"] and (y == -1).all()


def test_local_functions_are_inlined():
    fn = helper.make_function("local", "Double", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                              [helper.make_opsetid("", 18)])
    g = helper.make_graph([helper.make_node("Double", ["x"], ["y"], domain="local")], "t",
                          [_vi("x", F, [2])], [_vi("y", F, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)],
                          functions=[fn])
    graph, consts = onnx_to_graph(m)
    assert [n["op"] for n in graph["nodes"]] == ["Add"]
    (y,) = Plan(graph, consts).run({"x": np.array([1, 2], np.float32)})
    np.testing.assert_array_equal(y, [2, 4])


def test_inplace_reuse_does_not_corrupt_views():
    """y = MatMul feeds both a Reshape (view) and an Add: the Add must not write into y's buffer; z = MatMul
    feeds only an Add, which may reuse its buffer."""
    w = _r(4, 4)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("Reshape", ["y", "shp"], ["r"]),
        helper.make_node("Add", ["y", "b"], ["s"]),
        helper.make_node("MatMul", ["x", "w"], ["z"]),
        helper.make_node("Mul", ["b", "z"], ["t"]),
        helper.make_node("Reshape", ["s", "shp"], ["s2"]),
        helper.make_node("Add", ["r", "s2"], ["o1"]),
        helper.make_node("Sub", ["t", "y"], ["o2"]),
    ]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([-1], np.int64), "shp"),
             numpy_helper.from_array(_r(4), "b")]
    m = _model(nodes, [_vi("x", F, [3, 4])], [_vi("o1", F, None), _vi("o2", F, None)], inits)
    x = _r(3, 4)
    _run_both(m, {"x": x}, rtol=1e-5, atol=1e-5)
