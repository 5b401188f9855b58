"""compile → bundle → run, on real models trained here: the digits MLP (TorchScript) and CNN (ONNX)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from examples.models import digits_data, export_onnx, train_digits_cnn, train_digits_mlp  # noqa: E402
from nadoo.compiler.pipeline import CompileOptions, compile_model  # noqa: E402
from nadoo.runtime import InputError, Policy, Session  # noqa: E402
from nadoo.runtime.reader import Bundle  # noqa: E402

RUN_KEYS = ["bytes_read", "bundle_bytes", "dense_fp32_weight_bytes", "chunks_read", "chunks_total", "macs",
            "dense_macs", "latency_s", "peak_rss_bytes", "cache_hits", "layers"]


def nadoo(*args, env=None):
    return subprocess.run([sys.executable, "-m", "nadoo.runtime.cli", *map(str, args)], capture_output=True,
                          text=True, env=env)


@pytest.fixture(scope="module")
def digits():
    return digits_data()


@pytest.fixture(scope="module")
def mlp(tmp_path_factory, digits):
    """The digits MLP saved as TorchScript and compiled through the CLI with float weights kept."""
    d = tmp_path_factory.mktemp("mlp")
    Xtr, ytr, Xte, yte = digits
    model = train_digits_mlp()
    torch.jit.save(torch.jit.trace(model, torch.zeros(1, 64)), d / "mlp.pt")
    np.savez(d / "calib.npz", input=Xtr[:128])
    r = nadoo("compile", d / "mlp.pt", "--calib", d / "calib.npz", "-o", d / "mlp.ndc", "--keep-float",
              "--chunks", "8", "--route-threshold", "0", "-q")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "routable layers: 1" in r.stdout  # the fused FFN (64→256→ReLU→256)
    with torch.no_grad():
        ref = model(torch.from_numpy(Xte)).numpy()
    return d, model, ref


def test_dense_float_equals_source(mlp, digits):
    d, _, ref = mlp
    with Session(d / "mlp.ndc", Policy(bits="float")) as s:
        (y,) = s.run(None, {"input": digits[2]})
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_quantized_tiers_keep_accuracy(mlp, digits):
    d, _, ref = mlp
    yte = digits[3]
    acc = {}
    for bits in ("float", "8", "4", "2"):
        with Session(d / "mlp.ndc", Policy(bits=bits)) as s:
            acc[bits] = float(np.mean(s.run(None, {"input": digits[2]})[0].argmax(1) == yte))
    assert acc["float"] > 0.95
    assert acc["8"] >= acc["float"] - 0.005
    assert acc["4"] >= acc["float"] - 0.01
    assert acc["2"] >= acc["float"] - 0.10, acc  # 2-bit is the cold tier; recorded, loosely bounded


def test_topk_all_chunks_equals_dense_and_half_reads_less(mlp, digits):
    d, _, _ = mlp
    x = digits[2][:5]
    # the NumPy engine reads chunks per call (ORT's weights are read once, at open)
    with Session(d / "mlp.ndc", Policy(bits="4"), engine="numpy") as s:
        dense = s.run(None, {"input": x})[0]
        s.cache.clear()
        s.run(None, {"input": x[:1]})
        dense_bytes = s.last_stats["bytes_read"]
    with Session(d / "mlp.ndc", Policy("topk", bits="4", topk=1.0), engine="numpy") as s:
        np.testing.assert_array_equal(s.run(None, {"input": x})[0], dense)
    with Session(d / "mlp.ndc", Policy("topk", bits="4", topk=0.5), engine="numpy") as s:
        s.run(None, {"input": x[:1]})  # one input: its own top half (a batch reads the union of its inputs')
        st = s.last_stats
    routed = [l for l in st["layers"].values() if l["chunks_read"] < l["chunks_total"]]
    assert len(routed) == 1 and routed[0]["chunks_read"] == 4 and routed[0]["kind"] == "ffn_up"
    assert st["bytes_read"] < dense_bytes and st["macs"] < st["dense_macs"]


def test_ffn_is_fused_reordered_and_still_exact(mlp):
    d, _, _ = mlp
    with Bundle.open(d / "mlp.ndc") as b:
        kinds = {e.name: e.kind for e in b.tensors.values()}
        assert sorted(kinds.values()) == ["ffn_down", "ffn_up", "linear"]
        up = next(e for e in b.tensors.values() if e.kind == "ffn_up")
        down = next(e for e in b.tensors.values() if e.kind == "ffn_down")
        # neuron group i of up and down are adjacent in the file: one positioned read serves both
        for i in range(up.n_chunks):
            pu, pd = int(up.tiers["q4"][i]), int(down.tiers["q4"][i])
            assert pd == pu + 1
            assert int(b.table["offset"][pd]) - int(b.table["offset"][pu] + b.table["stored"][pu]) < b.preamble.alignment
        ops = {n["op"] for n in b.read_graph()["nodes"]}
        assert "ChunkedFFN" in ops


def test_sketch_predictor_recall_on_held_out_inputs(mlp, digits):
    d, _, _ = mlp
    X = digits[2][:60]  # test split: never seen in calibration
    hits, total = 0, 0
    with Session(d / "mlp.ndc", Policy("topk", bits="4", topk=0.5, predictor="sketch")) as s, \
            Session(d / "mlp.ndc", Policy("topk", bits="4", topk=0.5, predictor="oracle")) as o:
        for i in range(len(X)):
            s.run(None, {"input": X[i : i + 1]})
            o.run(None, {"input": X[i : i + 1]})
            (a,) = [set(op.selected.tolist()) for op in s.ops if op.selected is not None]
            (b,) = [set(op.selected.tolist()) for op in o.ops if op.selected is not None]
            hits += len(a & b)
            total += len(b)
    assert hits / total >= 0.9


def test_oracle_topk_keeps_the_most_active_chunks(mlp, digits):
    d, _, _ = mlp
    x = digits[2][:1]
    with Session(d / "mlp.ndc", Policy("topk", bits="float", topk=1.0, predictor="oracle")) as s:
        full = s.run(None, {"input": x})[0]
    with Session(d / "mlp.ndc", Policy(bits="float")) as s:
        np.testing.assert_allclose(s.run(None, {"input": x})[0], full, rtol=1e-6, atol=1e-6)


def test_bytes_read_is_the_sum_of_payloads_read(mlp, digits, monkeypatch):
    d, _, _ = mlp
    decoded = []
    orig = Bundle._decode

    def spy(self, pid, stored, counted=True, **kw):
        decoded.append((pid, len(stored)))
        return orig(self, pid, stored, counted, **kw)

    monkeypatch.setattr(Bundle, "_decode", spy)
    with Session(d / "mlp.ndc", Policy("topk", bits="4", topk=0.5)) as s:
        decoded.clear()
        s.run(None, {"input": digits[2][:3]})
        st = s.last_stats
        assert st["bytes_read"] == sum(n for _, n in decoded) > 0
        assert st["bytes_read"] == int(s.bundle.table["stored"][[p for p, _ in decoded]].sum())
        # what left the file: the payloads plus the alignment gaps merged reads step over
        assert st["bytes_read"] <= st["disk_bytes_read"] <= st["bytes_read"] + len(decoded) * s.bundle.preamble.alignment
        decoded.clear()
        s.run(None, {"input": digits[2][:3]})  # warm: everything cached, nothing read
        assert s.last_stats["bytes_read"] == 0 and not decoded and s.last_stats["cache_hits"] > 0


def test_memory_budget_is_never_exceeded(mlp, digits):
    d, _, _ = mlp
    budget = 40_000
    with Session(d / "mlp.ndc", Policy(bits="4"), memory_budget=budget) as s:
        for i in range(3):
            s.run(None, {"input": digits[2][i : i + 1]})
            assert s.cache.bytes <= budget and s.cache.peak_bytes <= budget


def test_budget_below_the_decoded_model_holds_payloads(mlp, digits):
    # a budget the 4-bit payloads fit in but the float32 weights do not: the cache holds the payloads and
    # decodes on use, so a warm call reads nothing and computes what an unbounded session does (to float
    # rounding: streamed layers sum chunk by chunk)
    d, _, _ = mlp
    x = {"input": digits[2][:4]}
    with Session(d / "mlp.ndc", Policy(bits="4")) as s:
        ref = s.run(None, x)[0]
    with Bundle.open(d / "mlp.ndc") as b:
        per = {e.name: sum(int(b.table["stored"][p]) for i in range(e.n_chunks) for p in e.chunk_pids("q4", i))
               for e in b.tensors.values()}  # each tensor's 4-bit payload bytes
        stored = sum(per.values())
        decoded = b.index["stats"]["dense_fp32_weight_bytes"]
    budget = stored + 1000
    assert budget < decoded
    with Session(d / "mlp.ndc", Policy(bits="4"), memory_budget=budget) as s:
        assert s.ops[0].env.store.encoded
        cold = s.run(None, x)[0]
        np.testing.assert_allclose(cold, ref, rtol=1e-5, atol=1e-5)
        assert s.last_stats["bytes_read"] == stored
        np.testing.assert_array_equal(s.run(None, x)[0], cold)
        assert s.last_stats["bytes_read"] == 0 and s.cache.bytes == stored == s.resident_weight_bytes
    # a tensor whose payloads alone exceed the budget is read on every use and never held: keeping its
    # chunks would only evict the others
    big = max(per, key=per.get)
    with Session(d / "mlp.ndc", Policy(bits="4"), memory_budget=per[big] - 1) as s:
        s.run(None, x)
        np.testing.assert_allclose(s.run(None, x)[0], ref, rtol=1e-5, atol=1e-5)
        assert s.last_stats["bytes_read"] >= per[big]
        assert not any(k[0] == big for k in s.cache._items) and s.cache.bytes <= per[big] - 1
    with Session(d / "mlp.ndc", Policy(bits="4"), memory_budget=decoded) as s:  # all decoded fits: floats held
        assert not s.ops[0].env.store.encoded
        np.testing.assert_allclose(s.run(None, x)[0], ref, rtol=1e-5, atol=1e-5)


def test_payloads_decode_within_tier_error(mlp):
    d, model, _ = mlp
    with Bundle.open(d / "mlp.ndc") as b:
        for e in b.tensors.values():
            w = b.read_weight(e.name, "f32")
            # GPTQ minimises the output error, not the weight error: 2-bit weight-space error may exceed 1/4;
            # and the zp grid's 4 levels always include 0, so they cannot sit symmetric on a centred group
            for tier, bound in (("q8", 1e-4), ("q4", 2e-2), ("q2", 0.45)):
                q = b.read_weight(e.name, tier)
                rel = float(np.sum((q - w) ** 2) / np.sum(w**2))
                assert rel < bound, (e.name, tier, rel)
                stored = np.mean(e.errors[tier]["mse"])
                assert np.isclose(np.mean((q - w) ** 2), stored, rtol=0.3) or stored < 1e-9


def test_run_json_without_input_checks_stored_sample(mlp):
    d, _, _ = mlp
    r = nadoo("run", d / "mlp.ndc", "--bits", "float", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    for k in RUN_KEYS:
        assert k in st
    assert st["check"]["output"]["cosine"] > 0.999999 and st["check"]["output"]["max_abs_err"] < 1e-4
    r = nadoo("run", d / "mlp.ndc", "--stats")
    assert r.returncode == 0 and "chunks" in r.stdout and "bytes_read" in r.stdout


def test_run_with_input_file_and_output(mlp, digits, tmp_path):
    d, _, ref = mlp
    np.save(tmp_path / "x.npy", digits[2][:7])
    r = nadoo("run", d / "mlp.ndc", "--bits", "float", "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npz")
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["output"], ref[:7], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["name", "shape", "dtype", "missing"])
def test_bad_inputs_give_one_line_and_exit_2(mlp, digits, tmp_path, bad):
    d, _, _ = mlp
    x = digits[2][:2]
    feeds = {"name": {"inputs": x}, "shape": {"input": x[:, :10]}, "dtype": {"input": x.astype(np.complex64)},
             "missing": {}}[bad]
    np.savez(tmp_path / "in.npz", **feeds)
    r = nadoo("run", d / "mlp.ndc", "--input", tmp_path / "in.npz")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nadoo: error:"), r.stderr
    with Session(d / "mlp.ndc") as s, pytest.raises(InputError):
        s.run(None, feeds)


def test_runtime_runs_where_torch_cannot_be_imported(mlp, tmp_path):
    d, _, _ = mlp
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nclass _Block:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'onnx', 'onnxruntime'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, _Block())\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    r = nadoo("run", d / "mlp.ndc", "--bits", "4", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["check"]["output"]["cosine"] > 0.999


def test_prune_tau_at_compile_and_run(tmp_path, digits):
    Xtr = digits[0]
    m = train_digits_mlp()
    torch.jit.save(torch.jit.trace(m, torch.zeros(1, 64)), tmp_path / "m.pt")
    np.savez(tmp_path / "c.npz", input=Xtr[:64])
    rep = compile_model(tmp_path / "m.pt", str(tmp_path / "p.ndc"),
                        CompileOptions(calib=str(tmp_path / "c.npz"), prune_tau=0.05, chunks=64, keep_float=True),
                        quiet=True)
    assert 0 < rep.kept_params_ratio < 1
    with Bundle.open(tmp_path / "p.ndc") as b:
        assert b.index["stats"]["kept_params_ratio"] == rep.kept_params_ratio
        e = b.tensors["0.weight"]
        w = np.abs(b.read_weight("0.weight", "f32"))
        assert w.max() == e.meta["absmax"] and np.all((w == 0) | (w >= 0.05 * e.meta["absmax"]))
    with Session(tmp_path / "p.ndc", Policy(bits="8", tau=0.5)) as s:
        s.run(None, {"input": digits[2][:2]})
        assert s.last_stats["chunks_read"] < s.last_stats["chunks_total"]


def test_cnn_from_onnx_file(tmp_path, digits):
    Xtr, _, Xte, yte = digits
    model = train_digits_cnn()
    x = Xtr[:2].reshape(-1, 1, 8, 8)
    export_onnx(model, (x,), tmp_path / "cnn.onnx", ["image"], ["logits"], {"image": {0: "batch"}, "logits": {0: "batch"}})
    np.savez(tmp_path / "c.npz", image=Xtr[:64].reshape(-1, 1, 8, 8))
    rep = compile_model(tmp_path / "cnn.onnx", str(tmp_path / "cnn.ndc"),
                        CompileOptions(calib=str(tmp_path / "c.npz"), keep_float=True, chunks=4), quiet=True)
    assert rep.tensors >= 2
    xs = Xte.reshape(-1, 1, 8, 8)
    with torch.no_grad():
        ref = model(torch.from_numpy(xs)).numpy()
    with Session(tmp_path / "cnn.ndc", Policy(bits="float")) as s:
        kinds = {l["kind"] for l in (s.run(None, {"image": xs[:1]}) and s.last_stats["layers"]).values()}
        assert "conv" in kinds
        np.testing.assert_allclose(s.run(None, {"image": xs})[0], ref, rtol=1e-4, atol=1e-4)
    with Session(tmp_path / "cnn.ndc", Policy(bits="4")) as s:
        acc4 = float(np.mean(s.run(None, {"image": xs})[0].argmax(1) == yte))
    assert acc4 >= float(np.mean(ref.argmax(1) == yte)) - 0.01


def test_compile_bad_input_leaves_no_bundle(tmp_path):
    r = nadoo("compile", tmp_path / "missing.pt", "-o", tmp_path / "o.ndc")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x01garbage" * 10)
    r = nadoo("compile", tmp_path / "junk.onnx", "-o", tmp_path / "o.ndc")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o.ndc").exists()
    assert sorted(os.listdir(tmp_path)) == ["junk.onnx"]  # no bundle, no temp file


def test_compile_unsupported_op_is_one_clear_error(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [64, 32], np.ones(64 * 32, np.float32))
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Frobnicate", ["h"], ["y"], domain="acme")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("acme", 1)])
    onnx.save(m, tmp_path / "u.onnx")
    np.savez(tmp_path / "c.npz", x=np.ones((4, 64), np.float32))
    r = nadoo("compile", tmp_path / "u.onnx", "--calib", tmp_path / "c.npz", "-o", tmp_path / "o.ndc", "-q")
    assert r.returncode == 2 and "Frobnicate" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o.ndc").exists()


def test_export_to_plain_onnx_matches_the_numpy_engine(mlp, digits, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    d, _, _ = mlp
    x = digits[2][:9]
    for bits, tier in (("float", "f32"), ("4", "q4")):
        r = nadoo("export", d / "mlp.ndc", "-o", tmp_path / f"m{bits}.onnx", "--bits", bits)
        assert r.returncode == 0, r.stderr
        y = ort.InferenceSession(str(tmp_path / f"m{bits}.onnx")).run(None, {"input": x})[0]
        with Session(d / "mlp.ndc", Policy(bits=bits)) as s:
            np.testing.assert_allclose(y, s.run(None, {"input": x})[0], rtol=1e-5, atol=1e-5)
    from nadoo.runtime.export_onnx import OrtSession

    np.testing.assert_allclose(OrtSession(d / "mlp.ndc", "q4").run(None, {"input": x})[0], y, rtol=1e-6, atol=1e-6)


def test_budgeted_topk_pins_hot_chunks_and_stays_in_budget(mlp, digits):
    d, _, _ = mlp
    budget = 200_000  # the decoded FFN is 320 KB: half of it fits, two of its eight groups pinned
    with Session(d / "mlp.ndc", Policy("topk", bits="4", topk=0.5), memory_budget=budget) as s:
        assert 0 < s.cache.pinned_bytes <= budget // 2
        rates = []
        for i in range(20):
            s.run(None, {"input": digits[2][i : i + 1]})
            assert s.cache.bytes <= budget
            rates.append(s.last_stats["cache_hit_rate"])
        assert s.last_stats["cache_pinned_bytes"] == s.cache.pinned_bytes
        assert np.mean(rates[1:]) > 0.3  # hot chunks are pinned: later inputs mostly hit


def test_ffn_group_with_empty_up_chunk_still_adds_its_bias_path(mlp, digits, monkeypatch):
    """An emptied up chunk decodes to zeros, but act(b1)·down is not zero: the group must be computed."""
    import nadoo.runtime.session as session_mod

    d, _, _ = mlp
    real_open = session_mod.Bundle.open

    def open_with_empty_up_chunk(path, use_mmap=False):
        b = real_open(path, use_mmap)
        up = next(e for e in b.tensors.values() if e.kind == "ffn_up")
        for t in up.tiers:
            up.tiers[t][3] = -1
        return b

    monkeypatch.setattr(session_mod.Bundle, "open", staticmethod(open_with_empty_up_chunk))
    x = digits[2][:4]
    with Session(d / "mlp.ndc", Policy(bits="float")) as s:
        y = s.run(None, {"input": x})[0]
        b = s.bundle
        g = b.read_graph()
        consts = b.read_constants()
        ffn = next(n for n in g["nodes"] if n["op"] == "ChunkedFFN")
        head = next(n for n in g["nodes"] if n["op"] == "ChunkedLinear")
        wu, wd = b.read_weight(ffn["attrs"]["up"], "f32"), b.read_weight(ffn["attrs"]["down"], "f32")
        wh = b.read_weight(head["attrs"]["weight"], "f32")
        b1, b2, bh = consts[ffn["inputs"][1]], consts[ffn["inputs"][2]], consts[head["inputs"][1]]
    lo, hi = (int(v) for v in next(e for e in b.tensors.values() if e.kind == "ffn_up").bounds[3:5])
    assert not wu[lo:hi].any() and np.maximum(b1[lo:hi], 0).any()  # the case under test
    # the activation-aware 1/s (compiler/awq.py) a Mul applies ahead of a layer, if any
    mul = {n["outputs"][0]: consts[n["inputs"][1]] for n in g["nodes"] if n["op"] == "Mul" and n["inputs"][1] in consts}
    s_in = lambda node: mul.get(node["inputs"][0], 1)  # noqa: E731
    ref = np.maximum(np.maximum((x * s_in(ffn)) @ wu.T + b1, 0) @ wd + b2, 0) * s_in(head) @ wh.T + bh
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_run_input_npy_under_another_name_is_accepted(mlp, digits, tmp_path):
    d, _, _ = mlp
    np.save(tmp_path / "x.npy", digits[2][:2])
    (tmp_path / "x.npy").rename(tmp_path / "x.bin")
    r = nadoo("run", d / "mlp.ndc", "--input", tmp_path / "x.bin", "--json")
    assert r.returncode == 0, r.stderr
    (tmp_path / "junk.bin").write_bytes(b"not numpy at all")
    r = nadoo("run", d / "mlp.ndc", "--input", tmp_path / "junk.bin")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_layer_larger_than_budget_streams_and_stays_exact(mlp, digits):
    d, _, ref = mlp
    with Session(d / "mlp.ndc", Policy(bits="float"), memory_budget=100_000) as s:  # FFN: 320 KB decoded
        y = s.run(None, {"input": digits[2][:9]})[0]
        assert s.cache.peak_bytes <= 100_000
    np.testing.assert_allclose(y, ref[:9], rtol=1e-5, atol=1e-5)
