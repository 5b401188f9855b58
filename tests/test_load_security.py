"""Model archives from untrusted sources never run code during `nadoo compile` unless
--allow-pickle is given: hostile .pt2 archives (pickled weights, opaque constants, pickled example
inputs that torch would load through its weights_only=False fallback, sympy strings, callable
targets, file-writing operators, generated-source injection, native AOTInductor parts) and hostile
TorchScript archives are refused with one CompileError line and CLI exit code 2, also when renamed
to .pt; ordinary archives still compile. With --allow-pickle the file is trusted and loaded by
torch.export.load, which does run such payloads (shown here, so the payloads are real)."""
import json
import os
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nadoo.compiler.load import load_model  # noqa: E402
from nadoo.runtime.errors import CompileError  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.register_buffer("shift", torch.ones(3))

    def forward(self, x):
        return torch.relu(self.fc(x)) + self.shift


class _OpenFile:
    """Unpickling this creates the marker file: the payload of every pickle below."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def clean_pt2(tmp_path_factory):
    torch.manual_seed(0)
    ep = torch.export.export(Net(), (torch.randn(2, 4),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    p = tmp_path_factory.mktemp("clean") / "net.pt2"
    torch.export.save(ep, str(p))
    return p


def _members(path):
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        prefix = names[0].split("/", 1)[0] + "/"
        return prefix, {n[len(prefix):]: zf.read(n) for n in names}


def _write(path, prefix, members):
    with zipfile.ZipFile(path, "w") as zf:
        for n, data in members.items():
            zf.writestr(prefix + n, data)
    return path


def _program(members):
    return json.loads(members["models/model.json"])


def _set_program(members, prog):
    members["models/model.json"] = json.dumps(prog).encode()


# each mutation makes the archive hostile in one way; `marker` is the file the payload creates

def _pickled_weight(m, marker):
    cfg = json.loads(m["data/weights/model_weights_config.json"])
    meta = next(iter(cfg["config"].values()))
    meta["use_pickle"] = True  # torch.export.load: torch.load(weights_only=False)
    m["data/weights/" + meta["path_name"]] = pickle.dumps(_OpenFile(marker), protocol=2)
    m["data/weights/model_weights_config.json"] = json.dumps(cfg).encode()


def _opaque_constant(m, marker):
    cfg = json.loads(m["data/constants/model_constants_config.json"])
    cfg["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    m["data/constants/opaque_obj_0"] = pickle.dumps(_OpenFile(marker), protocol=2)  # pickle.loads
    m["data/constants/model_constants_config.json"] = json.dumps(cfg).encode()


def _pickled_example_inputs(m, marker):
    # weights_only=True fails on this, then torch's deserializer retries with weights_only=False
    m["data/sample_inputs/model.pt"] = pickle.dumps(_OpenFile(marker), protocol=2)


def _sympy_string(m, marker):
    prog = _program(m)
    dims = prog["graph_module"]["graph"]["tensor_values"]["x"]["sizes"]
    dims[0]["as_expr"]["expr_str"] = f"Symbol('s0') + 0*len(str(open({str(marker)!r}, 'w')))"
    _set_program(m, prog)


def _callable_target(m, marker):
    prog = _program(m)
    node = prog["graph_module"]["graph"]["nodes"][0]
    node["target"] = "torch.builtins.open"  # any attribute path from `torch` resolves
    node["inputs"] = [{"name": "file", "arg": {"as_string": str(marker)}, "kind": 1},
                      {"name": "mode", "arg": {"as_string": "w"}, "kind": 1}]
    _set_program(m, prog)


def _file_operator(m, marker):
    prog = _program(m)
    node = prog["graph_module"]["graph"]["nodes"][0]
    node["target"] = "torch.ops.aten.from_file.default"  # shared=True creates the file
    node["inputs"] = [{"name": "filename", "arg": {"as_string": str(marker)}, "kind": 1},
                      {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                      {"name": "size", "arg": {"as_int": 4}, "kind": 1}]
    _set_program(m, prog)


def _source_injection(m, marker):
    # forward_arg_names (like pytree keys and attribute paths) are pasted into the generated
    # module's Python source
    prog = _program(m)
    sig = prog["graph_module"]["module_call_graph"][0]["signature"]
    sig["forward_arg_names"] = [f"x=open({str(marker)!r}, 'w')"]
    _set_program(m, prog)


def _aoti_library(m, marker):
    m["data/aotinductor/model/model.so"] = b"\x7fELF not really"


def _legacy_weights(m, marker):
    m["data/weights/model.pt"] = pickle.dumps(_OpenFile(marker), protocol=2)


# kind -> (mutation, words of the refusal that name the reason)
HOSTILE = {
    "pickled_weight": (_pickled_weight, "pickled object"),
    "opaque_constant": (_opaque_constant, "pickled object"),
    "pickled_example_inputs": (_pickled_example_inputs, "example inputs"),
    "sympy_string": (_sympy_string, "symbolic expression"),
    "callable_target": (_callable_target, "not a torch operator"),
    "file_operator": (_file_operator, "accesses files"),
    "source_injection": (_source_injection, "unexpected name"),
    "aoti_library": (_aoti_library, "AOTInductor"),
    "legacy_weights": (_legacy_weights, "older format"),
}


def _hostile(clean, tmp_path, kind, suffix=".pt2"):
    marker = tmp_path / f"pwned_{kind}"
    prefix, members = _members(clean)
    HOSTILE[kind][0](members, marker)
    return _write(tmp_path / f"evil{suffix}", prefix, members), marker


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / ".pp"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "nadoo.runtime.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_pt2_refused(clean_pt2, tmp_path, kind):
    for suffix in (".pt2", ".pt"):  # the archive is sniffed by content, the name does not matter
        path, marker = _hostile(clean_pt2, tmp_path, kind, suffix)
        with pytest.raises(CompileError) as ei:
            load_model(str(path))
        msg = str(ei.value)
        assert HOSTILE[kind][1] in msg and "--allow-pickle" in msg and "\n" not in msg, msg
        assert not marker.exists()


def test_hostile_pt2_cli_exit_2(clean_pt2, tmp_path):
    path, marker = _hostile(clean_pt2, tmp_path, "pickled_weight", ".pt")
    r = _cli("compile", path, "-o", tmp_path / "out.ndc", "-q")
    assert r.returncode == 2, r.stderr
    out = (r.stdout + r.stderr).strip()
    assert "--allow-pickle" in out and len(out.splitlines()) == 1, out
    assert "Traceback" not in out and not marker.exists()
    assert not (tmp_path / "out.ndc").exists()


@pytest.mark.parametrize("kind", ["pickled_weight", "opaque_constant", "pickled_example_inputs", "sympy_string",
                                  "file_operator", "legacy_weights"])
def test_allow_pickle_trusts_the_file(clean_pt2, tmp_path, kind):
    """--allow-pickle means torch.export.load: the payload runs (then the broken model fails with
    one line); documented in README. This also shows each payload is real."""
    path, marker = _hostile(clean_pt2, tmp_path, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CompileError) as ei:
            load_model(str(path), allow_pickle=True)
    assert "\n" not in str(ei.value)
    assert marker.exists()


def test_guard_strings_are_never_executed(clean_pt2, tmp_path):
    """torch exec's an exported program's guard strings in ExportedProgram.module(); nadoo drops
    them (the range constraints still hold), so such an archive compiles and nothing runs."""
    marker = tmp_path / "pwned_guard"
    prefix, members = _members(clean_pt2)
    prog = _program(members)
    prog["guards_code"] = [f"open({str(marker)!r}, 'w') is not None"]
    _set_program(members, prog)
    path = _write(tmp_path / "guard.pt2", prefix, members)
    for allow in (False, True):
        lm = load_model(str(path), allow_pickle=allow)
        assert [s.name for s in lm.input_specs] == ["x"]
    assert not marker.exists()


def test_clean_pt2_loads_without_flag_and_matches(clean_pt2, tmp_path):
    import onnxruntime as ort

    renamed = tmp_path / "net.pt"
    renamed.write_bytes(clean_pt2.read_bytes())
    ref_ep = torch.export.load(str(clean_pt2))
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    with torch.no_grad():
        ref = ref_ep.module()(torch.from_numpy(x)).numpy()
    for p in (clean_pt2, renamed):
        lm = load_model(str(p))
        assert lm.source_kind == "export" and not lm.warnings
        sess = ort.InferenceSession(lm.onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
        (y,) = sess.run(None, {"x": x})
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_examples_digits_cnn_pt2_without_flag(tmp_path):
    from examples.models import digits_data, train_digits_cnn

    model = train_digits_cnn(seed=0)
    ep = torch.export.export(model, (torch.zeros(2, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    p = tmp_path / "digits.pt2"
    torch.export.save(ep, str(p))
    lm = load_model(str(p))
    assert lm.source_kind == "export" and not lm.warnings
    x = digits_data()[2][:7].reshape(-1, 1, 8, 8)
    got = lm.run_torch({lm.input_specs[0].name: x})
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(next(iter(got.values())), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# TorchScript

@pytest.fixture(scope="module")
def clean_ts(tmp_path_factory):
    p = tmp_path_factory.mktemp("ts") / "lin.pt"
    torch.jit.script(torch.nn.Linear(4, 3)).save(str(p))
    return p


@pytest.mark.parametrize("member", ["data.pkl", "constants.pkl"])
def test_torchscript_unpickler_refuses_reduce(clean_ts, tmp_path, member):
    """torch.jit.load's unpickler resolves GLOBALs only as TorchScript types: a __reduce__ payload
    fails to load (one line), with or without --allow-pickle, and never runs."""
    marker = tmp_path / f"pwned_{member}"
    prefix, members = _members(clean_ts)
    members[member] = pickle.dumps(_OpenFile(marker), protocol=2)
    path = _write(tmp_path / "evil.pt", prefix, members)
    for allow in (False, True):
        with pytest.raises(CompileError) as ei:
            load_model(str(path), input_shapes={"input": [2, 4]}, allow_pickle=allow)
        assert "\n" not in str(ei.value)
    assert not marker.exists()


def test_torchscript_writing_files_refused(tmp_path):
    """TorchScript code runs when nadoo traces the model, and it can write files (torch.save)."""
    marker = tmp_path / "pwned_ts_save"
    src = tmp_path / "saver.py"
    src.write_text(
        "import torch\n"
        "class Saver(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        f"        torch.save(x, {str(marker)!r})\n"
        "        return x * 2\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import saver
    finally:
        sys.path.remove(str(tmp_path))
    path = tmp_path / "saver.pt"
    torch.jit.script(saver.Saver()).save(str(path))
    with pytest.raises(CompileError) as ei:
        load_model(str(path), input_shapes={"x": [2, 3]})
    assert "torch.save" in str(ei.value) and "--allow-pickle" in str(ei.value)
    assert not marker.exists()
    r = _cli("compile", path, "-o", tmp_path / "o.ndc", "--input-shape", "x=2,3", "-q")
    assert r.returncode == 2 and len((r.stdout + r.stderr).strip().splitlines()) == 1
    assert not marker.exists()


def test_dunder_named_aten_operators_load(tmp_path):
    """aten has operators named like dunders (aten::__and__ from masks); they are operators."""
    class Masked(torch.nn.Module):
        def forward(self, x):
            return ((x > 0) & (x < 1)).to(torch.float32) * x

    ep = torch.export.export(Masked(), (torch.randn(2, 4),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    p = tmp_path / "masked.pt2"
    torch.export.save(ep, str(p))
    assert "torch.ops.aten.__and__.Tensor" in p.read_bytes().decode("latin-1")
    lm = load_model(str(p))
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(next(iter(lm.run_torch({"x": x}).values())), ((x > 0) & (x < 1)) * x, atol=1e-6)


@pytest.mark.parametrize("expr,ok", [
    ("Symbol('s43', positive=True, integer=True)", True),
    ("Mul(Integer(6), Symbol('s53', positive=True, integer=True))", True),
    ("FloorDiv(Add(Symbol('s0', integer=True), Integer(-1)), Integer(2))", True),
    ("PowByNatural(Integer(2), Symbol('s1', integer=True))", True),
    ("Float('1.5', precision=53)", True),
    ("__import__('os').system('true')", False),  # sympify would eval it
    ("Symbol('s0').__class__", False),
    ("Max('exec(1)')", False),  # Max sympifies string arguments
    ("Symbol(chr(97))", False),
    ("Pow(Integer(10), Integer(10000000))", False),  # eager big-number arithmetic
    ("Pow(Symbol('s0'), -Integer(100000))", False),
])
def test_symbolic_expression_rule(expr, ok):
    from nadoo.compiler.load.archive_safety import _check_sym_expr, _Unsafe

    if ok:
        _check_sym_expr(expr, "test")
    else:
        with pytest.raises(_Unsafe):
            _check_sym_expr(expr, "test")
