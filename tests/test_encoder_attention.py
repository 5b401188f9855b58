"""nadoo.EncoderAttention: the fused kernel, the compile-time matcher, block-sparse attention, CLI."""

import json
import os

import numpy as np
import pytest

from nadoo.runtime.block_attention import BlockAttentionPolicy, block_sparse_attention
from nadoo.runtime.errors import BundleError, InputError
from nadoo.runtime.ops.encoder_attention import dense_attention


def _reference(q, k, v, mask, heads, scale):
    """softmax(scale·QKᵀ + mask)·V per head in float64, written out directly."""
    b, s, e = q.shape
    d = e // heads
    qh, kh, vh = (x.reshape(b, -1, heads, d).transpose(0, 2, 1, 3).astype(np.float64) for x in (q, k, v))
    sc = scale * np.einsum("bhqd,bhkd->bhqk", qh, kh) + (0 if mask is None else mask)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bqhd", p, vh).reshape(b, -1, e)


def _qkv(rng, b, s, e):
    return [rng.standard_normal((b, s, e)).astype(np.float32) for _ in range(3)]


def _padding_mask(rng, b, s, rows=False):
    keep = rng.random((b, s)) > 0.3
    keep[:, 0] = True
    m = np.where(keep, 0, -np.inf).astype(np.float32)[:, None, None, :]
    return np.ascontiguousarray(np.broadcast_to(m, (b, 1, s, s))) if rows else m


def test_dense_kernel_matches_reference_and_masked_rows():
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, 2, 7, 12)
    mask = _padding_mask(rng, 2, 7)
    np.testing.assert_allclose(dense_attention(q, k, v, mask, 3, 0.4, True), _reference(q, k, v, mask, 3, 0.4),
                               rtol=1e-5, atol=1e-5)
    dead = np.zeros((2, 1, 1, 7), np.float32)
    dead[1] = -np.inf  # every key of row 1 masked
    assert np.all(dense_attention(q, k, v, dead, 3, 0.4, True)[1] == 0)  # as IsNaN/Where after the softmax
    with np.errstate(invalid="ignore"):
        assert np.isnan(dense_attention(q, k, v, dead, 3, 0.4, False)[1]).all()  # as a bare softmax


@pytest.mark.parametrize("b,s,heads,d,block,rows", [(2, 37, 3, 4, 8, False), (1, 64, 2, 8, 16, True),
                                                    (3, 5, 1, 4, 8, False), (2, 40, 2, 4, 7, True)])
def test_blocks_covering_every_block_equal_dense(b, s, heads, d, block, rows):
    rng = np.random.default_rng(s)
    q, k, v = _qkv(rng, b, s, heads * d)
    for mask in (None, _padding_mask(rng, b, s, rows)):
        dense = dense_attention(q, k, v, mask, heads, 0.3, True)
        out, read, total = block_sparse_attention(q, k, v, mask, heads, 0.3, True, BlockAttentionPolicy("blocks", 1.0, block))
        np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-6)
        n = -(-s // min(block, s))
        assert read == total == b * heads * n * n


def test_a_block_longer_than_the_input_is_the_input():
    """A --block longer than the input is capped to it: one block, read whole (dense), nothing padded."""
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, 1, 10, 8)
    out, read, total = block_sparse_attention(q, k, v, None, 2, 0.5, True, BlockAttentionPolicy("blocks", 0.5, 10**9))
    assert read == total == 2  # one block of 10: dense
    np.testing.assert_allclose(out, dense_attention(q, k, v, None, 2, 0.5, True), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rows", [False, True])
def test_blocks_read_the_local_sink_and_best_blocks(rows):
    """Keys in blocks of 8; block 5 holds keys aligned with every query: at 3 of 8 blocks each query
    block reads its own, the sink (0) and block 5 -- exactly dense attention restricted to them."""
    rng = np.random.default_rng(1)
    b, s, heads, d, size = 2, 64, 2, 8, 8
    q, k, v = _qkv(rng, b, s, heads * d)
    direction = np.ones(heads * d, np.float32)
    q += 2 * direction
    k[:, 40:48] += 2 * direction  # block 5 scores highest for every query
    mask = _padding_mask(rng, b, s, rows)
    mask[..., 40:48] = 0  # the planted block is not padding
    out, read, total = block_sparse_attention(q, k, v, mask, heads, 0.3, True, BlockAttentionPolicy("blocks", 3 / 8, size))
    assert read / total == pytest.approx(3 / 8)
    qb = np.arange(s)[:, None] // size
    kb = np.arange(s)[None, :] // size
    allowed = (kb == qb) | (kb == 0) | (kb == 5)
    restricted = np.where(allowed, mask, -np.inf).astype(np.float32)
    rows_ = (qb[:, 0] != 0) & (qb[:, 0] != 5)  # query blocks 0 and 5 read a third block of their own choice
    np.testing.assert_allclose(out[:, rows_], _reference(q, k, v, restricted, heads, 0.3)[:, rows_], rtol=1e-4, atol=1e-5)


def test_policy_checks():
    assert not BlockAttentionPolicy().active
    p = BlockAttentionPolicy("blocks", 0.25)
    assert p.block == 32 and p.keep(16) == 4 and p.keep(3) == 1
    for kw, msg in ((dict(kind="blocks"), "needs --attention-blocks"), (dict(kind="blocks", share=0.0), r"\(0, 1\]"),
                    (dict(kind="blocks", share=1.5), r"\(0, 1\]"), (dict(kind="blocks", share=0.5, block=0), "--block"),
                    (dict(share=0.5), "needs --attention blocks"), (dict(block=16), "needs --attention blocks"),
                    (dict(kind="sparse"), "unknown")):
        with pytest.raises(InputError, match=msg):
            BlockAttentionPolicy(**kw)


def test_blocks_need_a_bundle_with_encoder_attention():
    from pathlib import Path

    from click.testing import CliRunner

    from nadoo.runtime.cli import main

    golden = Path(__file__).resolve().parents[1] / "format_spec" / "golden" / "tiny.ndc"
    r = CliRunner().invoke(main, ["run", str(golden), "--attention", "blocks", "--attention-blocks", "0.5"])
    assert r.exit_code == 2 and "no" in r.output and "EncoderAttention" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_corrupt_attributes_are_one_error():
    from nadoo.runtime.engine import Plan

    g = {"inputs": [{"name": x, "dtype": "float32", "shape": None} for x in "qkv"],
         "outputs": [{"name": "o", "dtype": "float32", "shape": None}], "constants": [], "opset": {"": 18, "nadoo": 1},
         "nodes": [{"op": "EncoderAttention", "domain": "nadoo", "name": "att", "inputs": ["q", "k", "v"],
                    "outputs": ["o"], "attrs": {"heads": 0, "scale": 0.5}}]}
    with pytest.raises(BundleError, match="heads"):
        Plan(g, {})
    g["nodes"][0]["attrs"] = {"heads": 2, "scale": 0.5}
    plan = Plan(g, {})
    x = np.zeros((1, 3, 4), np.float32)
    assert plan.run({"q": x, "k": x, "v": x})[0].shape == (1, 3, 4)
    with pytest.raises(InputError, match="heads"):
        plan.run({"q": np.zeros((1, 3, 5), np.float32), "k": x, "v": x})


# ------------------------------------------------------------------ compiled encoders
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tiny(kind, hidden=32, seed=0):
    torch.manual_seed(seed)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=2 * hidden, max_position_embeddings=64)
    else:
        cfg = transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                            max_position_embeddings=64)
    m = transformers.AutoModel.from_config(cfg).eval()

    class Last(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return Last(m).eval()


def _feeds(rng, b, s):
    ids = rng.integers(3, 100, (b, s)).astype(np.int64)
    am = np.ones_like(ids)
    am[-1, s * 2 // 3:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": am}


@pytest.fixture(scope="module", params=["bert", "distilbert"])
def tiny(request, tmp_path_factory):
    from examples.models import export_onnx
    from nadoo.compiler.pipeline import CompileOptions, compile_model

    d = tmp_path_factory.mktemp(request.param)
    model, rng = _tiny(request.param), np.random.default_rng(0)
    names = ["input_ids", "attention_mask"]
    export_onnx(model, _feeds(rng, 2, 12), d / "m.onnx", names, ["h"], {n: {0: "batch", 1: "seq"} for n in names})
    np.savez(d / "calib.npz", **_feeds(rng, 8, 16))
    compile_model(d / "m.onnx", str(d / "m.ndc"), CompileOptions(calib=str(d / "calib.npz"), keep_float=True), quiet=True)
    feeds = _feeds(rng, 3, 40)
    with torch.no_grad():
        ref = model(*(torch.from_numpy(feeds[n]) for n in names)).numpy()
    return d, feeds, ref


def test_compiled_encoder_is_fused_and_equals_torch_on_both_engines(tiny):
    pytest.importorskip("onnxruntime")
    from nadoo.runtime import Policy, Session
    from nadoo.runtime.reader import Bundle

    d, feeds, ref = tiny
    with Bundle.open(d / "m.ndc") as b:
        ops = [n["op"] for n in b.read_graph()["nodes"]]
    assert ops.count("EncoderAttention") == 2 and "Softmax" not in ops and "Transpose" not in ops
    for engine in ("numpy", "ort"):
        with Session(d / "m.ndc", Policy(bits="float"), engine=engine) as s:
            (h,) = s.run(None, feeds)
            st = s.last_stats
        np.testing.assert_allclose(h, ref, rtol=1e-4, atol=1e-4)
        ea = st["encoder_attention"]
        assert ea["calls"] == 2 and ea["key_blocks_read_share"] == 1.0
        assert ea["numpy_calls"] == (2 if engine == "numpy" else 0)  # dense: ONNX Runtime takes the attention


def test_blocks_policy_dense_at_full_share_and_sparse_in_numpy(tiny):
    from nadoo.runtime import Policy, Session

    d, feeds, _ = tiny
    with Session(d / "m.ndc", Policy(bits="float")) as s:
        (dense,) = s.run(None, feeds)
    with Session(d / "m.ndc", Policy(bits="float", encoder_attention=dict(kind="blocks", share=1.0, block=8))) as s:
        (full,) = s.run(None, feeds)
    np.testing.assert_allclose(full, dense, rtol=1e-5, atol=1e-5)
    pol = Policy(bits="float", encoder_attention=dict(kind="blocks", share=0.4, block=8))
    with Session(d / "m.ndc", pol, engine="auto") as s:
        (half,) = s.run(None, feeds)
        ea = s.last_stats["encoder_attention"]
    assert ea["numpy_calls"] == 2 and ea["key_blocks_read_share"] == pytest.approx(2 / 5) and ea["attention_s"] > 0
    cos = (half * dense).sum(-1) / (np.linalg.norm(half, axis=-1) * np.linalg.norm(dense, axis=-1))
    assert 0.5 < cos.mean() < 1.0  # an approximation, not the dense result and not noise


def _source_graph(tiny):
    import onnx

    from nadoo.compiler.onnx_to_graph import onnx_to_graph

    d, feeds, _ = tiny
    g, c = onnx_to_graph(onnx.load(str(d / "m.onnx")))
    return g, c, {k: v[:2, :16] for k, v in feeds.items()}


def test_matcher_leaves_differing_subgraphs_alone(tiny):
    from nadoo.compiler.encoder_attention import fuse_encoder_attention

    g, c, sample = _source_graph(tiny)
    assert fuse_encoder_attention(g, c, sample)[2] == 2
    sm = [n for n in g["nodes"] if n["op"] == "Softmax"]
    # a softmax over another axis is not attention's
    g1 = dict(g, nodes=[dict(n, attrs={"axis": 2}) if n is sm[0] else n for n in g["nodes"]])
    assert fuse_encoder_attention(g1, c, sample)[2] == 1
    # an intermediate value read outside the pattern (here: a graph output) keeps the subgraph
    g2 = dict(g, outputs=list(g["outputs"]) + [{"name": sm[1]["outputs"][0], "dtype": "float32", "shape": None}])
    assert fuse_encoder_attention(g2, c, sample)[2] == 1
    # a head merge that does not undo the split (numerically different) is refused
    tr = [n for n in g["nodes"] if n["op"] == "Transpose" and n.get("attrs", {}).get("perm") == [0, 2, 1, 3]]
    after = {id(n) for n in tr if any(p["op"] == "MatMul" and p["outputs"][0] == n["inputs"][0] for p in g["nodes"])}
    first = next(n for n in g["nodes"] if id(n) in after)
    g3 = dict(g, nodes=[dict(n, attrs={"perm": [0, 1, 2, 3]}) if n is first else n for n in g["nodes"]])
    assert fuse_encoder_attention(g3, c, sample)[2] == 1


def test_cli_blocks_stats_and_errors(tiny, tmp_path):
    from click.testing import CliRunner

    from nadoo.runtime.cli import main

    d, feeds, _ = tiny
    np.savez(tmp_path / "in.npz", **feeds)
    r = CliRunner().invoke(main, ["run", str(d / "m.ndc"), "--input", str(tmp_path / "in.npz"), "--bits", "float",
                                  "--attention", "blocks", "--attention-blocks", "0.4", "--block", "8", "--json"])
    assert r.exit_code == 0, r.output
    ea = json.loads(r.output)["encoder_attention"]
    assert ea["kind"] == "blocks" and ea["share"] == 0.4 and ea["block"] == 8 and ea["key_blocks_read_share"] < 1
    for args, msg in ((["--attention", "blocks"], "needs --attention-blocks"),
                      (["--attention-blocks", "0.5"], "needs --attention blocks"),
                      (["--attention", "blocks", "--attention-blocks", "2"], "(0, 1]")):
        r = CliRunner().invoke(main, ["run", str(d / "m.ndc"), *args])
        assert r.exit_code == 2 and msg in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_engines_and_plain_onnx_export_agree_with_a_fully_masked_row(tiny):
    ort = pytest.importorskip("onnxruntime")
    from nadoo.runtime import Policy, Session
    from nadoo.runtime.export_onnx import bundle_to_onnx
    from nadoo.runtime.reader import Bundle

    d, feeds, _ = tiny
    feeds = dict(feeds, attention_mask=feeds["attention_mask"].copy())
    feeds["attention_mask"][0] = 0  # every key of row 0 masked: the source graph gives that row's attention 0
    out = {}
    for engine in ("numpy", "ort"):
        with Session(d / "m.ndc", Policy(bits="float"), engine=engine) as s:
            (out[engine],) = s.run(None, feeds)
    with Bundle.open(d / "m.ndc") as b:
        model = bundle_to_onnx(b, "f32")
    assert "MultiHeadAttention" not in {n.op_type for n in model.graph.node}  # plain ONNX for any tool
    (out["export"],) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert np.isfinite(out["numpy"]).all()
    np.testing.assert_allclose(out["ort"], out["numpy"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["export"], out["numpy"], rtol=1e-4, atol=1e-4)
