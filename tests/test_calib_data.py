"""compiler/calib_data.py: --input-shape parsing, calibration loading/validation, synthetic data."""
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nadoo.compiler.calib_data import (  # noqa: E402
    InputSpec,
    load_calibration,
    parse_input_shapes,
    synthetic_calibration,
)
from nadoo.runtime.errors import CompileError  # noqa: E402

SPECS = [
    InputSpec("input_ids", "int64", ["batch", "seq"]),
    InputSpec("attention_mask", "int64", ["batch", "seq"]),
]
IMG = [InputSpec("x", "float32", ["batch", 1, 8, 8])]


def _err(fn, match):
    with pytest.raises(CompileError, match=match) as ei:
        fn()
    assert "\n" not in str(ei.value)
    return str(ei.value)


# --- parse_input_shapes ---------------------------------------------------------------------

def test_parse_input_shapes():
    assert parse_input_shapes(["x=1,64"]) == {"x": [1, 64]}
    assert parse_input_shapes(["1,64"]) == {"": [1, 64]}
    assert parse_input_shapes(["input_ids=2,16", "attention_mask = 2,16"]) == {
        "input_ids": [2, 16], "attention_mask": [2, 16]}
    assert parse_input_shapes(["x=[1, 3, 8, 8]"]) == {"x": [1, 3, 8, 8]}
    assert parse_input_shapes([]) == {}
    assert parse_input_shapes(None) == {}


@pytest.mark.parametrize("bad", [["x="], ["x=1,,2"], ["x=a,b"], ["=1,2"], ["x=1,-2"], ["x=0"], [""],
                                 ["x=1", "x=2"], ["1,2", "y=3"], ["1,2", "3,4"], ["x y=1"]])
def test_parse_input_shapes_bad(bad):
    _err(lambda: parse_input_shapes(bad), "input-shape")


# --- load_calibration -----------------------------------------------------------------------

def _tok(n=6, L=9):
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(0, 50, (n, L)), "attention_mask": np.ones((n, L), np.int64)}


def test_npz_round_trip(tmp_path):
    d = _tok()
    p = tmp_path / "c.npz"
    np.savez(p, **d)
    out = load_calibration(str(p), SPECS)
    assert set(out) == {"input_ids", "attention_mask"}
    for k in d:
        assert out[k].dtype == np.int64
        np.testing.assert_array_equal(out[k], d[k])
    # without specs: raw arrays
    raw = load_calibration(str(p), None)
    assert set(raw) == set(d)


def test_folder_of_npy_round_trip(tmp_path):
    x = np.random.default_rng(1).standard_normal((5, 1, 8, 8))  # float64 → cast to float32
    np.save(tmp_path / "x.npy", x)
    out = load_calibration(str(tmp_path), IMG)
    assert out["x"].dtype == np.float32 and out["x"].shape == (5, 1, 8, 8)
    np.testing.assert_allclose(out["x"], x.astype(np.float32))


def test_int32_to_int64_and_single_npy(tmp_path):
    d = {k: v.astype(np.int32) for k, v in _tok().items()}
    np.savez(tmp_path / "c.npz", **d)
    out = load_calibration(str(tmp_path / "c.npz"), SPECS)
    assert all(v.dtype == np.int64 for v in out.values())
    np.save(tmp_path / "single.npy", np.zeros((3, 1, 8, 8), np.float32))
    out = load_calibration(str(tmp_path / "single.npy"), IMG)
    assert out["x"].shape == (3, 1, 8, 8)


def test_validation_errors(tmp_path):
    p = tmp_path / "c.npz"
    d = _tok()
    np.savez(p, input_ids=d["input_ids"])
    msg = _err(lambda: load_calibration(str(p), SPECS), "missing attention_mask")
    assert "input_ids, attention_mask" in msg  # lists expected names
    np.savez(p, **d, extra=np.zeros((6, 9)))
    _err(lambda: load_calibration(str(p), SPECS), "unknown extra")
    np.savez(p, input_ids=d["input_ids"], attention_mask=d["attention_mask"][:4])
    _err(lambda: load_calibration(str(p), SPECS), "different numbers of samples")
    np.savez(p, input_ids=d["input_ids"][:, :, None], attention_mask=d["attention_mask"])
    _err(lambda: load_calibration(str(p), SPECS), "rank")
    np.savez(p, x=np.zeros((4, 1, 8, 7), np.float32))
    _err(lambda: load_calibration(str(p), IMG), "axis 3 must be 8")
    np.savez(p, input_ids=d["input_ids"].astype(np.float32), attention_mask=d["attention_mask"])
    _err(lambda: load_calibration(str(p), SPECS), "float")
    np.savez(p, x=np.zeros((4, 1, 8, 8), np.complex64))
    _err(lambda: load_calibration(str(p), IMG), "dtype")


def test_file_errors(tmp_path):
    _err(lambda: load_calibration(str(tmp_path / "nope.npz"), IMG), "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    _err(lambda: load_calibration(str(empty), IMG), "no .npy")
    e = tmp_path / "e.npz"
    e.write_bytes(b"")
    _err(lambda: load_calibration(str(e), IMG), "empty")
    g = tmp_path / "g.npz"
    g.write_bytes(b"garbage" * 20)
    _err(lambda: load_calibration(str(g), IMG), "not a valid")
    obj = tmp_path / "o.npz"
    np.savez(obj, x=np.array([{"a": 1}, None], dtype=object))
    _err(lambda: load_calibration(str(obj), IMG), "pickled")
    s = tmp_path / "s.npz"
    np.savez(s, x=np.float32(3))
    _err(lambda: load_calibration(str(s), IMG), "scalar")
    np.save(tmp_path / "one.npy", np.zeros((2, 3)))
    _err(lambda: load_calibration(str(tmp_path / "one.npy"), SPECS), "single .npy")


# --- synthetic ------------------------------------------------------------------------------

def test_synthetic_shapes_and_dtypes():
    specs = SPECS + [InputSpec("token_type_ids", "int64", ["batch", "seq"]),
                     InputSpec("x", "float32", [None, 3, "w"])]
    with pytest.warns(UserWarning, match="synthetic"):
        d = synthetic_calibration(specs, n=7, seed=3, seq_len=5)
    assert d["input_ids"].shape == (7, 5) and d["input_ids"].dtype == np.int64
    assert d["input_ids"].min() >= 0 and d["input_ids"].max() < 100
    assert (d["attention_mask"] == 1).all()
    assert (d["token_type_ids"] == 0).all()
    assert d["x"].shape == (7, 3, 5) and d["x"].dtype == np.float32
    assert abs(float(d["x"].std()) - 1.0) < 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d2 = synthetic_calibration(specs, n=7, seed=3, seq_len=5)
        static = synthetic_calibration([InputSpec("x", "float32", [1, 4])], n=3)
    np.testing.assert_array_equal(d["x"], d2["x"])  # deterministic per seed
    assert static["x"].shape == (3, 4)  # axis 0 is always the sample axis
    # synthetic data passes validation against the same specs
    assert set(d) == {s.name for s in specs}


# --- the runtime's loader, NaN/Inf ----------------------------------------------------------------

def test_corrupt_files_are_one_compile_error_from_the_shared_loader(tmp_path):
    import os
    import zipfile

    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "c.npz", x=x)
        data = (tmp_path / "c.npz").read_bytes()
        info = zipfile.ZipFile(tmp_path / "c.npz").infolist()[0]
        mid = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2
        for bad in (data[: len(data) // 2], data[:mid] + bytes([data[mid] ^ 0x40]) + data[mid + 1:]):
            (tmp_path / "bad.npz").write_bytes(bad)
            _err(lambda: load_calibration(str(tmp_path / "bad.npz"), IMG), "cannot read calibration file")
    os.mkfifo(tmp_path / "pipe.npz")
    _err(lambda: load_calibration(str(tmp_path / "pipe.npz"), IMG), "FIFO")  # refused, not waited on


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 1e300])  # 1e300: float64 → float32 inf
def test_non_finite_calibration_data_is_refused_naming_the_array(tmp_path, value):
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8))
    x[2, 0, 3, 3] = value
    np.savez(tmp_path / "c.npz", x=x)
    msg = _err(lambda: load_calibration(str(tmp_path / "c.npz"), IMG), "'x'")
    assert ("1 NaN" if np.isnan(value) else "1 infinite") in msg
    np.save(tmp_path / "x.npy", x)  # a folder of .npy: the same rule
    (tmp_path / "c.npz").unlink()
    _err(lambda: load_calibration(str(tmp_path), IMG), "finite")
