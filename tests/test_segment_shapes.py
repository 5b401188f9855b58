"""runtime/segment_shapes.py settles the ORT engine's segments without onnx, to the shapes onnx's shape
inference gives: a tiny Gemma's prefill and decode, the zoo's text models in each export form (MiniLM:
tests/test_minilm.py); a segment whose operators it does not cover still settles, with onnx."""
from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import nadoo.runtime as nd  # noqa: E402
from nadoo.compiler.pipeline import CompileOptions, compile_model  # noqa: E402
from segment_check import assert_shapes_agree, recorded_settles  # noqa: E402


def test_gemma_prefill_and_decode(tmp_path, monkeypatch):
    from lm_fixtures import tiny_model

    from nadoo.compiler.lm_compile import compile_lm

    tiny_model("gemma3", vocab=128).save_pretrained(tmp_path / "hf")
    compile_lm(tmp_path / "hf", tmp_path / "g.ndc", CompileOptions(), quiet=True)
    with recorded_settles(monkeypatch) as seen, \
            nd.Session(tmp_path / "g.ndc", policy=nd.Policy(bits="4"), engine="ort") as s:
        assert s.segments and all(seg.own_shapes for seg in s.segments)
        s.generate(prompt_ids=[2, 5, 9, 11], max_new_tokens=3, stop_at_eos=False)
    assert len(seen) >= 2 * len(s.segments)  # each segment settled for the prefill and the decode shape
    assert assert_shapes_agree(seen) > 20


# Each text model of the zoo (and the audio encoder: convolutions) in one of its export forms (tools/zoo.py exports all three; the forms rotate
# so that each is seen: TorchScript's traces keep their shape arithmetic, dynamo's and torch.export's differ).
ZOO_TEXT = [("bert", "onnx"), ("distilbert", "torchscript"), ("roberta", "pt2"), ("t5_encoder", "onnx"),
            ("gpt2", "torchscript"), ("llama", "pt2"), ("qwen2", "onnx"), ("mistral", "torchscript"),
            ("gemma3_text", "pt2"), ("bilstm", "onnx"), ("bigru", "pt2"), ("whisper_encoder", "torchscript")]


@pytest.mark.parametrize("name,form", ZOO_TEXT)
def test_zoo_text_models(name, form, tmp_path, monkeypatch):
    from tools.zoo import _quiet, build, export

    z = build(name)
    np.savez(tmp_path / "calib.npz", **z.draw(8, 0))
    src = export(z, form, str(tmp_path))
    with _quiet():
        compile_model(src, str(tmp_path / "m.ndc"), CompileOptions(calib=str(tmp_path / "calib.npz")), quiet=True)
    with recorded_settles(monkeypatch) as seen, \
            nd.Session(tmp_path / "m.ndc", policy=nd.Policy(bits="8"), engine="ort") as o, \
            nd.Session(tmp_path / "m.ndc", policy=nd.Policy(bits="8"), engine="numpy") as n:
        for batch, seed in ((1, 3), (3, 4)):
            feeds = z.draw(batch, seed)
            np.testing.assert_allclose(o.run(None, feeds)[0], n.run(None, feeds)[0], rtol=1e-4, atol=1e-4)
    assert len(seen) >= 2 and assert_shapes_agree(seen) > 20


def test_an_operator_without_a_rule_settles_with_onnx(tmp_path):
    """Einsum has no rule here: its segment settles through onnx's inference, checked against the cap
    as any segment (not run node by node in NumPy)."""
    from onnx import TensorProto, helper

    import onnx

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "n"])
    g = helper.make_graph([helper.make_node("Einsum", ["x", "x"], ["e"], equation="bi,bj->bij"),
                           helper.make_node("Relu", ["e"], ["y"])], "g", [x],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "n", "n"])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "m.onnx")
    compile_model(str(tmp_path / "m.onnx"), str(tmp_path / "m.ndc"), CompileOptions(keep_float=True), quiet=True)
    with nd.Session(tmp_path / "m.ndc", policy=nd.Policy(bits="float"), engine="ort") as s:
        (seg,) = s.segments
        assert not seg.own_shapes
        xv = np.arange(6, dtype=np.float32).reshape(2, 3)
        np.testing.assert_allclose(s.run(None, {"x": xv})[0], np.maximum(np.einsum("bi,bj->bij", xv, xv), 0))
        (got,) = seg._checked.values()
        assert got is not None and got[0][0] == 18  # settled: the largest value has 2 x 3 x 3 elements
