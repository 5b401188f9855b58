"""The model families people have compile and run (tools/zoo.py has the full zoo): grouped and
depthwise convs, TorchScript decoders and nn.MultiheadAttention, FFNs behind merged bias
initializers, recurrent layers, Resize, ConvTranspose; and a fast subset of the zoo end to end."""
import itertools
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from nadoo.compiler.calibrate import LayerStats  # noqa: E402
from nadoo.compiler.load import load_model  # noqa: E402
from nadoo.compiler.pipeline import CompileOptions, compile_model  # noqa: E402
from nadoo.compiler.quantize import quantize  # noqa: E402
from nadoo.compiler.rewrite import Weight  # noqa: E402
from nadoo.runtime import Policy, Session  # noqa: E402
from nadoo.runtime.engine import Plan  # noqa: E402
from nadoo.runtime.reader import Bundle  # noqa: E402
from tools.zoo import ZooModel, build, cosine, evaluate, export, reference, rel_err  # noqa: E402

FLOAT_TOL = 1e-4  # float run vs the source: max error relative to the output scale
COS8 = 0.999


def compile_run(z: ZooModel, form: str, d) -> tuple[str, float, float, list]:
    """Export z in `form`, compile with float weights kept; (bundle, float rel. error, 8-bit cosine, notes)."""
    np.savez(d / "calib.npz", **z.draw(16, 0))
    src = export(z, form, str(d))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = compile_model(src, str(d / "m.ndc"), CompileOptions(calib=str(d / "calib.npz"), keep_float=True),
                            quiet=True)
    test = z.draw(2, 99)
    ref = reference(z, test)
    with Session(d / "m.ndc", Policy(bits="float")) as s:
        err = rel_err(s.run(None, test)[0], ref)
    with Session(d / "m.ndc", Policy(bits="8")) as s:
        cos = cosine(s.run(None, test)[0], ref)
    return str(d / "m.ndc"), err, cos, rep.notes


def nadoo_ops(path) -> list[dict]:
    with Bundle.open(path) as b:
        return [n for n in b.read_graph()["nodes"] if n.get("domain") == "nadoo"]


# ------------------------------------------------------------------------- grouped / depthwise convs
@pytest.mark.parametrize("groups,cout", [(2, 4), (6, 6), (6, 12)])
def test_grouped_conv_importance_comes_from_each_groups_input_channels(groups, cout):
    rng = np.random.default_rng(0)
    cin = 6
    x = rng.standard_normal((3, cin, 5, 5)).astype(np.float32) * np.arange(1, cin + 1, dtype=np.float32)[None, :, None, None]
    w = Weight("w", "conv", rng.standard_normal((cout, cin // groups, 3, 3)).astype(np.float32), "n", "x", "y",
               {"groups": groups})
    st = LayerStats(w, relu_after=False)
    st.record(x, np.zeros((3, cout, 3, 3), np.float32))
    imp = st.importance()
    ms = (x.astype(np.float64) ** 2).mean(axis=(0, 2, 3))  # mean x² per input channel
    per_group = cout // groups
    want = np.stack([np.repeat(ms[(o // per_group) * (cin // groups):(o // per_group + 1) * (cin // groups)], 9)
                     for o in range(cout)])
    np.testing.assert_allclose(imp, want, rtol=1e-5)


@pytest.mark.parametrize("method", ["search", "gptq"])
def test_per_row_importance_quantizes_each_row_with_its_own(method):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((6, 40)).astype(np.float32)
    imp = rng.uniform(0.01, 5, (6, 40)).astype(np.float32)
    kw = {"hessian": np.cov(rng.standard_normal((40, 200))) + np.eye(40)} if method == "gptq" else {}
    codes, scales, mins = quantize(W, 4, 16, imp, **kw)
    for r in range(6):
        c, s, m = quantize(W[r:r + 1], 4, 16, imp[r], **kw)
        np.testing.assert_array_equal(codes[r:r + 1], c)
        np.testing.assert_array_equal(scales[r:r + 1], s)
        np.testing.assert_array_equal(mins[r:r + 1], m)


# ------------------------------------------------------------------------- TorchScript
class _Attention(torch.nn.Module):
    def __init__(self, padded: bool):
        super().__init__()
        self.padded = padded
        self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)
        self.out = torch.nn.Linear(32, 32)

    def forward(self, x, attention_mask):
        pad = (attention_mask == 0) if self.padded else None
        return self.out(self.attn(x, x, x, key_padding_mask=pad, need_weights=False)[0])


class _Encoder(torch.nn.Module):
    def __init__(self, norm_first: bool):
        super().__init__()
        self.layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)

    def forward(self, x, attention_mask):
        return self.layer(x) * attention_mask[..., None]


@pytest.mark.parametrize("module,kernel", [(lambda: _Attention(True), "_native_multi_head_attention"),
                                           (lambda: _Encoder(False), "_transformer_encoder_layer_fwd")])
def test_torchscript_attention_fast_path_kernels(module, kernel, tmp_path):
    """Traced in eval mode without autograd, nn.MultiheadAttention / nn.TransformerEncoderLayer record
    one fused kernel each, which no ONNX exporter translates (compiler/load/fastpath.py)."""
    torch.manual_seed(0)
    z = ZooModel("attn", module().eval(), {"x": ("float", (8, 32), 0), "attention_mask": ("mask", (8,), 2)})
    _, err, cos, notes = compile_run(z, "torchscript", tmp_path)
    assert kernel in str(torch.jit.load(str(tmp_path / "attn.pt")).inlined_graph)  # the premise
    assert not [n for n in notes if "legacy" in n], notes
    assert err <= FLOAT_TOL and cos >= COS8, (err, cos)


@pytest.mark.parametrize("norm_first", [False, True])
def test_fast_path_decompositions_compute_what_the_modules_do(norm_first):
    from nadoo.compiler.load.fastpath import multi_head_attention, transformer_encoder_layer

    torch.manual_seed(0)
    enc = _Encoder(norm_first).eval().layer
    x = torch.randn(3, 8, 32)
    pad = torch.zeros(3, 8, dtype=torch.bool)
    pad[1, 5:] = True
    a = enc.self_attn
    with torch.no_grad():
        want = a(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        got = multi_head_attention(x, x, x, 32, 4, a.in_proj_weight, a.in_proj_bias, a.out_proj.weight,
                                   a.out_proj.bias, pad, False, True, 1)[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        got = transformer_encoder_layer(x, 32, 4, a.in_proj_weight, a.in_proj_bias, a.out_proj.weight, a.out_proj.bias,
                                        False, norm_first, enc.norm1.eps, enc.norm1.weight, enc.norm1.bias,
                                        enc.norm2.weight, enc.norm2.bias, enc.linear1.weight, enc.linear1.bias,
                                        enc.linear2.weight, enc.linear2.bias)
        torch.testing.assert_close(got, enc(x), atol=1e-5, rtol=1e-5)


def test_torchscript_the_conversion_cannot_take_falls_back_to_the_legacy_exporter(tmp_path):
    class Shifted(torch.nn.Module):  # pad by a size-derived amount, then roll (as Swin's windows)
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 8)

        def forward(self, x):
            pad = (4 - x.shape[2] % 4) % 4
            return self.lin(torch.roll(torch.nn.functional.pad(x, (0, 0, 0, pad)), shifts=(-1, -1), dims=(1, 2)))

    torch.manual_seed(0)
    m = Shifted().eval()
    x = torch.randn(2, 3, 5, 4)
    torch.jit.save(torch.jit.trace(m, x), str(tmp_path / "s.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = load_model(str(tmp_path / "s.pt"), input_shapes={"x": [2, 3, 5, 4]})
    assert any("legacy" in w for w in lm.warnings), lm.warnings
    xt = np.random.default_rng(3).standard_normal((3, 3, 5, 4)).astype(np.float32)
    sess = ort.InferenceSession(lm.onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": xt})[0], m(torch.from_numpy(xt)).detach().numpy(), atol=1e-5)


# ------------------------------------------------------------------------- FFN fusion
class _PreNormFFNs(torch.nn.Module):
    """Two residual pre-norm FFN blocks, biases zero (as transformers initialise them)."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.ModuleList(torch.nn.LayerNorm(32) for _ in range(2))
        self.ffn = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
                                       for _ in range(2))
        for m in self.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.zeros_(m.bias)

    def forward(self, x):
        for norm, ffn in zip(self.norm, self.ffn):
            x = x + ffn(norm(x))
        return x


def test_ffn_fused_when_the_exporter_merged_the_zero_biases(tmp_path):
    """torch.onnx merges equal initializers: both FFNs' up biases become one tensor, and the down
    biases one with the LayerNorm biases."""
    torch.manual_seed(0)
    path, err, cos, _ = compile_run(ZooModel("ffns", _PreNormFFNs().eval(), {"x": ("float", (8, 32), 0)}), "onnx",
                                    tmp_path)
    m = onnx.load(str(tmp_path / "ffns.onnx"))
    inits = {i.name for i in m.graph.initializer}
    uses = [x for n in m.graph.node for x in n.input if x in inits]
    assert any(uses.count(x) > 1 for x in set(uses))  # the premise: shared initializers
    ffn = [n for n in nadoo_ops(path) if n["op"] == "ChunkedFFN"]
    assert len(ffn) == 2 and len({n["inputs"][1] for n in ffn}) == 2  # both blocks, each with its own up bias
    assert err <= FLOAT_TOL and cos >= COS8, (err, cos)


def test_gemms_sharing_a_bias_are_all_chunked_and_keep_their_results():
    from nadoo.compiler.rewrite import rewrite_weight_ops

    rng = np.random.default_rng(0)
    consts = {"w1": rng.standard_normal((32, 48)).astype(np.float32), "w2": rng.standard_normal((32, 48)).astype(np.float32),
              "b": rng.standard_normal(48).astype(np.float32)}
    nodes = [{"op": "Gemm", "domain": "", "name": "g1", "inputs": ["x", "w1", "b"], "outputs": ["y1"], "attrs": {}},
             {"op": "Gemm", "domain": "", "name": "g2", "inputs": ["x", "w2", "b"], "outputs": ["y2"], "attrs": {"beta": 0.5}}]
    graph = {"opset": {"": 18}, "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 32]}],
             "outputs": [{"name": "y1", "dtype": "float32", "shape": None}, {"name": "y2", "dtype": "float32", "shape": None}],
             "nodes": nodes, "constants": sorted(consts)}
    g, c, weights = rewrite_weight_ops(graph, consts, min_elements=16)
    assert [n["op"] for n in g["nodes"]] == ["ChunkedLinear", "ChunkedLinear"]
    assert g["nodes"][0]["inputs"][1] != g["nodes"][1]["inputs"][1]  # beta scaled a copy, not the shared bias
    np.testing.assert_array_equal(c["b"], consts["b"])
    from nadoo.compiler.calibrate import dense_builders

    x = rng.standard_normal((4, 32)).astype(np.float32)
    y1, y2 = Plan(g, c, custom_ops=dense_builders({w.name: w for w in weights})).run({"x": x})
    np.testing.assert_allclose(y1, x @ consts["w1"] + consts["b"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y2, x @ consts["w2"] + 0.5 * consts["b"], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- NumPy kernels
def _single_node(op, ins, outs, attrs, feeds, consts=None, opset=18):
    consts = consts or {}
    g = {"opset": {"": opset}, "inputs": [{"name": k, "dtype": str(v.dtype), "shape": list(v.shape)} for k, v in feeds.items()],
         "outputs": [{"name": o, "dtype": "float32", "shape": None} for o in outs],
         "nodes": [{"op": op, "domain": "", "name": "n", "inputs": ins, "outputs": outs, "attrs": attrs}],
         "constants": list(consts)}
    p = Plan(g, consts)
    assert not p.fallback_nodes
    return p.run(feeds)


def _onnx_reference(op, ins, outs, attrs, feeds):
    node = helper.make_node(op, ins, outs, **attrs)
    vi = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in feeds.items()]
    g = helper.make_graph([node], "g", vi, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs])
    return ReferenceEvaluator(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])).run(None, feeds)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_recurrent_layers_match_the_onnx_definition(op):
    rng = np.random.default_rng(0)
    T, B, I, H = 5, 3, 4, 6
    G = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    lens = np.array([5, 2, 4], np.int32)
    for direction, layout, with_lens, with_init, lbr in itertools.product(
            ("forward", "reverse", "bidirectional"), (0, 1), (0, 1), (0, 1), (0, 1) if op == "GRU" else (0,)):
        D = 2 if direction == "bidirectional" else 1
        f = {"X": rng.standard_normal((B, T, I) if layout else (T, B, I)).astype(np.float32),
             "W": rng.standard_normal((D, G * H, I)).astype(np.float32) * 0.5,
             "R": rng.standard_normal((D, G * H, H)).astype(np.float32) * 0.5,
             "B": rng.standard_normal((D, 2 * G * H)).astype(np.float32) * 0.5}
        ins = ["X", "W", "R", "B", "L" if with_lens else ""]
        if with_init:
            f["H0"] = rng.standard_normal((B, D, H) if layout else (D, B, H)).astype(np.float32)
            ins.append("H0")
            if op == "LSTM":
                f["C0"] = rng.standard_normal(f["H0"].shape).astype(np.float32)
                ins.append("C0")
        if op == "LSTM" and with_init:
            f["P"] = rng.standard_normal((D, 3 * H)).astype(np.float32)
            ins.append("P")
        while ins[-1] == "":
            ins.pop()
        outs = ["Y", "Yh"] + (["Yc"] if op == "LSTM" else [])
        attrs = dict(direction=direction, hidden_size=H, layout=layout, **({"linear_before_reset": lbr} if op == "GRU" else {}))
        got = _single_node(op, ins, outs, attrs, {**f, **({"L": lens} if with_lens else {})})
        if not with_lens:
            want = _onnx_reference(op, ins, outs, attrs, f)
        else:  # onnx.reference ignores sequence_lens: each row on its own, truncated to its length
            want = [np.zeros_like(g) for g in got]
            for b, L in enumerate(lens):
                fb = dict(f, X=f["X"][b:b + 1, :L] if layout else f["X"][:L, b:b + 1])
                for k in ("H0", "C0"):
                    if k in fb:
                        fb[k] = fb[k][b:b + 1] if layout else fb[k][:, b:b + 1]
                rb = _onnx_reference(op, [i if i != "L" else "" for i in ins], outs, attrs, fb)
                if layout:
                    want[0][b, :L] = rb[0][0]
                    for j in range(1, len(rb)):
                        want[j][b] = rb[j][0]
                else:
                    want[0][:L, :, b] = rb[0][:, :, 0]
                    for j in range(1, len(rb)):
                        want[j][:, b] = rb[j][:, 0]
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-5, err_msg=f"{op} {direction} layout={layout} lens={with_lens}")


def test_resize_matches_torch_interpolate():
    F = torch.nn.functional
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 7)).astype(np.float32)
    cases = [  # (torch call, ONNX attrs, sizes) as torch.onnx writes them
        (dict(mode="nearest", scale_factor=2), dict(mode="nearest", coordinate_transformation_mode="asymmetric",
                                                    nearest_mode="floor"), [2, 3, 10, 14]),
        (dict(mode="bilinear", size=(9, 4), align_corners=False),
         dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel"), [2, 3, 9, 4]),
        (dict(mode="bilinear", size=(16, 16), align_corners=True),
         dict(mode="linear", coordinate_transformation_mode="align_corners"), [2, 3, 16, 16]),
        (dict(mode="bilinear", size=(3, 3), align_corners=False),
         dict(mode="linear", coordinate_transformation_mode="half_pixel"), [2, 3, 3, 3]),
    ]
    for tkw, attrs, sizes in cases:
        want = F.interpolate(torch.from_numpy(x), **tkw).numpy()
        (got,) = _single_node("Resize", ["x", "", "", "sizes"], ["y"], attrs, {"x": x},
                              {"sizes": np.array(sizes, np.int64)})
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=str(tkw))


@pytest.mark.parametrize("nd,groups,stride,dil,pad,out_pad", [(2, 1, 2, 1, 1, 1), (2, 2, 2, 1, 0, 0), (1, 1, 3, 2, 1, 1),
                                                             (3, 1, 2, 1, 1, 0), (2, 4, 1, 2, 0, 0)])
def test_conv_transpose_matches_torch(nd, groups, stride, dil, pad, out_pad):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4) + (5,) * nd).astype(np.float32)
    w = rng.standard_normal((4, 8 // groups) + (3,) * nd).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    conv_t = {1: torch.nn.functional.conv_transpose1d, 2: torch.nn.functional.conv_transpose2d,
              3: torch.nn.functional.conv_transpose3d}[nd]
    want = conv_t(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), stride=stride, padding=pad,
                  output_padding=out_pad, groups=groups, dilation=dil).numpy()
    attrs = dict(group=groups, strides=[stride] * nd, dilations=[dil] * nd, pads=[pad] * (2 * nd),
                 output_padding=[out_pad] * nd)
    (got,) = _single_node("ConvTranspose", ["x", "w", "b"], ["y"], attrs, {"x": x}, {"w": w, "b": b})
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("nd,groups,cin,cout,k,stride,pad,dil", [
    (2, 1, 8, 16, 1, 1, 0, 1), (2, 1, 8, 16, 1, 2, 0, 1), (2, 8, 8, 8, 3, 1, 1, 1), (2, 8, 8, 8, 3, 2, 1, 1),
    (2, 8, 8, 8, 5, 1, 2, 2), (1, 6, 6, 6, 3, 1, 1, 1), (3, 4, 4, 4, 3, 1, 1, 1), (2, 4, 8, 8, 3, 1, 1, 1),
    (2, 8, 8, 16, 3, 1, 1, 1)])
@pytest.mark.parametrize("const_weight", [True, False])
def test_conv_pointwise_depthwise_and_grouped_match_torch(nd, groups, cin, cout, k, stride, pad, dil, const_weight):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, cin) + (9,) * nd).astype(np.float32)
    w = rng.standard_normal((cout, cin // groups) + (k,) * nd).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[nd]
    want = conv(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), stride=stride, padding=pad,
                dilation=dil, groups=groups).numpy()
    attrs = dict(group=groups, strides=[stride] * nd, pads=[pad] * (2 * nd), dilations=[dil] * nd, kernel_shape=[k] * nd)
    feeds, consts = ({"x": x}, {"w": w, "b": b}) if const_weight else ({"x": x, "w": w}, {"b": b})
    (got,) = _single_node("Conv", ["x", "w", "b"], ["y"], attrs, feeds, consts)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_pool_window_larger_than_the_input():
    """EfficientNet pools its 1x1 final map with AvgPool2d(1280, ceil_mode=True)."""
    x = np.random.default_rng(0).standard_normal((2, 320, 1, 2)).astype(np.float32)
    for op, fn in (("AveragePool", torch.nn.functional.avg_pool2d), ("MaxPool", torch.nn.functional.max_pool2d)):
        attrs = dict(kernel_shape=[1280, 1280], strides=[1280, 1280], ceil_mode=1)
        (got,) = _single_node(op, ["x"], ["y"], attrs, {"x": x})
        np.testing.assert_allclose(got, fn(torch.from_numpy(x), 1280, ceil_mode=True).numpy(), atol=1e-6)


# ------------------------------------------------------------------------- the zoo, a fast subset
@pytest.mark.parametrize("name,form", [("convnext", "onnx"), ("gpt2", "torchscript"), ("bilstm", "torchscript")])
def test_zoo_subset(name, form, tmp_path):
    """Depthwise 7x7 convs (chunked), a transformers decoder from TorchScript (its masks use aten::diff,
    which the legacy exporter lacks), a bi-LSTM text classifier: compiled, the float run equal to the
    source, 8-bit cosine >= 0.999, nothing on the onnx.reference fallback."""
    res = evaluate(name, forms=(form,), workdir=str(tmp_path), latency=False)
    r = res["forms"][form]
    assert r["ok"], r
    assert r["float_rel_err"] <= FLOAT_TOL and r["q8_cosine"] >= COS8, r
    assert not r["fallback_ops"] and not r["notes"], r  # no fallback operator, no legacy exporter
    if name == "convnext":
        assert any(n["op"] == "ChunkedConv" and n["attrs"].get("group", 1) > 1
                   for n in nadoo_ops(tmp_path / f"{name}.{form}.ndc"))


# ------------------------------------------------------------------------- ConvTranspose, chunked
class _Decoder(torch.nn.Module):
    """A conv-autoencoder decoder: plain and grouped ConvTranspose2d, strides, padding, output_padding."""

    def __init__(self):
        super().__init__()
        self.up1 = torch.nn.ConvTranspose2d(16, 32, 3, 2, 1, output_padding=1)
        self.up2 = torch.nn.ConvTranspose2d(32, 16, 3, 2, 1, groups=2, output_padding=1)
        self.head = torch.nn.ConvTranspose2d(16, 8, 3, 1, 1, bias=False)

    def forward(self, z):
        return self.head(torch.relu(self.up2(torch.relu(self.up1(z)))))


def test_conv_transpose_weights_are_chunked_quantized_and_export(tmp_path):
    """Every ConvTranspose weight ≥ min-elements leaves the inline constants as output-channel chunks;
    the float run equals torch, 8-bit stays close, and the plain-ONNX export runs in onnxruntime."""
    from nadoo.runtime.export_onnx import bundle_to_onnx

    torch.manual_seed(0)
    z = ZooModel("decoder", _Decoder().eval(), {"z": ("float", (16, 4, 4), 0)})
    path, err, cos, _ = compile_run(z, "onnx", tmp_path)
    assert err <= 1e-5 and cos >= COS8, (err, cos)
    ops = [n for n in nadoo_ops(path) if n["op"] == "ChunkedConvTranspose"]
    assert sorted(n["attrs"].get("group", 1) for n in ops) == [1, 1, 2]
    mod = z.module
    with Bundle.open(path) as b:
        assert not [c.name for c in b.constants_table.tensors if len(c.shape) == 4]  # no kernel stayed inline
        entries = [b.tensors[n["attrs"]["weight"]] for n in ops]
        assert all(e.kind == "conv_transpose" and e.n_chunks > 1 for e in entries)
        # stored output channels first: [Cout, Cin/g, kh, kw] from torch's [Cin, Cout/g, kh, kw]
        want = [[c.weight.shape[1] * c.groups, c.weight.shape[0] // c.groups, 3, 3] for c in (mod.up1, mod.up2, mod.head)]
        assert sorted(list(e.shape) for e in entries) == sorted(want)
        onx = bundle_to_onnx(b, "f32")
    x = z.draw(2, 5)
    (got,) = ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
    assert rel_err(got, reference(z, x)) <= 1e-5


# ------------------------------------------------------------------------- recurrent layers, and what stays inline
class _Tagger(torch.nn.Module):
    """An LSTM, a bidirectional GRU and a head; a learned position table added to the input (a large
    constant no chunked op reads)."""

    def __init__(self):
        super().__init__()
        self.pos = torch.nn.Parameter(torch.randn(1, 64, 16) * 0.1)
        self.lstm = torch.nn.LSTM(16, 32, batch_first=True)
        self.gru = torch.nn.GRU(32, 16, batch_first=True, bidirectional=True)
        self.head = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.head(self.gru(self.lstm(x + self.pos)[0])[0])


def test_recurrent_weights_are_chunked_and_the_rest_of_the_large_constants_say_why(tmp_path):
    """LSTM and GRU W and R become gate-row chunks (float run equal to torch, 8-bit close, plain-ONNX
    export through onnxruntime); every float constant >= min-elements left inline is listed by
    `nadoo info` (text and --json) with the reason the compiler recorded."""
    import json
    import subprocess
    import sys

    from nadoo.runtime.export_onnx import bundle_to_onnx

    torch.manual_seed(0)
    z = ZooModel("tagger", _Tagger().eval(), {"x": ("float", (64, 16), 0)})
    path, err, cos, _ = compile_run(z, "onnx", tmp_path)
    assert err <= 1e-5 and cos >= COS8, (err, cos)
    rec = [n for n in nadoo_ops(path) if n["op"] == "ChunkedRecurrent"]
    assert sorted(n["attrs"]["cell"] for n in rec) == ["GRU", "LSTM"]
    with Bundle.open(path) as b:
        for n in rec:
            W, R = b.tensors[n["attrs"]["weight"]], b.tensors[n["attrs"]["recurrence"]]
            d, h = (2, 16) if n["attrs"]["cell"] == "GRU" else (1, 32)
            gates = {"GRU": 3, "LSTM": 4}[n["attrs"]["cell"]]
            assert (W.kind, R.kind) == ("recurrent_input", "recurrent") and R.shape == (d * gates * h, h)
            assert W.n_chunks > 1
        consts = dict(b.read_constants())
        onx = bundle_to_onnx(b, "f32")
        assert b.preamble.minor == 3  # recurrent tensors (1.1), zp-coded tiers (1.2), among them q3 (1.3)
    x = z.draw(2, 5)
    (got,) = ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
    assert rel_err(got, reference(z, x)) <= 1e-5

    big = {k for k, a in consts.items() if a.dtype.kind == "f" and a.size >= CompileOptions().min_elements}
    cli = [sys.executable, "-m", "nadoo.runtime.cli", "info"]
    facts = json.loads(subprocess.run(cli + ["--json", path], capture_output=True, text=True, check=True).stdout)
    listed = {r["name"]: r for r in facts["inline_constants"]["not_chunked"]}
    assert set(listed) == big and len(big) == 1  # the position table
    (r,) = listed.values()
    assert r["reason"] == "input 1 of Add: not chunked (no chunked form of Add for this input)", r
    assert r["elements"] == 64 * 16 and r["shape"] == [1, 64, 16]
    text = subprocess.run(cli + [path], capture_output=True, text=True, check=True).stdout
    assert f"{r['name']} 1x64x16 (1024 elements): {r['reason']}" in text


def test_recurrent_weights_not_constant_stay_inline_with_the_reason():
    """W and R are chunked together: an LSTM whose R is computed keeps its W inline, and says why."""
    from nadoo.compiler.rewrite import inline_reasons, rewrite_weight_ops

    rng = np.random.default_rng(0)
    graph = {"inputs": [{"name": "x", "dtype": "float32", "shape": [5, 1, 16]}, {"name": "r", "dtype": "float32",
                                                                                 "shape": [1, 128, 32]}],
             "outputs": [{"name": "y", "dtype": "float32", "shape": None}],
             "nodes": [{"op": "LSTM", "domain": "", "name": "lstm", "inputs": ["x", "W", "r"], "outputs": ["y"],
                        "attrs": {"hidden_size": 32}}], "opset": {"": 18}}
    consts = {"W": rng.standard_normal((1, 128, 16)).astype(np.float32)}
    g, left, weights = rewrite_weight_ops(graph, consts, 1024)
    assert not weights and "W" in left
    assert inline_reasons(g, left, 1024) == {"W": "weights of LSTM: not chunked (recurrent op, read whole; W and R "
                                                  "are chunked together, only when both are constants of this node alone)"}
    assert inline_reasons(g, left, 4096) == {}  # below min-elements: not a weight worth a reason


def test_conv_transpose_output_is_bounded_before_the_kernel_runs():
    """A stride that makes a tiny ConvTranspose write a huge output is refused in one line, unallocated."""
    from nadoo.runtime.errors import ModelError

    x = np.ones((1, 2, 64, 64), np.float32)
    w = np.ones((2, 4, 3, 3), np.float32)
    with pytest.raises(ModelError, match="would produce"):
        _single_node("ConvTranspose", ["x", "w"], ["y"], {"strides": [100000, 100000]}, {"x": x}, {"w": w})


# ------------------------------------------------------------------------- .pt2: reshape after a transpose
class _WindowHeads(torch.nn.Module):
    """Swin's and T5's attention as torch.export saves it: scaled_dot_product_attention with a bias
    mask returns a [batch, seq, heads, dim]-strided value, so the heads' transpose back is contiguous
    and the merge is a view in the program; torch's decompositions make the product contiguous."""

    def __init__(self, d=32, h=2, n=16):
        super().__init__()
        self.h = h
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.bias = torch.nn.Parameter(torch.randn(h, n, n))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (f(x).view(b, n, self.h, d // self.h).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, self.bias.contiguous().unsqueeze(0))
        return self.o(a.reshape(b, -1, n, d // self.h).transpose(1, 2).reshape(b, n, -1))


def test_pt2_reshape_of_a_transposed_attention_output_compiles(tmp_path):
    """The re-export of the saved program's module (dynamic batch) used to fail with "Cannot view a
    tensor ... with strides"; now the .pt2 compiles through it, equal to the source at another batch."""
    torch.manual_seed(0)
    z = ZooModel("heads", _WindowHeads().eval(), {"x": ("float", (16, 32), 0)})
    path, err, cos, _ = compile_run(z, "pt2", tmp_path)
    assert err <= 1e-5 and cos >= COS8, (err, cos)
    x = z.draw(3, 5)  # a batch size the program was not saved with
    with Session(path, Policy(bits="float")) as s:
        assert rel_err(s.run(None, x)[0], reference(z, x)) <= 1e-5
