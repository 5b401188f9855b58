"""The 3-bit tier (q3, NDC 1.3): stored in the zp codec like q8/q4/q2, compiled by default, selected by
--bits 3 and --bits-for, its error between the 4- and 2-bit tiers', handed to ONNX Runtime dequantized
(MatMulNBits takes 2, 4 or 8 bits), and refused by the legacy scale+min codec."""
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
from nadoo.compiler.quantize import quantize_payload  # noqa: E402
from nadoo.runtime import Policy, Session  # noqa: E402
from nadoo.runtime.errors import CompileError  # noqa: E402
from nadoo.runtime.reader import Bundle  # noqa: E402
from nadoo.runtime.tiers import ZERO_POINT  # noqa: E402


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    d = tmp_path_factory.mktemp("q3_mlp")
    Xtr, _, Xte, yte = digits_data()
    net = train_digits_mlp(act_l1=0.0)
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 64)), d / "mlp.pt")
    np.savez(d / "calib.npz", input=Xtr[:128])
    compile_model(str(d / "mlp.pt"), str(d / "mlp.ndc"), CompileOptions(calib=str(d / "calib.npz"), keep_float=True,
                                                                      chunks=4), quiet=True)
    return d / "mlp.ndc", net, Xte[:200], yte[:200]


def _weight(net):
    return next(p for p in net.parameters() if p.ndim == 2).detach().numpy()


def test_3bit_error_lies_between_4_and_2_bits(mlp):
    w = _weight(mlp[1])
    errs = {b: quantize_payload(w, b, 16, codec="zp")[1]["mse"] for b in (4, 3, 2)}
    assert errs[4] < errs[3] < errs[2]
    p, e = quantize_payload(w, 3, 16, codec="zp")
    wh = ZERO_POINT["q3"].decode("q3", [p], *w.shape, 16)
    assert e["mse"] == pytest.approx(float(np.mean((w - wh) ** 2)), rel=1e-6)  # errors are of the decode
    with pytest.raises(CompileError, match="no 3-bit tier"):
        quantize_payload(w, 3, 16, codec="minmax")


def test_bundle_stores_q3_and_runs_it(mlp):
    path, net, X, y = mlp
    with Bundle.open(path) as b:
        assert b.preamble.minor == 3
        assert all("q3" in e.tiers for e in b.tensors.values())
    with torch.no_grad():
        ref = net(torch.from_numpy(X)).numpy()
    err = {}
    for bits in ("4", "3", "2"):
        with Session(path, Policy(bits=bits)) as s:
            out, st = s.run_with_stats(None, {"input": X})
        assert {t for layer in st["layers"].values() for t in layer["tiers"]} == {f"q{bits}"}
        err[bits] = float(np.abs(out[0] - ref).max() / np.abs(ref).max())
        if bits == "3":
            assert np.mean(out[0].argmax(1) == y) > 0.9
    assert err["4"] < err["3"] < err["2"]
    with Session(path, Policy(bits="float", bits_for=["*=3"])) as s:  # --bits-for selects it per tensor
        _, st = s.run_with_stats(None, {"input": X})
    assert {t for layer in st["layers"].values() for t in layer["tiers"]} == {"q3"}


def test_ort_engine_takes_q3_dequantized(mlp):
    pytest.importorskip("onnxruntime")
    path, _, X, _ = mlp
    got = {}
    for engine, int8 in (("numpy", False), ("ort", False), ("ort", True)):
        with Session(path, Policy(bits="3"), engine=engine, ort_int8=int8) as s:
            got[engine, int8] = (s.run(None, {"input": X})[0], s.resident_weight_bytes)
    # no MatMulNBits at 3 bits: exact ORT takes float weights (same numbers); with int8 activations the codes
    # go in widened to 8 bits (same weights, int8-rounded activations), held at 8 bits' bytes, not float32's
    np.testing.assert_allclose(got["ort", False][0], got["numpy", False][0], rtol=1e-4, atol=1e-4)
    ref = got["numpy", False][0]
    assert np.abs(got["ort", True][0] - ref).max() < 0.05 * np.abs(ref).max()
    assert got["ort", True][1] < got["ort", False][1]


def test_cli_bits_3(mlp, tmp_path):
    path, _, X, _ = mlp
    np.save(tmp_path / "x.npy", X[:3])
    cmd = [sys.executable, "-m", "nadoo.runtime.cli", "run", str(path), "--input", str(tmp_path / "x.npy"),
           "--bits", "3", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "q3" in json.dumps(json.loads(r.stdout))
