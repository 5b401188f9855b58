"""compiler/load/: every model form round-trips to ONNX with a dynamic batch (and sequence) axis."""
import os
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
nn = torch.nn

from nadoo.compiler.calib_data import InputSpec  # noqa: E402
from nadoo.compiler.load import LoadedModel, load_model  # noqa: E402
from nadoo.runtime.errors import CompileError  # noqa: E402


# ---------------------------------------------------------------------------------------------
# tiny models (module-level so they pickle; also registered in a fake importable module below)

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, image):
        h = torch.relu(self.conv(image))
        h = torch.nn.functional.max_pool2d(h, 2)
        return self.fc(h.flatten(1))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 3)
        self.b = nn.Linear(2, 3)

    def forward(self, left, right):
        s = self.a(left) + self.b(right)
        return s, torch.tanh(s)


class TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 8)
        self.out = nn.Linear(8, 6)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1).to(torch.float32)
        return {"last_hidden_state": self.out(h), "pooled": h.mean(dim=1)}


_fake = types.ModuleType("nadoo_test_models")
for _c in (MLP, SmallCNN, TwoInputs, TokenModel):
    setattr(_fake, _c.__name__, _c)
sys.modules["nadoo_test_models"] = _fake


def _seeded(cls):
    torch.manual_seed(0)
    return cls().eval()


def _flat(res):
    if isinstance(res, torch.Tensor):
        return [res]
    if isinstance(res, dict):
        return [v for v in res.values()]
    return list(res)


def _ort_run(loaded: LoadedModel, feeds):
    sess = ort.InferenceSession(loaded.onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _compare(loaded, module, feeds, positional=False):
    got = _ort_run(loaded, feeds)
    with torch.no_grad():
        t = {k: torch.from_numpy(v) for k, v in feeds.items()}
        ref = module(*t.values()) if positional else module(**t)
    ref = [r.numpy() for r in _flat(ref)]
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)
    # the reference helper agrees too
    if loaded.torch_module is not None:
        ref2 = loaded.run_torch(feeds)
        assert list(ref2) == loaded.output_names
        for g, r in zip(got, ref2.values()):
            np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)


def _float_feeds(shapes, batch, seed=0):
    rng = np.random.default_rng(seed + batch)
    return {n: rng.standard_normal([batch, *s]).astype(np.float32) for n, s in shapes.items()}


def _assert_batch_dynamic(loaded):
    for s in loaded.input_specs:
        assert isinstance(s.shape[0], str), s


# ---------------------------------------------------------------------------------------------
# forms

def test_onnx_with_external_data(tmp_path):
    m = _seeded(MLP)
    prog = torch.onnx.export(m, (torch.randn(2, 8),), None, dynamo=True, verbose=False,
                             input_names=["x"], output_names=["y"],
                             dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    proto = prog.model_proto
    p = tmp_path / "m.onnx"
    onnx.save_model(proto, str(p), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    assert (tmp_path / "m.onnx.data").exists()
    lm = load_model(str(p))
    assert lm.source_kind == "onnx" and lm.torch_module is None
    assert [s.name for s in lm.input_specs] == ["x"]
    assert lm.input_specs[0].dtype == "float32"
    assert lm.input_specs[0].shape == ["batch", 8]
    assert lm.output_names == ["y"]
    assert all(not i.HasField("data_location") or i.data_location == 0 for i in lm.onnx_model.graph.initializer)
    for b in (1, 5):
        feeds = _float_feeds({"x": [8]}, b)
        np.testing.assert_allclose(_ort_run(lm, feeds)[0], m(torch.from_numpy(feeds["x"])).detach().numpy(), atol=1e-5)


def test_onnx_missing_external_data(tmp_path):
    m = _seeded(MLP)
    proto = torch.onnx.export(m, (torch.randn(2, 8),), None, dynamo=True, verbose=False).model_proto
    p = tmp_path / "m.onnx"
    onnx.save_model(proto, str(p), save_as_external_data=True, location="w.bin", size_threshold=0)
    (tmp_path / "w.bin").unlink()
    with pytest.raises(CompileError, match="external data"):
        load_model(str(p))


@pytest.mark.parametrize("cls,shapes", [(MLP, {"x": [8]}), (SmallCNN, {"image": [1, 8, 8]})])
def test_state_dict(tmp_path, cls, shapes):
    m = _seeded(cls)
    p = tmp_path / "w.pt"
    torch.save(m.state_dict(), p)
    lm = load_model(str(p), model_class=f"nadoo_test_models:{cls.__name__}",
                    example_inputs=_float_feeds(shapes, 4))
    assert lm.source_kind == "state_dict"
    assert [s.name for s in lm.input_specs] == list(shapes)
    assert lm.output_names == ["output"]
    _assert_batch_dynamic(lm)
    # weights are initializers, not Constant nodes
    assert not any(n.op_type == "Constant" and n.attribute[0].t.dims and np.prod(n.attribute[0].t.dims) > 1
                   for n in lm.onnx_model.graph.node)
    assert sum(np.prod(i.dims) for i in lm.onnx_model.graph.initializer) >= sum(p.numel() for p in m.parameters())
    for b in (1, 5):
        _compare(lm, m, _float_feeds(shapes, b))


def test_state_dict_from_input_shape_and_dotted_class(tmp_path):
    m = _seeded(MLP)
    p = tmp_path / "w.pt"
    torch.save(m.state_dict(), p)
    lm = load_model(str(p), model_class="nadoo_test_models.MLP", input_shapes={"": [1, 8]})
    assert lm.input_specs[0].shape[1] == 8
    for b in (1, 5):
        _compare(lm, m, _float_feeds({"x": [8]}, b))


def test_two_inputs_two_outputs(tmp_path):
    m = _seeded(TwoInputs)
    p = tmp_path / "w.pt"
    torch.save(m.state_dict(), p)
    lm = load_model(str(p), model_class="nadoo_test_models:TwoInputs",
                    input_shapes={"left": [3, 5], "right": [3, 2]})
    assert [s.name for s in lm.input_specs] == ["left", "right"]
    assert lm.output_names == ["output_0", "output_1"]
    _assert_batch_dynamic(lm)
    for b in (1, 5):
        _compare(lm, m, _float_feeds({"left": [5], "right": [2]}, b))


def _token_feeds(batch, seq, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 100, size=(batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    mask[:, -1] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_token_model_dynamic_sequence(tmp_path):
    m = _seeded(TokenModel)
    p = tmp_path / "w.pt"
    torch.save(m.state_dict(), p)
    lm = load_model(str(p), model_class="nadoo_test_models:TokenModel", example_inputs=_token_feeds(3, 7))
    assert [s.name for s in lm.input_specs] == ["input_ids", "attention_mask"]
    for s in lm.input_specs:
        assert s.dtype == "int64"
        assert s.shape == ["batch", "seq"]
    assert lm.output_names == ["output_0", "output_1"]
    for b, L in ((1, 4), (5, 11)):
        _compare(lm, m, _token_feeds(b, L))


def test_token_model_from_input_shapes(tmp_path):
    m = _seeded(TokenModel)
    p = tmp_path / "w.pt"
    torch.save(m.state_dict(), p)
    lm = load_model(str(p), model_class="nadoo_test_models:TokenModel",
                    input_shapes={"input_ids": [1, 16], "attention_mask": [1, 16]})
    assert all(s.dtype == "int64" for s in lm.input_specs)
    for b, L in ((1, 3), (5, 9)):
        _compare(lm, m, _token_feeds(b, L))


def test_torchscript(tmp_path):
    m = _seeded(SmallCNN)
    p = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(m), str(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = load_model(str(p), input_shapes={"image": [1, 1, 8, 8]})
    assert lm.source_kind == "torchscript"
    assert [s.name for s in lm.input_specs] == ["image"]
    _assert_batch_dynamic(lm)
    for b in (1, 5):
        _compare(lm, m, _float_feeds({"image": [1, 8, 8]}, b), positional=True)


def test_torchscript_traced_tokens(tmp_path):
    m = _seeded(TwoInputs)
    p = tmp_path / "tr.pt"
    torch.jit.save(torch.jit.trace(m, (torch.randn(2, 5), torch.randn(2, 2))), str(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = load_model(str(p), example_inputs=_float_feeds({"left": [5], "right": [2]}, 6))
    assert [s.name for s in lm.input_specs] == ["left", "right"]
    for b in (1, 5):
        _compare(lm, m, _float_feeds({"left": [5], "right": [2]}, b), positional=True)


def test_torch_export_pt2(tmp_path):
    m = _seeded(MLP)
    ep = torch.export.export(m, (torch.randn(3, 8),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    p = tmp_path / "m.pt2"
    torch.export.save(ep, str(p))
    lm = load_model(str(p))  # the program carries its own example inputs
    assert lm.source_kind == "export"
    assert [s.name for s in lm.input_specs] == ["x"]
    _assert_batch_dynamic(lm)
    for b in (1, 5):
        _compare(lm, m, _float_feeds({"x": [8]}, b), positional=True)


def test_torch_export_pt2_static_batch_made_dynamic(tmp_path):
    m = _seeded(TwoInputs)
    ep = torch.export.export(m, (torch.randn(2, 5), torch.randn(2, 2)))
    p = tmp_path / "m.pt2"
    torch.export.save(ep, str(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = load_model(str(p))
    assert [s.name for s in lm.input_specs] == ["left", "right"]
    feeds = _float_feeds({"left": [5], "right": [2]}, 2)
    _compare(lm, m, feeds, positional=True)


def test_pickled_module_needs_flag(tmp_path):
    m = _seeded(MLP)
    p = tmp_path / "whole.pt"
    torch.save(m, p)
    with pytest.raises(CompileError) as ei:
        load_model(str(p), input_shapes={"x": [1, 8]})
    msg = str(ei.value)
    assert "--allow-pickle" in msg and "arbitrary code" in msg and "\n" not in msg
    lm = load_model(str(p), input_shapes={"x": [1, 8]}, allow_pickle=True)
    assert lm.source_kind == "pickle"
    for b in (1, 5):
        _compare(lm, m, _float_feeds({"x": [8]}, b))


# ---------------------------------------------------------------------------------------------
# bad inputs: always a one-line CompileError

def _one_line_error(fn, match=None):
    with pytest.raises(CompileError, match=match) as ei:
        fn()
    assert "\n" not in str(ei.value)
    assert len(str(ei.value)) < 600
    return str(ei.value)


def test_missing_file_and_directory(tmp_path):
    _one_line_error(lambda: load_model(str(tmp_path / "nope.onnx")), "no such model file")
    _one_line_error(lambda: load_model(str(tmp_path)), "directory")


def _returns_within(fn, seconds: float, unblock):
    """fn()'s exception (or None), failing the test if fn still runs after `seconds`; `unblock()`
    then releases it so no thread is left hanging."""
    import threading

    box = []

    def run():
        try:
            fn()
            box.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        unblock()
        t.join(5)
        pytest.fail(f"still blocked after {seconds} s")
    return box[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
@pytest.mark.parametrize("name", ["m.onnx", "m.pt", "m.pt2"])
def test_fifo_is_refused_not_waited_on(tmp_path, name):
    """A FIFO blocks open() until a writer comes (and then streams without end): both load_model and
    compile_model must refuse it at once, whatever the extension says the loader would be."""
    from nadoo.compiler.pipeline import compile_model

    fifo = tmp_path / name
    os.mkfifo(fifo)

    def unblock():  # a writer end lets a blocked open() return; closing it gives the reader EOF
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    for call in (lambda: load_model(str(fifo)), lambda: compile_model(str(fifo), str(tmp_path / "o.ndc"))):
        err = _returns_within(call, 20, unblock)
        assert isinstance(err, CompileError), err
        assert "FIFO" in str(err) and "regular file" in str(err) and "\n" not in str(err)
    assert not (tmp_path / "o.ndc").exists()


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_device_is_refused():
    _one_line_error(lambda: load_model("/dev/zero"), "character device")


def test_empty_and_garbage(tmp_path):
    e = tmp_path / "e.onnx"
    e.write_bytes(b"")
    _one_line_error(lambda: load_model(str(e)), "empty")
    g = tmp_path / "g.onnx"
    g.write_bytes(b"\xff\xfe garbage garbage \x00\x01" * 50)
    _one_line_error(lambda: load_model(str(g)), "ONNX")
    g2 = tmp_path / "g.bin"
    g2.write_bytes(b"hello this is not a model at all\n" * 10)
    _one_line_error(lambda: load_model(str(g2)), "unknown model format")
    z = tmp_path / "z.pt"
    import zipfile
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a/readme.txt", "hi")
    _one_line_error(lambda: load_model(str(z)), "unknown model format")
    t = tmp_path / "trunc.pt"
    torch.save(_seeded(MLP).state_dict(), t)
    t.write_bytes(t.read_bytes()[:200])
    _one_line_error(lambda: load_model(str(t), model_class="nadoo_test_models:MLP", input_shapes={"x": [1, 8]}),
                    "corrupt")


def test_state_dict_errors(tmp_path):
    p = tmp_path / "w.pt"
    torch.save(_seeded(MLP).state_dict(), p)
    _one_line_error(lambda: load_model(str(p), input_shapes={"x": [1, 8]}), "--model-class")
    _one_line_error(lambda: load_model(str(p), model_class="no_such_pkg_xyz:Net", input_shapes={"x": [1, 8]}),
                    "cannot import")
    _one_line_error(lambda: load_model(str(p), model_class="nadoo_test_models:Nope", input_shapes={"x": [1, 8]}),
                    "no attribute")
    _one_line_error(lambda: load_model(str(p), model_class="Net", input_shapes={"x": [1, 8]}), "ClassName")
    msg = _one_line_error(lambda: load_model(str(p), model_class="nadoo_test_models:SmallCNN",
                                             input_shapes={"image": [1, 1, 8, 8]}), "missing keys")
    assert "conv.weight" in msg and "net.0.weight" in msg
    sd = _seeded(MLP).state_dict()
    sd["net.0.weight"] = torch.zeros(16, 9)
    torch.save(sd, p)
    _one_line_error(lambda: load_model(str(p), model_class="nadoo_test_models:MLP", input_shapes={"x": [1, 8]}),
                    "shape mismatch")
    torch.save(torch.zeros(3), p)
    _one_line_error(lambda: load_model(str(p), model_class="nadoo_test_models:MLP"), "not a state_dict")


def test_needs_shapes_and_fitting_inputs(tmp_path):
    p = tmp_path / "w.pt"
    torch.save(_seeded(MLP).state_dict(), p)
    _one_line_error(lambda: load_model(str(p), model_class="nadoo_test_models:MLP"), "--calib")
    _one_line_error(lambda: load_model(str(p), model_class="nadoo_test_models:MLP", input_shapes={"y": [1, 8]}),
                    "does not take")
    _one_line_error(lambda: load_model(str(p), model_class="nadoo_test_models:MLP", input_shapes={"x": [1, 7]}),
                    "fails on example inputs")


class Unexportable(nn.Module):
    def forward(self, x):
        # data-dependent Python control flow + numpy round-trip: neither exporter can keep it
        return torch.from_numpy(np.sort(x.detach().numpy(), axis=-1)) + 1


_fake.Unexportable = Unexportable


def test_export_failure_is_one_line(tmp_path):
    p = tmp_path / "w.pt"
    torch.save({}, p)
    # an empty state_dict is not a state_dict of tensors
    _one_line_error(lambda: load_model(str(p), model_class="nadoo_test_models:Unexportable",
                                       input_shapes={"x": [1, 4]}))
    torch.save(Unexportable(), p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        msg = _one_line_error(lambda: load_model(str(p), allow_pickle=True, input_shapes={"x": [2, 4]}))
    assert "export" in msg.lower() or "fails" in msg.lower()


@pytest.mark.skipif(not os.environ.get("NADOO_SLOW"), reason="slow (~20 s): set NADOO_SLOW=1")
def test_minilm_pickled_transformers_model(tmp_path):
    from examples.models import load_minilm, minilm_inputs

    tok, model = load_minilm()
    p = tmp_path / "minilm.pt"
    torch.save(model, p)
    lm = load_model(str(p), allow_pickle=True,
                    example_inputs=minilm_inputs(tok, ["hello world", "the cat sat"], seq_len=16))
    assert [s.name for s in lm.input_specs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(s.shape == ["batch", "seq"] and s.dtype == "int64" for s in lm.input_specs)
    assert lm.output_names == ["output_0", "output_1"]  # last_hidden_state, pooler_output
    sess = ort.InferenceSession(lm.onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    for b, L in ((1, 8), (5, 24)):
        feeds = minilm_inputs(tok, ["a sentence", "another one here", "x", "y z", "q"][:b], seq_len=L)
        got = sess.run(None, feeds)
        ref = lm.run_torch(feeds)
        assert got[0].shape == (b, L, 384)
        for g, r in zip(got, ref.values()):
            np.testing.assert_allclose(g, r, atol=2e-4)


# ---------------------------------------------------------------------------------------------
# .pt2 text models: the dynamic axes of the saved program are kept, the batch is added where the
# graph allows it, and nothing is made dynamic against the program (no warning, no fallback)

class FixedLengthText(nn.Module):
    """Learned positions for exactly 7 tokens: the saved graph relies on the sequence length."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 8)
        self.pos = nn.Parameter(torch.randn(7, 8))
        self.out = nn.Linear(8, 6)

    def forward(self, input_ids, attention_mask):
        h = (self.emb(input_ids) + self.pos) * attention_mask.unsqueeze(-1).to(torch.float32)
        return self.out(h), h.mean(dim=1)


class BatchBakedIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x.reshape(6, 4)).reshape(2, 9)  # a static export bakes the batch of 2 in


def _export_pt2(tmp_path, module, args, dynamic_shapes=None):
    ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    p = tmp_path / "m.pt2"
    torch.export.save(ep, str(p))
    return p


def _load_recording(path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = load_model(str(path))
    return lm, [str(w.message) for w in caught if str(path) in str(w.message)]


def test_pt2_text_model_with_fixed_sequence(tmp_path):
    m = _seeded(FixedLengthText)
    feeds = _token_feeds(2, 7)
    b = torch.export.Dim("batch")
    p = _export_pt2(tmp_path, m, tuple(torch.from_numpy(v) for v in feeds.values()),
                    ({0: b}, {0: b}))
    lm, caught = _load_recording(p)
    assert caught == [] and lm.warnings == []
    assert [s.shape for s in lm.input_specs] == [["batch", 7], ["batch", 7]]
    for batch in (1, 5):
        _compare(lm, m, _token_feeds(batch, 7, seed=batch), positional=True)


def test_pt2_text_model_with_dynamic_sequence(tmp_path):
    m = _seeded(TokenModel)
    feeds = _token_feeds(2, 5)
    b, s = torch.export.Dim("batch"), torch.export.Dim("seq")
    p = _export_pt2(tmp_path, m, tuple(torch.from_numpy(v) for v in feeds.values()),
                    ({0: b, 1: s}, {0: b, 1: s}))
    lm, caught = _load_recording(p)
    assert caught == [] and lm.warnings == []
    assert [sp.shape for sp in lm.input_specs] == [["batch", "seq"], ["batch", "seq"]]
    for batch, seq in ((1, 3), (4, 9)):
        _compare(lm, m, _token_feeds(batch, seq, seed=seq), positional=True)


def test_pt2_static_batch_the_graph_relies_on_is_kept_with_one_note(tmp_path):
    m = _seeded(BatchBakedIn)
    p = _export_pt2(tmp_path, m, (torch.randn(2, 3, 4),))
    lm, caught = _load_recording(p)
    assert len(lm.warnings) == 1 and "specializes the batch axis" in lm.warnings[0]
    assert [s.shape for s in lm.input_specs] == [[2, 3, 4]]
    _compare(lm, m, {"x": np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)}, positional=True)
