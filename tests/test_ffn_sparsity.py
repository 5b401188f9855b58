"""FFN activation sparsity in a language model's gated MLPs (nadoo.GatedFFN, runtime/ffn_sparsity.py):
the greedy per-layer allocation, sparsity 0 = the dense product, the measured share of skipped neurons
near the target on calibration-like input, the per-token dense fallback, fewer bytes read under a
memory budget, and one-line errors for bad options or bundles without thresholds."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from lm_fixtures import tiny_model  # noqa: E402
from lm_reference import ReferenceDecoder  # noqa: E402

import nadoo.runtime as nd  # noqa: E402
from nadoo.compiler.lm_compile import compile_lm_source  # noqa: E402
from nadoo.compiler.lm_source import lm_source_from_model  # noqa: E402
from nadoo.compiler.pipeline import CompileOptions  # noqa: E402
from nadoo.runtime.errors import BundleError, InputError  # noqa: E402
from nadoo.runtime.ffn_sparsity import allocate, calibration_curve, curves_of  # noqa: E402
from nadoo.runtime.generate import LanguageModel  # noqa: E402

VOCAB = 128


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """family -> (LMSource, bundle): GeGLU (gemma3) and SwiGLU (llama), 512 MLP neurons = 16 groups of down."""
    out = {}
    for fam in ("gemma3", "llama"):
        src = lm_source_from_model(tiny_model(fam, vocab=VOCAB, intermediate_size=512))
        path = tmp_path_factory.mktemp(fam) / f"{fam}.ndc"
        compile_lm_source(src, path, CompileOptions(keep_float=True), quiet=True)
        out[fam] = (src, path)
    return out


def tokens(seed=1, n=48):
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()  # like the synthetic calibration


def logits_and_stats(path, s=0.0, **kw):
    # One engine for every sparsity: dense MLPs may run in ONNX Runtime otherwise, equal only to float tolerance.
    with nd.Session(path, policy=nd.Policy(bits=kw.pop("bits", "float"), ffn_sparsity=s, **kw), engine="numpy") as sess:
        return LanguageModel(sess).forward(tokens(), 0, keep=0)


# ------------------------------------------------------------------ allocation
def curve(errors, neurons=100):
    grid = np.linspace(0, 0.9, len(errors))
    return {"grid": grid, "thresholds": grid * 2, "errors": np.asarray(errors, float), "neurons": neurons}


def test_allocation_hits_the_target_and_favours_tolerant_layers():
    curves = {"tolerant": curve([0, .001, .002, .004, .008, .02, .05, .1, .2, .4]),
              "fragile": curve([0, .05, .1, .2, .3, .4, .5, .6, .7, .8])}
    for target in (0.1, 0.25, 0.4, 0.55):
        alloc = allocate(curves, target)
        mean = np.mean([s for s, _ in alloc.values()])
        assert mean == pytest.approx(target, abs=1e-9)
        assert alloc["tolerant"][0] >= alloc["fragile"][0]
        for name, (s, t) in alloc.items():  # the threshold follows the curve (here t = 2 s)
            assert t == pytest.approx(2 * s)
    assert allocate(curves, 0.25)["fragile"] == (0.0, 0.0)  # the tolerant layer alone carries 25 %
    assert allocate(curves, 0.0) == {"tolerant": (0.0, 0.0), "fragile": (0.0, 0.0)}


def test_calibration_curve_measures_the_dropped_error():
    rng = np.random.default_rng(0)
    a, w = rng.standard_normal((64, 40)).astype(np.float32), rng.standard_normal((40, 8)).astype(np.float32)
    c = calibration_curve(a, w, grid=[0, 0.5])
    t = c["thresholds"][1]
    assert np.mean(np.abs(a) <= t) == pytest.approx(0.5, abs=0.01)
    d = np.where(np.abs(a) <= np.float32(t), a, 0) @ w
    assert c["errors"] == pytest.approx([0.0, (d ** 2).sum() / ((a @ w) ** 2).sum()], rel=1e-5)


def test_the_profile_stores_a_curve_per_mlp(bundles):
    _, path = bundles["gemma3"]
    with nd.Session(path) as sess:
        curves = curves_of(sess.bundle.read_profile())
        downs = [n for n, e in sess.bundle.tensors.items() if e.kind == "ffn_down"]
    assert sorted(curves) == sorted(downs) and len(downs) == 4
    for c in curves.values():
        assert np.all(np.diff(c["thresholds"]) >= 0) and c["errors"][0] == 0 and c["errors"][-1] > 0
    bad = {"layers": {"x": {"ffn_sparsity": {"grid": [0.0, 0.5], "thresholds": [0.0], "errors": [0, 1], "neurons": 4}}}}
    with pytest.raises(BundleError, match="malformed"):
        curves_of(bad)


# ------------------------------------------------------------------ the op
@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_sparsity_zero_is_the_dense_model(bundles, family):
    src, path = bundles[family]
    logits, st = logits_and_stats(path, 0.0)
    ref = ReferenceDecoder(src).forward(tokens())
    assert np.abs(logits - ref).max() <= 1e-4 * np.abs(ref).max()
    assert st["ffn_sparsity"] == 0.0 and st["macs"] == st["dense_macs"]


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_measured_sparsity_is_near_the_target(bundles, family):
    _, path = bundles[family]
    dense, _ = logits_and_stats(path, 0.0)
    errs = []
    for s in (0.25, 0.5):
        logits, st = logits_and_stats(path, s)
        assert st["ffn_sparsity"] == pytest.approx(s, abs=0.06), st["ffn_counts"]
        errs.append(np.abs(logits - dense).max() / np.abs(dense).max())
    assert 0 < errs[0] < errs[1]  # dropping more neurons costs more


def test_spread_tokens_fall_back_to_dense(bundles):
    _, path = bundles["gemma3"]
    dense, _ = logits_and_stats(path, 0.0)
    logits, st = logits_and_stats(path, 0.3, ffn_fallback=1.0)  # every token counts as spread
    np.testing.assert_array_equal(logits, dense)
    assert st["ffn_dense_fallback_rate"] == 1.0 and st["ffn_sparsity"] == 0.0
    _, st = logits_and_stats(path, 0.3, ffn_fallback=0.0)
    assert st["ffn_dense_fallback_rate"] == 0.0


def test_decode_reads_fewer_bytes_under_a_budget(bundles):
    """One token at a time under a budget far below the model: a skipped group of down is not read."""
    _, path = bundles["llama"]
    per_token = {}
    for s in (0.0, 0.8):
        with nd.Session(path, policy=nd.Policy(bits="8", ffn_sparsity=s), memory_budget="64KB") as sess:
            r = sess.generate(prompt_ids=tokens(n=8), max_new_tokens=8)
            per_token[s] = r.stats["bytes_read_per_token"]
            assert r.stats["ffn_sparsity"] == pytest.approx(s, abs=0.1)
    assert per_token[0.8] < per_token[0.0]


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("bad", [{"ffn_sparsity": 0.95}, {"ffn_sparsity": -0.1}, {"ffn_sparsity": float("nan")},
                                 {"ffn_sparsity": "0.4"}, {"ffn_fallback": 1.5}])
def test_bad_policy_values_are_one_error(bad):
    with pytest.raises(InputError, match="--ffn-"):
        nd.Policy(**bad)


def test_cli_options_and_errors(bundles, tmp_path):
    _, path = bundles["gemma3"]

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "nadoo.runtime.cli", *map(str, args)], capture_output=True,
                              text=True, timeout=120)

    import json

    r = cli("generate", path, "--prompt-ids", "5,6,7", "--max-new-tokens", "3", "--bits", "8", "--ffn-sparsity",
            "0.4", "--json")
    assert r.returncode == 0, r.stderr
    assert 0.2 < json.loads(r.stdout)["ffn_sparsity"] < 0.6
    for args in (("generate", path, "--prompt-ids", "5", "--ffn-sparsity", "2"),
                 ("generate", path, "--prompt-ids", "5", "--ffn-sparsity", "abc"),
                 ("perplexity", path, "--text-file", path, "--ffn-fallback", "-1")):
        r = cli(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("nadoo: error:"), r.stderr


def compile_torch(model, tmp_path, name):
    from nadoo.compiler.pipeline import compile_model

    src, out = tmp_path / f"{name}.pt", tmp_path / f"{name}.ndc"
    torch.save(model, src)
    compile_model(str(src), str(out), CompileOptions(input_shapes={"input": [1, 32]}, allow_pickle=True,
                                                     keep_float=True), quiet=True)
    return out


@pytest.mark.filterwarnings("ignore:no calibration data")
def test_an_ungated_relu_mlp_takes_the_same_policy(tmp_path):
    """A fused ReLU FFN (nadoo.ChunkedFFN): below its share of exact zeros the skip is exact."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8)).eval()
    path = compile_torch(model, tmp_path, "relu")
    x = {"input": np.random.default_rng(5).standard_normal((1, 32)).astype(np.float32)}
    outs = {}
    for s in (0.0, 0.3, 0.8):
        with nd.Session(path, policy=nd.Policy(bits="float", ffn_sparsity=s)) as sess:
            (outs[s],), st = sess.run_with_stats(None, x)
        assert st["ffn_sparsity"] >= s - 0.1, st["ffn_counts"]
    np.testing.assert_allclose(outs[0.3], outs[0.0], rtol=1e-5, atol=1e-6)  # only exact zeros dropped
    assert not np.allclose(outs[0.8], outs[0.0], rtol=1e-3, atol=1e-4)


@pytest.mark.filterwarnings("ignore:no calibration data")
def test_a_bundle_without_thresholds_refuses_sparsity(tmp_path):
    """A bundle with no MLP (here: one linear layer) has no thresholds to use."""
    path = compile_torch(torch.nn.Sequential(torch.nn.Linear(32, 64)), tmp_path, "linear")
    with pytest.raises(InputError, match="--ffn-sparsity needs"):
        nd.Session(path, policy=nd.Policy(ffn_sparsity=0.3))
    nd.Session(path, policy=nd.Policy(ffn_sparsity=0.0)).close()
