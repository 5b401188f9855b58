"""The ONNX Runtime engine (runtime/ort_engine.py): the NumPy and ORT engines agree to float tolerance
on the digits MLP, the digits CNN and a tiny language model (identical greedy tokens); routed top-k
layers and budgeted streaming stay in NumPy; the run caps hold inside ORT segments; `--engine ort`
without onnxruntime is one error line and `auto` then runs NumPy; both engines report the same stats."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from examples.models import digits_data, export_onnx, train_digits_cnn, train_digits_mlp  # noqa: E402
from nadoo.compiler.pipeline import CompileOptions, compile_model  # noqa: E402
from nadoo.runtime import Policy, Session  # noqa: E402
from nadoo.runtime.errors import ModelError, UnsupportedError  # noqa: E402

LAYER_KEYS = ("chunks_read", "chunks_total", "macs", "dense_macs", "tiers")
BLOCK_ORT = "import sys; sys.modules['onnxruntime'] = None; from nadoo.runtime.cli import main; main()"


@pytest.fixture(scope="module")
def digits():
    return digits_data()


@pytest.fixture(scope="module")
def mlp(tmp_path_factory, digits):
    d = tmp_path_factory.mktemp("ort_mlp")
    torch.jit.save(torch.jit.trace(train_digits_mlp(act_l1=0.0), torch.zeros(1, 64)), d / "mlp.pt")
    np.savez(d / "calib.npz", input=digits[0][:128])
    compile_model(str(d / "mlp.pt"), str(d / "mlp.ndc"), CompileOptions(calib=str(d / "calib.npz"), keep_float=True,
                                                                      chunks=8, route_threshold=0.0), quiet=True)
    return d / "mlp.ndc"


@pytest.fixture(scope="module")
def cnn(tmp_path_factory, digits):
    d = tmp_path_factory.mktemp("ort_cnn")
    x = digits[0][:2].reshape(-1, 1, 8, 8)
    export_onnx(train_digits_cnn(), (torch.from_numpy(x),), d / "cnn.onnx", ["x"], ["y"], {"x": {0: "n"}, "y": {0: "n"}})
    np.savez(d / "calib.npz", x=digits[0][:64].reshape(-1, 1, 8, 8))
    compile_model(str(d / "cnn.onnx"), str(d / "cnn.ndc"), CompileOptions(calib=str(d / "calib.npz"), keep_float=True),
                  quiet=True)
    return d / "cnn.ndc"


def both(path, feeds, policy=None, **kw):
    """(outputs, stats, session facts) per engine, the second of two runs (warm)."""
    out = {}
    for engine in ("numpy", "ort"):
        with Session(path, policy or Policy(bits="float"), engine=engine, **kw) as s:
            s.run(None, feeds)
            ys, st = s.run_with_stats(None, feeds)
            out[engine] = (ys, st, s.ort_nodes)
    return out


def assert_agree(res, rtol=1e-5, atol=1e-5):
    (yn, sn, _), (yo, so, _) = res["numpy"], res["ort"]
    for a, b in zip(yn, yo):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol)
    assert sn["engine"] == "numpy"
    assert set(sn) == set(so)
    assert sn["layers"].keys() == so["layers"].keys()
    for name, layer in sn["layers"].items():  # the same work counted per layer on both engines
        assert {k: so["layers"][name][k] for k in LAYER_KEYS} == {k: layer[k] for k in LAYER_KEYS}, name
    assert sn["resident_weight_bytes"] > 0 and so["resident_weight_bytes"] > 0


@pytest.mark.parametrize("bits", ["float", "8", "4", "2"])
def test_mlp_engines_agree(mlp, digits, bits):
    res = both(mlp, {"input": digits[2][:7]}, Policy(bits=bits))
    assert_agree(res)
    st = res["ort"][1]
    assert st["engine"] == "ort" and res["ort"][2] > 0
    assert st["bytes_read"] == 0  # the weights ORT holds were read when the session opened


def test_cnn_engines_agree(cnn, digits):
    for bits in ("float", "4"):
        res = both(cnn, {"x": digits[2][:5].reshape(-1, 1, 8, 8)}, Policy(bits=bits))
        assert_agree(res, rtol=1e-4, atol=1e-4)
        kinds = {layer["kind"] for layer in res["ort"][1]["layers"].values()}
        assert "conv" in kinds and res["ort"][1]["engine"] == "ort"


def test_topk_keeps_routed_layers_in_numpy(mlp, digits):
    x = {"input": digits[2][:1]}
    res = both(mlp, x, Policy("topk", bits="4", topk=0.5))
    assert_agree(res)
    routed = [n for n, layer in res["ort"][1]["layers"].items() if layer["chunks_read"] < layer["chunks_total"]]
    assert len(routed) == 1  # the fused FFN: chosen per input in NumPy, its neighbours in ORT
    with Session(mlp, Policy(bits="4"), engine="ort") as dense:
        assert 0 < res["ort"][2] < dense.ort_nodes


def test_budget_streaming_stays_in_numpy(mlp, digits):
    feeds = {"input": digits[2][:3]}
    res = both(mlp, feeds, Policy(bits="8"), memory_budget="40KB")
    assert_agree(res)
    with Session(mlp, Policy(bits="8"), engine="ort") as whole, \
            Session(mlp, Policy(bits="8"), engine="ort", memory_budget="40KB") as budget:
        assert budget.ort_nodes < whole.ort_nodes  # chunked layers stream through the bounded cache
        budget.run(None, feeds)
        assert budget.resident_weight_bytes <= 40_000 < whole.resident_weight_bytes
        assert budget.last_stats["bytes_read"] > 0
    with Session(mlp, Policy(bits="8"), memory_budget="40KB") as auto:  # auto: a budget runs NumPy
        assert auto.engine == "numpy" and auto.ort_nodes == 0


def test_run_caps_hold_inside_segments(mlp, digits):
    """A value over the run's element cap is refused before ORT computes it, as the NumPy plan does."""
    for engine in ("numpy", "ort"):
        with Session(mlp, Policy(bits="4"), engine=engine) as s:
            s.plan.max_elements = 1000  # 7 inputs x 256 hidden units is over it
            with pytest.raises(ModelError, match="over the run's cap"):
                s.run(None, {"input": digits[2][:7]})


# ------------------------------------------------------------------ language model
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    pytest.importorskip("transformers")
    from lm_fixtures import tiny_model, tiny_tokenizer_json
    from nadoo.compiler.lm_compile import compile_lm

    d = tmp_path_factory.mktemp("ort_lm")
    tiny_model("gemma3", vocab=400).save_pretrained(d / "hf")
    (d / "hf" / "tokenizer.json").write_text(tiny_tokenizer_json(400))
    compile_lm(d / "hf", d / "g.ndc", CompileOptions(keep_float=True), quiet=True)
    return d / "g.ndc"


@pytest.mark.parametrize("bits", ["float", "4"])
def test_lm_greedy_tokens_identical(tiny_lm, bits):
    prompt = np.random.default_rng(0).integers(4, 400, 9).tolist()
    runs = {}
    for engine in ("numpy", "ort"):
        with Session(tiny_lm, Policy(bits=bits), engine=engine) as s:
            r = s.generate(prompt_ids=prompt, max_new_tokens=16)
            logits, _ = s.run_with_stats(None, {"input_ids": np.array([prompt]), "position_ids": np.arange(9)[None],
                                                "logits_to_keep": np.array([0])})
            runs[engine] = (r, logits[0], s.ort_nodes, {n["op"] for seg in s.segments for n in seg.nodes})
    (rn, ln, _, _), (ro, lo, nodes, ort_ops) = runs["numpy"], runs["ort"]
    assert {"ChunkedLinear", "GatedFFN", "LMHead"} <= ort_ops and "Attention" not in ort_ops
    assert ro.token_ids == rn.token_ids
    np.testing.assert_allclose(lo, ln, rtol=1e-4, atol=1e-4)
    assert nodes > 0 and ro.stats["engine"] == "ort" and rn.stats["engine"] == "numpy"
    assert ro.stats["ort_nodes"] == nodes and rn.stats["ort_nodes"] == 0
    assert ro.stats["resident_weight_bytes"] > 0


# ------------------------------------------------------------------ choosing the engine
@pytest.mark.parametrize("blocked", ["onnxruntime", "onnx"])
def test_engine_choice_without_onnxruntime(mlp, monkeypatch, blocked):
    monkeypatch.setitem(sys.modules, blocked, None)  # import blocked
    with pytest.raises(UnsupportedError, match="onnxruntime and onnx"):
        Session(mlp, engine="ort")
    with Session(mlp, engine="auto") as s:
        assert s.engine == "numpy" and s.ort_nodes == 0
    with pytest.raises(Exception, match="unknown engine"):
        Session(mlp, engine="tensorrt")


def test_cli_engine_options(mlp):
    def nadoo(*args, blocked=False):
        cmd = [sys.executable, "-c", BLOCK_ORT] if blocked else [sys.executable, "-m", "nadoo.runtime.cli"]
        return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=120)

    r = nadoo("run", mlp, "--engine", "ort", blocked=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "onnxruntime" in lines[0], r.stderr
    engines = {}
    for args, blocked in (([], True), (["--engine", "ort", "--threads", "1", "--ort-int8"], False),
                          (["--engine", "numpy"], False)):
        r = nadoo("run", mlp, "--bits", "4", "--json", *args, blocked=blocked)
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        engines[tuple(args)] = st["engine"]
        assert st["resident_weight_bytes"] > 0 and st["check"]
    assert list(engines.values()) == ["numpy", "ort", "numpy"]
    r = nadoo("run", mlp, "--threads", "0")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ weights as stored (the zp codec)
def zp_linear_bundle(path, R=48, K=64, G=16, bounds=(0, 16, 48), seed=0):
    """x -> ChunkedLinear(w [R, K], zp-coded at q8/q4/q2 on a random grid) -> Relu."""
    tiers = pytest.importorskip("nadoo.runtime.tiers")
    if not hasattr(tiers, "ZERO_POINT"):
        pytest.skip("this tree has no integer-zero-point codec")
    from nadoo.compiler.writer import BundleWriter

    rng = np.random.default_rng(seed)
    entry = {"name": "w", "kind": "linear", "shape": [R, K], "group_size": G, "bounds": list(bounds), "tiers": {}}
    graph = {"opset": {"": 18, "nadoo": 1}, "inputs": [{"name": "x", "dtype": "float32", "shape": ["n", K]}],
             "outputs": [{"name": "y", "dtype": "float32", "shape": ["n", R]}], "constants": [],
             "nodes": [{"op": "ChunkedLinear", "domain": "nadoo", "name": "lin", "inputs": ["x"], "outputs": ["h"],
                        "attrs": {"weight": "w"}},
                       {"op": "Relu", "domain": "", "name": "relu", "inputs": ["h"], "outputs": ["y"], "attrs": {}}]}
    with BundleWriter(path) as wr:
        gid = wr.add_json(graph)
        for t, layout in tiers.ZERO_POINT.items():
            g = layout.group(K, G)
            ng = -(-K // g)
            codes = rng.integers(0, 1 << layout.bits, (R, K)).astype(np.uint8)
            scales = (rng.random((R, ng)) * 0.1 + 0.01).astype(np.float16)
            zps = rng.integers(0, 1 << layout.bits, (R, ng)).astype(np.uint8)
            layout.record(entry, [[wr.add_payload(layout.pack(codes[lo:hi], scales[lo:hi], zps[lo:hi], g)[0],
                                                  compress="never") for lo, hi in zip(bounds, bounds[1:])]])
        wr.finish({"format": "ndc", "graph": gid, "constants": None, "profile": None, "sample": None,
                   "tensors": [entry]})
    return path


def test_zp_weights_are_handed_over_as_stored(tmp_path):
    path = zp_linear_bundle(tmp_path / "zp.ndc")
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    fp32 = 48 * 64 * 4
    for bits in ("8", "4", "2"):
        got = {}
        for engine, int8 in (("numpy", False), ("ort", False), ("ort", True)):
            with Session(path, Policy(bits=bits), engine=engine, ort_int8=int8) as s:
                got[engine, int8] = (s.run(None, {"x": x})[0], s.resident_weight_bytes, s.ort_nodes)
        ref, exact, fast = got["numpy", False], got["ort", False], got["ort", True]
        np.testing.assert_allclose(exact[0], ref[0], rtol=1e-5, atol=1e-4)
        assert exact[2] == fast[2] == 2 and ref[1] == fp32
        # exact 4-bit products run on the codes; exact 8/2-bit ones on dequantized floats (fast there)
        assert exact[1] < fp32 / 4 if bits == "4" else exact[1] == fp32
        assert fast[1] < fp32 / 3  # int8 activations: every width on its codes
        err = np.abs(fast[0] - ref[0]).max() / np.abs(ref[0]).max()
        assert 0 < err < 0.05  # activations rounded to int8 per block: close, not equal


# ------------------------------------------------------------------ how weights reach ORT
def test_segment_runs_after_its_handed_over_arrays_are_gone(tmp_path):
    """Weights reach ORT as shared initializers (no copy in the model bytes, none in ORT); the MatMulNBits
    inputs ORT has prepacked (its codes) are dropped once the session exists, what it reads at every call is kept. Their memory is reused by other arrays afterwards,
    and the segment still computes what the NumPy engine computes."""
    import gc

    from nadoo.runtime import ort_engine

    path = zp_linear_bundle(tmp_path / "zp.ndc", R=256, K=256, G=32, bounds=(0, 96, 256))
    x = np.random.default_rng(2).standard_normal((3, 256)).astype(np.float32)
    with Session(path, Policy(bits="4"), engine="numpy") as s:
        ref = s.run(None, {"x": x})[0]
    with Session(path, Policy(bits="4"), engine="ort") as s:
        (seg,) = s.segments
        read = {1, 2, 3} - ort_engine._prepacks(__import__("onnxruntime"), ort_engine.OrtOptions(), ("MatMulNBits", 4, 32, 0))
        assert 1 not in read  # the codes are prepacked
        kept = {2: "_scales", 3: "_zero_points"}
        assert seg._held and all(any(kept[i] in k for i in read) for k in seg._held)  # (small ones: model bytes)
        assert s.resident_weight_bytes < 256 * 256  # counted as what ORT holds
        gc.collect()
        churn = [np.full(1 << 16, 255, np.uint8) for _ in range(64)]  # reuse the freed memory
        np.testing.assert_allclose(s.run(None, {"x": x})[0], ref, rtol=1e-5, atol=1e-4)
        del churn


def test_session_keeps_what_ort_may_read_and_shares_an_initializer():
    """`_session`: a big plan constant and an array two nodes consume are kept for the session's
    lifetime; an array whose one consumer prepacks it (a MatMulNBits' codes, a float MatMul's
    weight) is dropped, one ORT reads at every call (the probe says which) is kept."""
    from onnx import TensorProto, helper

    from nadoo.runtime import ort_engine

    import onnxruntime as ort

    rng = np.random.default_rng(3)
    n, k, g = 4096, 128, 32  # every array over the size that goes into the model bytes
    b = rng.integers(0, 256, (n, k // g, g // 2), dtype=np.uint8)
    s1, s2 = (rng.uniform(0.01, 0.1, n * (k // g)).astype(np.float32) for _ in range(2))
    z = np.full(n * 2, 0x88, np.uint8)  # zero point 8 in both nibbles
    c = rng.standard_normal((k, 32)).astype(np.float32)  # a plan constant
    d = rng.standard_normal((k, 32)).astype(np.float32)  # a float weight
    nbits = dict(domain="com.microsoft", K=k, N=n, bits=4, block_size=g, accuracy_level=0)
    nodes = [helper.make_node("MatMulNBits", ["x", "b", "s1", "z"], ["y1"], **nbits),
             helper.make_node("MatMulNBits", ["x", "b", "s2", "z"], ["y2"], **nbits),  # b, z shared
             helper.make_node("MatMul", ["x", "c"], ["y3"]), helper.make_node("MatMul", ["x", "d"], ["y4"])]
    gr = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                           [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("y1", "y2", "y3", "y4")])
    m = helper.make_model(gr, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    inits = {"b": b, "s1": s1, "s2": s2, "z": z, "c": c, "d": d}
    sess, held = ort_engine._session(ort, ort_engine.OrtOptions(threads=1), m, dict(inits), m.graph.node, {"c": c})
    scales_read = 2 not in ort_engine._prepacks(ort, ort_engine.OrtOptions(threads=1), ("MatMulNBits", 4, g, 0))
    assert set(held) == {"b", "z", "c"} | ({"s1", "s2"} if scales_read else set())  # d: prepacked
    assert all(len(t.external_data) == 1 for t in m.graph.initializer)  # none copied into the model
    x = rng.standard_normal((1, k)).astype(np.float32)
    codes = np.stack([b.reshape(n, -1) & 15, b.reshape(n, -1) >> 4], -1).reshape(n, k).astype(np.float32)
    del d
    y1, y2, y3, y4 = sess.run(None, {"x": x})
    for y, s in ((y1, s1), (y2, s2)):
        w = (codes - 8) * np.repeat(s.reshape(n, -1), g, axis=1)
        np.testing.assert_allclose(y, x @ w.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y3, x @ c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y4, x @ inits["d"], rtol=1e-5, atol=1e-5)


def test_prepack_probe():
    """`_prepacks`: the inputs this ORT prepacks are seen as such; a kind it cannot build keeps its arrays."""
    import onnxruntime as ort

    from nadoo.runtime import ort_engine

    opts = ort_engine.OrtOptions()
    assert ort_engine._prepacks(ort, opts, ("MatMul",)) == {1}
    for level in (0, 4):  # the codes are packed at both levels (scales and zero points: as the kernel does)
        assert 1 in ort_engine._prepacks(ort, opts, ("MatMulNBits", 4, 32, level))
    assert ort_engine._prepacks(ort, opts, ("MatMulNBits", 8, 32, 4)) == {1, 2, 3}
    assert not ort_engine._prepacks(ort, opts, ("MatMulNBits", 3, 32, 0))  # no such kernel: arrays kept


# ------------------------------------------------------------------ embedding lookups
@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    """Token and position embeddings (two lookups) feeding two linear layers: a text encoder's front."""
    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.tok, self.pos = torch.nn.Embedding(300, 64), torch.nn.Embedding(40, 64)
            self.l1, self.l2 = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)

        def forward(self, ids):
            pos = torch.arange(ids.shape[1]).unsqueeze(0)
            return self.l2(torch.relu(self.l1(self.tok(ids) + self.pos(pos))))

    d = tmp_path_factory.mktemp("ort_embed")
    ids = np.random.default_rng(0).integers(0, 300, (64, 16))
    export_onnx(Embed().eval(), (torch.from_numpy(ids[:2]),), d / "e.onnx", ["ids"], ["y"],
                {"ids": {0: "n", 1: "t"}, "y": {0: "n", 1: "t"}})
    np.savez(d / "calib.npz", ids=ids)
    compile_model(str(d / "e.onnx"), str(d / "e.ndc"), CompileOptions(calib=str(d / "calib.npz"), keep_float=True,
                                                                      group_size=32), quiet=True)
    return d / "e.ndc"


@pytest.mark.parametrize("bits", ["float", "8", "4"])
def test_dense_lookups_run_in_one_ort_session(embedder, bits):
    """Under a dense policy the embedding lookups run in ORT (its stored codes, GatherBlockQuantized at 8
    and 4 bits), so the whole graph is one ORT session; the chunks counted are those looked up, as in NumPy."""
    feeds = {"ids": np.array([[5, 299, 17, 17, 140, 2, 64]], np.int64)}
    res = both(embedder, feeds, Policy("dense", bits=bits))
    assert_agree(res, rtol=1e-4, atol=1e-5)
    gathers = [k for k, v in res["numpy"][1]["layers"].items() if v["kind"] == "gather"]
    assert len(gathers) == 2 and all(0 < res["ort"][1]["layers"][k]["chunks_read"] for k in gathers)
    with Session(embedder, Policy("dense", bits=bits), engine="ort") as s:
        assert len(s.segments) == 1 and s.ort_nodes == len(s.plan.nodes)
        assert (("com.microsoft", "GatherBlockQuantized") in s.segments[0].kernels) == (bits != "float")


def test_routed_policy_keeps_lookups_in_numpy(embedder):
    feeds = {"ids": np.array([[5, 299, 17]], np.int64)}
    res = both(embedder, feeds, Policy("topk", bits="8", topk=0.5))
    assert_agree(res, rtol=1e-4, atol=1e-5)
    with Session(embedder, Policy("topk", bits="8", topk=0.5), engine="ort") as s:
        assert s.ort_nodes < len(s.plan.nodes)
        assert not any(("com.microsoft", "GatherBlockQuantized") in seg.kernels for seg in s.segments)


def test_session_falls_back_to_external_initializers(tmp_path, monkeypatch):
    """Were ORT to refuse shared initializers (read their placeholder data), `_session` builds the
    segment again with the arrays handed over as external initializers: same results."""
    from nadoo.runtime import ort_session

    path = zp_linear_bundle(tmp_path / "zp.ndc", R=256, K=256, G=32, bounds=(0, 96, 256))
    x = np.random.default_rng(5).standard_normal((3, 256)).astype(np.float32)
    with Session(path, Policy(bits="4"), engine="numpy") as s:
        ref = s.run(None, {"x": x})[0]
    build, kinds = ort_session._build, []

    def refusing(ort, options, model, names, values, shared):
        kinds.append(shared)
        if shared and names:
            raise RuntimeError("Random-access reads require a regular file: /dev/null")
        return build(ort, options, model, names, values, shared)

    monkeypatch.setattr(ort_session, "_build", refusing)
    with Session(path, Policy(bits="4"), engine="ort") as s:
        assert s.segments and False in kinds
        np.testing.assert_allclose(s.run(None, {"x": x})[0], ref, rtol=1e-5, atol=1e-4)
