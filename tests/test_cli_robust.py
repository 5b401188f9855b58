"""Hostile or careless use of the CLI: special files, corrupt inputs, absurd sizes, signals, umask,
self-overwrites, usage errors. Each ends in one `nadoo: error:` line and exit 2 (or a clean write)."""

import os
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from nadoo.runtime.errors import InputError
from nadoo.runtime.files import atomic_write, load_arrays

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "format_spec" / "golden" / "tiny.ndc"  # x [batch, 8] → y [batch, 4]
TMP_TAG = ".nadoo-tmp-"


def nadoo(*args, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "nadoo.runtime.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, **kw)


def one_line_error(r, code=2) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code and len(lines) == 1 and lines[0].startswith("nadoo: error:"), (r.returncode, r.stderr)
    return lines[0]


def onnx_model(path, k=64, r=128):
    """y = x @ W + b as an ONNX file (compiles in about a second)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", r])],
        [numpy_helper.from_array(rng.standard_normal((k, r)).astype(np.float32), "W"),
         numpy_helper.from_array(np.zeros(r, np.float32), "b")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)
    np.savez(Path(path).with_suffix(".calib.npz"), x=rng.standard_normal((16, k)).astype(np.float32))
    return Path(path), Path(path).with_suffix(".calib.npz")


def temps(d: Path) -> list:
    return [p.name for p in d.iterdir() if TMP_TAG in p.name]


# --- special files --------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", ["info", "export", "run --input", "compile", "compile --calib"])
def test_a_fifo_is_refused_not_waited_on(tmp_path, cmd):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    model, calib = onnx_model(tmp_path / "m.onnx") if cmd.startswith("compile") else (None, None)
    args = {"info": ["info", fifo], "export": ["export", fifo, "-o", tmp_path / "o.onnx"],
            "run --input": ["run", TINY, "--input", fifo],
            "compile": ["compile", fifo, "-o", tmp_path / "o.ndc"],
            "compile --calib": ["compile", model, "--calib", fifo, "-o", tmp_path / "o.ndc"]}[cmd]
    line = one_line_error(nadoo(*args, timeout=60))  # a hang would time out
    assert "FIFO" in line and "regular file" in line


# --- corrupt input files ----------------------------------------------------------------------------

def _npz(tmp_path, compressed: bool) -> bytes:
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    p = tmp_path / "x.npz"
    (np.savez_compressed if compressed else np.savez)(p, x=x)
    return p.read_bytes()


@pytest.mark.parametrize("compressed", [False, True])
def test_run_input_truncated_or_flipped_is_one_line(tmp_path, compressed):
    data = _npz(tmp_path, compressed)
    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(tmp_path / "x.npz") as z:
        info = z.infolist()[0]
    # the middle of the member's (compressed) data: Bad CRC-32 when stored, zlib.error or Bad CRC when deflated
    mid = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2
    for corrupt in (data[: len(data) // 2], data[:mid] + bytes([data[mid] ^ 0x10]) + data[mid + 1:]):
        bad.write_bytes(corrupt)
        line = one_line_error(nadoo("run", TINY, "--input", bad))
        assert "bad.npz" in line and "Traceback" not in line


@pytest.mark.parametrize("compressed", [False, True])
def test_every_truncation_and_byte_flip_is_refused_or_harmless(tmp_path, compressed):
    data = _npz(tmp_path, compressed)
    good = load_arrays(tmp_path / "x.npz")
    p = tmp_path / "c.npz"
    cases = [data[:n] for n in range(0, len(data), 7)]
    cases += [data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:] for i in range(0, len(data), 3)]
    for case in cases:
        p.write_bytes(case)
        try:
            got = load_arrays(p)
        except InputError as e:
            assert "\n" not in str(e)
            continue
        # a flip the format cannot see (zip comment, timestamps, header padding) must not change the numbers
        if isinstance(got, dict) and got.keys() == good.keys() and all(got[k].dtype == good[k].dtype for k in got):
            assert all(np.array_equal(got[k], good[k]) for k in got)


def test_a_header_promising_more_than_the_file_holds_allocates_nothing(tmp_path):
    p = tmp_path / "huge.npy"
    with open(p, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
        f.write(b"\0" * 64)
    with pytest.raises(InputError, match="truncated"):
        load_arrays(p)
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
        z.writestr("x.npy", p.read_bytes())
    with pytest.raises(InputError, match="truncated"):
        load_arrays(tmp_path / "huge.npz")


def test_nan_inputs_are_legal_numerics_for_run_and_warnings_stay_quiet(tmp_path):
    x = np.full((2, 8), np.inf, np.float32)
    x[0, 0], x[1] = -np.inf, np.nan  # inf - inf and nan: NumPy would print RuntimeWarnings
    np.save(tmp_path / "x.npy", x)
    r = nadoo("run", TINY, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npz")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert np.isnan(np.load(tmp_path / "y.npz")["y"]).any()  # the numbers themselves are not hidden


# --- sizes and ranges -------------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["1e400", "inf", "nan", "-1MB", "12parsecs", "99999999999999GB", "1e308GiB"])
def test_absurd_memory_budget_is_one_line(size):
    one_line_error(nadoo("run", TINY, "--memory-budget", size))


@pytest.mark.parametrize("bpw", ["0", "nan", "inf", "1.5", "40", "-3"])
def test_bits_per_weight_out_of_range_is_one_line(tmp_path, bpw):
    line = one_line_error(nadoo("compile", tmp_path / "m.onnx", "-o", tmp_path / "o.ndc", "--bits-per-weight", bpw))
    assert "--bits-per-weight" in line


def test_bits_per_weight_in_range_is_accepted(tmp_path):
    model, calib = onnx_model(tmp_path / "m.onnx")
    r = nadoo("compile", model, "--calib", calib, "-o", tmp_path / "o.ndc", "--bits-per-weight", "4.5", "-q")
    assert r.returncode == 0, r.stderr
    assert nadoo("run", tmp_path / "o.ndc", "--bits", "alloc").returncode == 0


# --- writes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    model, calib = onnx_model(tmp_path / "m.onnx")
    set_umask = lambda: os.umask(umask)  # noqa: E731
    r = nadoo("compile", model, "--calib", calib, "-o", tmp_path / "m.ndc", "-q", preexec_fn=set_umask)
    assert r.returncode == 0, r.stderr
    assert nadoo("run", tmp_path / "m.ndc", "--output", tmp_path / "y.npz", preexec_fn=set_umask).returncode == 0
    assert nadoo("export", tmp_path / "m.ndc", "-o", tmp_path / "e.onnx", preexec_fn=set_umask).returncode == 0
    for name in ("m.ndc", "y.npz", "e.onnx"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name
    assert temps(tmp_path) == []


def test_sigterm_during_compile_leaves_no_temporary_file(tmp_path):
    model, calib = onnx_model(tmp_path / "big.onnx", k=1024, r=2048)  # quantizing takes seconds
    p = subprocess.Popen([sys.executable, "-m", "nadoo.runtime.cli", "compile", model, "--calib", calib,
                          "-o", tmp_path / "big.ndc", "--keep-float", "--chunks", "64", "-q"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not temps(tmp_path) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert temps(tmp_path), "the compile finished (or failed) before its bundle was being written"
        time.sleep(0.2)  # well inside writing payloads
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGTERM, p.stderr.read()
    assert temps(tmp_path) == [] and not (tmp_path / "big.ndc").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_write_removes_the_temporary_file(tmp_path, sig):
    # the child restores Python's SIGINT handler: a shell starts background jobs with SIGINT ignored,
    # and a test suite run that way would otherwise hand the child an ignored SIGINT
    code = ("import signal, sys, time\nfrom nadoo.runtime.files import atomic_write\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            f"with atomic_write({str(tmp_path / 'out.bin')!r}) as a:\n"
            "    a.file.write(b'x' * 1000); a.file.flush(); print('writing', flush=True)\n"
            "    while True: time.sleep(0.01)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
        assert len(temps(tmp_path)) == 1
        p.send_signal(sig)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0 and temps(tmp_path) == [] and not (tmp_path / "out.bin").exists()


def test_stale_temporary_files_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".y.npz{TMP_TAG}{dead.pid}"
    alive = tmp_path / f".y.npz{TMP_TAG}{os.getpid()}"  # a live writer's: left alone
    other = tmp_path / f".z.npz{TMP_TAG}{dead.pid}"  # another target's: not this write's business
    for p in (stale, alive, other):
        p.write_bytes(b"half written")
    assert nadoo("run", TINY, "--output", tmp_path / "y.npz").returncode == 0
    assert not stale.exists() and alive.exists() and other.exists()


def test_output_onto_a_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "y.npz")
    one_line_error(nadoo("run", TINY, "--output", tmp_path / "y.npz", timeout=60))
    assert stat.S_ISFIFO(os.stat(tmp_path / "y.npz").st_mode)


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    (tmp_path / "t").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "t") as a:
            a.file.write(b"new, half")
            raise RuntimeError("crash")
    assert (tmp_path / "t").read_bytes() == b"old" and temps(tmp_path) == []


# --- overwriting one's own input --------------------------------------------------------------------

def test_run_and_export_refuse_to_overwrite_their_input(tmp_path):
    b = tmp_path / "b.ndc"
    b.write_bytes(TINY.read_bytes())
    os.link(b, tmp_path / "hard.ndc")
    (tmp_path / "sym.ndc").symlink_to(b)
    np.save(tmp_path / "x.npy", np.ones((1, 8), np.float32))
    for args in (["run", b, "--output", b], ["run", b, "--output", tmp_path / "hard.ndc"],
                 ["run", tmp_path / "sym.ndc", "--output", b],
                 ["run", b, "--input", tmp_path / "x.npy", "--output", tmp_path / "x.npy"],
                 ["export", b, "-o", tmp_path / "sym.ndc"], ["info", b, "--plot", b]):
        assert "refusing to overwrite" in one_line_error(nadoo(*args))
    assert b.read_bytes() == TINY.read_bytes() and (tmp_path / "x.npy").stat().st_size > 0


def test_compile_refuses_to_overwrite_its_model_or_calibration(tmp_path):
    model, calib = onnx_model(tmp_path / "m.onnx")
    before = model.read_bytes(), calib.read_bytes()
    assert "refusing to overwrite" in one_line_error(nadoo("compile", model, "-o", model))
    assert "refusing to overwrite" in one_line_error(nadoo("compile", model, "--calib", calib, "-o", calib))
    assert (model.read_bytes(), calib.read_bytes()) == before


# --- usage errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["run"], ["run", TINY, "--bits", "7"], ["run", TINY, "--nope"], ["frobnicate"],
                                  ["run", TINY, "--repeat", "many"], ["compile", "m.onnx"]])
def test_usage_errors_are_one_line_exit_2(args):
    line = one_line_error(nadoo(*args))
    assert "--help" in line


def test_help_and_version_still_work():
    r = nadoo("run", "--help")
    assert r.returncode == 0 and "--memory-budget" in r.stdout and r.stderr == ""
    assert nadoo("--version").returncode == 0
    assert nadoo("info", TINY).returncode == 0
