"""The tier widths beyond 8/4/2: q3 (NDC 1.3, compiled by default) and q6/q5 (NDC 1.4, stored when
`compile --tiers` asks), all in the zp codec; selected by --bits and --bits-for, each error between its
neighbours', handed to ONNX Runtime as 8-bit codes under --ort-int8 (MatMulNBits takes 2, 4 or 8 bits)
and dequantized otherwise; refused by the legacy scale+min codec. Weights that were quantized before
(a GGUF file's Q8_0 and Q5_0 blocks, dequantized by the loader) are taken exactly by a tier with at least
the source's bits, and `--bits source` runs each tensor at the precision its file stored it at."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

torch = pytest.importorskip("torch")

from examples.models import digits_data, train_digits_mlp  # noqa: E402
from nadoo.compiler.pipeline import CompileOptions, compile_model  # noqa: E402
from nadoo.compiler.quant_grid import source_grids  # noqa: E402
from nadoo.compiler.quantize import quantize_payload  # noqa: E402
from nadoo.runtime import Policy, Session  # noqa: E402
from nadoo.runtime.errors import CompileError  # noqa: E402
from nadoo.runtime.reader import Bundle  # noqa: E402
from nadoo.runtime.tiers import ZERO_POINT  # noqa: E402


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """One trained digits MLP compiled twice: with the default tiers (mlp.ndc) and with 8, 6, 5, 4 (wide.ndc)."""
    d = tmp_path_factory.mktemp("tier_mlp")
    Xtr, _, Xte, yte = digits_data()
    net = train_digits_mlp(act_l1=0.0)
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 64)), d / "mlp.pt")
    np.savez(d / "calib.npz", input=Xtr[:128])
    for name, tiers in (("mlp.ndc", None), ("wide.ndc", ("q8", "q6", "q5", "q4"))):
        opts = CompileOptions(calib=str(d / "calib.npz"), keep_float=True, chunks=4, **({"tiers": tiers} if tiers else {}))
        compile_model(str(d / "mlp.pt"), str(d / name), opts, quiet=True)
    return d, net, Xte[:200], yte[:200]


def _weight(net):
    return next(p for p in net.parameters() if p.ndim == 2).detach().numpy()


def _tiers_used(st) -> set:
    return {t for layer in st["layers"].values() for t in layer["tiers"]}


def test_each_width_errs_between_its_neighbours(mlp):
    w = _weight(mlp[1])
    errs = {b: quantize_payload(w, b, 16, codec="zp")[1]["mse"] for b in (8, 6, 5, 4, 3, 2)}
    assert errs[8] < errs[6] < errs[5] < errs[4] < errs[3] < errs[2]
    for bits in (6, 5, 3):
        p, e = quantize_payload(w, bits, 16, codec="zp")
        wh = ZERO_POINT[f"q{bits}"].decode(f"q{bits}", [p], *w.shape, 16)
        assert e["mse"] == pytest.approx(float(np.mean((w - wh) ** 2)), rel=1e-6)  # errors are of the decode
        with pytest.raises(CompileError, match=f"no {bits}-bit tier"):
            quantize_payload(w, bits, 16, codec="minmax")


@pytest.mark.parametrize("name,minor,stored,widths,override", [
    ("mlp.ndc", 3, {"f32", "q8", "q4", "q3", "q2"}, ("4", "3", "2"), ("float", "3")),  # the default tiers
    ("wide.ndc", 4, {"f32", "q8", "q6", "q5", "q4"}, ("8", "6", "5", "4"), ("4", "5")),  # --tiers 8,6,5,4
])
def test_bundle_stores_its_tiers_and_runs_each(mlp, name, minor, stored, widths, override):
    d, net, X, y = mlp
    with Bundle.open(d / name) as b:
        assert b.preamble.minor == minor
        assert all(set(e.tiers) == stored for e in b.tensors.values())
    with torch.no_grad():
        ref = net(torch.from_numpy(X)).numpy()
    err = []
    for bits in widths:
        with Session(d / name, Policy(bits=bits)) as s:
            out, st = s.run_with_stats(None, {"input": X})
        assert _tiers_used(st) == {f"q{bits}"}
        err.append(float(np.abs(out[0] - ref).max() / np.abs(ref).max()))
        assert np.mean(out[0].argmax(1) == y) > 0.9
    assert err == sorted(err)  # fewer bits, more error
    base, chosen = override  # --bits-for selects a width per tensor over --bits
    with Session(d / name, Policy(bits=base, bits_for=[f"*={chosen}"])) as s:
        _, st = s.run_with_stats(None, {"input": X})
    assert _tiers_used(st) == {f"q{chosen}"}


@pytest.mark.parametrize("name,bits", [("wide.ndc", "5"), ("wide.ndc", "6"), ("mlp.ndc", "3")])
def test_ort_engine_takes_widths_it_lacks_as_8_bit_codes(mlp, name, bits):
    pytest.importorskip("onnxruntime")
    d, _, X, _ = mlp
    got = {}
    for engine, int8 in (("numpy", False), ("ort", False), ("ort", True)):
        with Session(d / name, Policy(bits=bits), engine=engine, ort_int8=int8) as s:
            got[engine, int8] = (s.run(None, {"input": X})[0], s.resident_weight_bytes)
    ref = got["numpy", False][0]
    np.testing.assert_allclose(got["ort", False][0], ref, rtol=1e-4, atol=1e-4)  # exact: float weights
    assert np.abs(got["ort", True][0] - ref).max() < 0.05 * np.abs(ref).max()  # int8 activations
    assert got["ort", True][1] < got["ort", False][1]


@pytest.mark.parametrize("name,bits", [("wide.ndc", "6"), ("mlp.ndc", "3")])
def test_cli_bits(mlp, tmp_path, name, bits):
    d, _, X, _ = mlp
    np.save(tmp_path / "x.npy", X[:3])
    r = subprocess.run([sys.executable, "-m", "nadoo.runtime.cli", "run", str(d / name), "--input",
                        str(tmp_path / "x.npy"), "--bits", bits, "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"q{bits}" in json.dumps(json.loads(r.stdout))


def test_cli_bad_tiers(mlp, tmp_path):
    d = mlp[0]
    r = subprocess.run([sys.executable, "-m", "nadoo.runtime.cli", "compile", str(d / "mlp.pt"), "-o",
                        str(tmp_path / "x.ndc"), "--calib", str(d / "calib.npz"), "--tiers", "8,7"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--tiers" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.ndc").exists()


def _gguf_like(w: np.ndarray, kind: str) -> np.ndarray:
    """What llama.cpp's Q5_0 / Q8_0 blocks of 32 decode to (its quantize_row_q5_0 / q8_0 rules)."""
    R, K = w.shape
    b = w.reshape(R, -1, 32)
    if kind == "q5_0":  # d = the signed extreme / -16, codes floor(x/d + 16.5) in 0..31, value (q - 16)·d
        ext = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)
        d = (ext / -16).astype(np.float16).astype(np.float32)
        return ((np.clip(np.floor(b / d + 16.5), 0, 31) - 16) * d).reshape(R, K)
    d = (np.abs(b).max(-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)  # q8_0
    return (np.rint(b / d) * d).reshape(R, K)


@pytest.mark.parametrize("kind,exact_from", [("q5_0", 5), ("q8_0", 8)])
def test_a_source_grid_is_taken_exactly_at_enough_bits(kind, exact_from):
    rng = np.random.default_rng(3)
    w = _gguf_like(rng.standard_normal((48, 256)).astype(np.float32), kind)
    for bits, tier in ((8, "q8"), (6, "q6"), (5, "q5"), (4, "q4")):
        p, e = quantize_payload(w, bits, 32, codec="zp")
        wh = ZERO_POINT[tier].decode(tier, [p], *w.shape, 32)
        if bits >= exact_from:
            np.testing.assert_array_equal(wh, w)
        else:  # fewer bits than the source: an ordinary quantization error
            assert e["mse"] > 1e-4
    # group 64 spans two source blocks with different scales: no single grid, an ordinary search
    assert e["mse"] > 0 and quantize_payload(w, exact_from, 64, codec="zp")[1]["mse"] > 0


def test_float_weights_lie_on_no_grid():
    w = np.random.default_rng(4).standard_normal((64, 8, 32)).astype(np.float32)
    assert source_grids(w, 255) == [] and source_grids(w, 31) == []
    assert source_grids(np.zeros((4, 2, 32), np.float32), 255) == []


def test_a_q5_0_gguf_at_5_bits_computes_what_its_float_does(tmp_path):
    """A language model stored as Q5_0 (every matrix, the embedding too) and compiled with the q5 tier at the
    file's group size: the 5-bit bundle is the file's model, logits equal to the float tier's; 4 bits is not."""
    pytest.importorskip("gguf")
    from lm_fixtures import tiny_model, write_gguf
    from nadoo.compiler.lm_compile import compile_lm
    from nadoo.runtime.generate import LanguageModel

    model = tiny_model("gemma3", vocab=128)
    path = write_gguf(tmp_path / "tiny-q5.gguf", model, quant="Q5_0")
    bundle = tmp_path / "q5.ndc"
    compile_lm(path, bundle, CompileOptions(keep_float=True, group_size=32, tiers=("q8", "q5", "q4")), quiet=True)
    prompt = np.random.default_rng(2).integers(4, 128, 12).tolist()
    logits = {}
    for bits in ("float", "8", "5", "4"):
        with Session(bundle, Policy(bits=bits)) as s:
            logits[bits] = LanguageModel(s).forward(prompt, 0, keep=0)[0]
    scale = np.abs(logits["float"]).max()
    for bits in ("8", "5"):  # Q5_0 blocks lie on a grid of 32 levels: both tiers take them exactly
        assert np.abs(logits[bits] - logits["float"]).max() <= 1e-5 * scale
    assert np.abs(logits["4"] - logits["float"]).max() > 1e-3 * scale


def test_language_model_allocation_spends_bits_where_the_source_needs_them(tmp_path):
    """--bits-per-weight on a language model: a GGUF whose attention is Q8_0 and MLP Q5_0 gets the tiers
    that take each exactly once the budget allows them, and runs with --bits alloc."""
    pytest.importorskip("gguf")
    from lm_fixtures import tiny_model, write_gguf
    from nadoo.compiler.lm_compile import compile_lm
    from nadoo.runtime.generate import LanguageModel

    model = tiny_model("gemma3", vocab=128)
    path = write_gguf(tmp_path / "tiny-q5.gguf", model, quant="Q5_0")
    bundle = tmp_path / "alloc.ndc"
    compile_lm(path, bundle, CompileOptions(keep_float=True, group_size=32, tiers=("q8", "q5", "q4"),
                                            bits_per_weight=6.0), quiet=True)
    with Bundle.open(bundle) as b:
        alloc, names = b.index["alloc"]["tiers"], set(b.tensors)
    assert set(alloc) == names  # every chunked tensor, the embedding and the MLPs included
    assert all(set(t) == {"q5"} for t in alloc.values())  # exact at 5 bits: no byte spent on 8
    prompt = list(range(4, 14))
    with Session(bundle, Policy(bits="alloc")) as s:
        got = LanguageModel(s).forward(prompt, 0, keep=0)[0]
    with Session(bundle, Policy(bits="float")) as s:
        ref = LanguageModel(s).forward(prompt, 0, keep=0)[0]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_bits_source_runs_each_tensor_at_its_gguf_format(tmp_path, mlp):
    """A mixed file (embedding and attention Q8_0, MLP Q5_0): the bundle records each tensor's format and
    --bits source runs Q8_0 at 8 bits and Q5_0 at 5, computing the file's model; a bundle compiled from
    another source has no formats and says so."""
    pytest.importorskip("gguf")
    from lm_fixtures import tiny_model, write_gguf
    from nadoo.compiler.lm_compile import compile_lm
    from nadoo.runtime.errors import InputError
    from nadoo.runtime.generate import LanguageModel

    model = tiny_model("gemma3", vocab=128)
    path = write_gguf(tmp_path / "mixed.gguf", model, quant="Q8_0", quant_for={".mlp.": "Q5_0"})
    bundle = tmp_path / "mixed.ndc"
    compile_lm(path, bundle, CompileOptions(keep_float=True, group_size=32, tiers=("q8", "q5", "q4")), quiet=True)
    with Bundle.open(bundle) as b:
        formats = {n: e.meta.get("source_format") for n, e in b.tensors.items()}
    assert formats["embed"] == "Q8_0" and formats["layers.0.attn.q"] == "Q8_0"
    assert formats["layers.0.mlp.up"] == formats["layers.0.mlp.down"] == "Q5_0"
    prompt = list(range(4, 14))
    with Session(bundle, Policy(bits="source")) as s:
        got, st = LanguageModel(s).forward(prompt, 0, keep=0)
    tiers = {n: set(layer["tiers"]) for n, layer in st["layers"].items()}
    assert tiers["layers.0.attn.q"] == {"q8"} and tiers["layers.0.mlp.down"] == {"q5"}  # the MLP op reports as down
    with Session(bundle, Policy(bits="float")) as s:
        ref = LanguageModel(s).forward(prompt, 0, keep=0)[0]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    with pytest.raises(InputError, match="source format"):  # a bundle compiled from TorchScript has none
        with Session(mlp[0] / "mlp.ndc", Policy(bits="source")) as s:
            s.run(None, {"input": mlp[2][:2]})
