"""Load torch archives from untrusted sources without running code from them.

``torch.export.load`` trusts its input completely. In a ``.pt2`` archive:
  * pickled weights / tensor constants are unpickled with ``weights_only=False``, "opaque"
    constants with ``pickle.loads``, example inputs (and legacy weight files) fall back to
    ``weights_only=False`` when the safe load fails, and an AOTInductor part is a native library;
  * the program JSON is code as well: symbolic-shape strings go through ``sympy.sympify``
    (which evaluates Python), guard strings are ``exec``'d by ``ExportedProgram.module()``, node
    targets resolve to anything reachable from ``torch`` (``torch.serialization.os.system``), and
    names / pytree keys are pasted into generated Python source.
So without ``--allow-pickle`` nadoo never calls ``torch.export.load``: :func:`load_exported_program`
reads the archive through torch's own zip reader, checks every member and every string of the
program against what ``torch.export.save`` writes for an ordinary model (raw tensor bytes,
tensor-only example inputs, aten/prims operators, srepr'd sympy expressions, plain names), and
only then hands the checked pieces to torch's deserializer.

A TorchScript archive's code is checked in torchscript.py (`check_torchscript_code`).

Every refusal is one :class:`CompileError` line that names ``--allow-pickle``.
"""
from __future__ import annotations

import ast
import functools
import io
import json
import re

from nadoo.runtime.errors import CompileError

__all__ = ["load_exported_program", "TRUST_HINT", "FILE_OPS"]

TRUST_HINT = "re-run with --allow-pickle only if you trust the file"

# operators that read or write files on their own (everything else in aten/prims is tensor math)
FILE_OPS = frozenset({"save", "from_file"})
_OP_NAMESPACES = frozenset({"aten", "prims", "higher_order"})
_NAME = re.compile(r"[A-Za-z0-9_.\-]*\Z")
_OP = re.compile(r"torch\.ops\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?\Z", re.ASCII)
_SYMBOL = re.compile(r"[a-z]+[0-9]+\Z")
_SYM_STR = re.compile(r"[A-Za-z0-9_.+\-]+\Z")
_MAX_POW = 4096  # a constant exponent beyond this is a denial-of-service, not a shape


class _Unsafe(Exception):
    """Something in the archive that an ordinary torch.export.save never writes."""


# ------------------------------------------------------------------------------------------------
# torch's (private) serde helpers, bound in one place

@functools.lru_cache(maxsize=None)
def _torch_serde():
    """schema, serialize and pt2_archive._package of this torch, checked to have what nadoo uses.
    When torch moves them nadoo fails closed instead of falling back to torch.export.load."""
    import types

    try:
        from torch._export.serde import schema
        from torch._export.serde import serialize as serde
        from torch.export.pt2_archive import PT2ArchiveReader
        from torch.export.pt2_archive import _package as pkg

        for obj, names in ((serde, ("_dict_to_dataclass", "ExportedProgramDeserializer", "_SYM_OPS",
                                    "deserialize_size", "deserialize_stride", "deserialize_storage_offset")),
                           (schema, ("ExportedProgram", "PayloadConfig")),
                           (pkg, ("_build_file_map", "ARCHIVE_VERSION_PATH", "ARCHIVE_VERSION_VALUE",
                                  "AOTINDUCTOR_DIR", "MODELS_FILENAME_FORMAT", "WEIGHTS_DIR", "CONSTANTS_DIR",
                                  "WEIGHTS_CONFIG_FILENAME_FORMAT", "CONSTANTS_CONFIG_FILENAME_FORMAT",
                                  "SAMPLE_INPUTS_FILENAME_FORMAT", "TENSOR_CONSTANT_FILENAME_PREFIX"))):
            for n in names:
                getattr(obj, n)
    except (ImportError, AttributeError) as e:
        raise CompileError(f"this torch version cannot load .pt2 archives safely ({type(e).__name__}: "
                           f"{str(e)[:120]}); {TRUST_HINT}") from None
    return types.SimpleNamespace(schema=schema, serde=serde, pkg=pkg, Reader=PT2ArchiveReader)


# ------------------------------------------------------------------------------------------------
# strings of the program JSON

def _check_name(s: str, where: str) -> None:
    # names become attribute paths and identifiers in generated source: no quotes, spaces,
    # brackets or dunder components
    if not _NAME.match(s) or any(p[:2] == "__" and p[-2:] == "__" for p in s.split(".")):
        raise _Unsafe(f"unexpected name {s[:60]!r} in {where}")


def _free_text(s: str, where: str) -> None:
    """String arguments of operators: passed as values (repr'd in generated code), never parsed."""


@functools.lru_cache(maxsize=None)
def _sym_names():
    import torch.utils._sympy.functions as tf

    funcs = set(tf.__all__) | {
        "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Max", "Min", "Abs",
        "floor", "ceiling", "sqrt", "Piecewise", "ExprCondPair", "And", "Or", "Not",
        "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan",
        "LessThan", "StrictGreaterThan", "GreaterThan",
    }
    consts = {"oo", "zoo", "nan", "true", "false", "pi", "E", "int_oo"}
    return frozenset(funcs), frozenset(consts)


def _huge_power(base, exp) -> bool:
    """sympy evaluates powers of numbers eagerly: a constant power (torch never writes one, it
    would have folded it) or an exponent beyond _MAX_POW only costs time and memory."""
    def symbolic(n):
        return any(isinstance(c, ast.Name) and _SYMBOL.match(c.id)
                   or isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id == "Symbol"
                   for c in ast.walk(n))

    nums = [c.value for c in ast.walk(exp) if isinstance(c, ast.Constant)
            and isinstance(c.value, (int, float)) and not isinstance(c.value, bool)]
    return any(abs(v) > _MAX_POW for v in nums) or not (symbolic(base) or symbolic(exp))


def _check_sym_expr(s: str, where: str) -> None:
    """torch parses these with sympy.sympify, i.e. Python eval: accept only the srepr subset
    torch writes (calls of sympy/torch shape functions on numbers and symbols)."""
    funcs, consts = _sym_names()
    try:
        tree = ast.parse(s, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        raise _Unsafe(f"malformed symbolic expression {s[:60]!r}") from None
    str_ok = {"Symbol", "Integer", "Float", "Rational"}  # never a function that sympifies a str

    def visit(n, str_allowed=False):
        if isinstance(n, ast.Expression):
            return visit(n.body)
        if isinstance(n, ast.Constant):
            v = n.value
            if isinstance(v, bool) or v is None or isinstance(v, (int, float)):
                return
            if isinstance(v, str) and str_allowed and _SYM_STR.match(v):
                return
        elif isinstance(n, ast.Name):
            if n.id in consts or _SYMBOL.match(n.id):
                return
        elif isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd, ast.Not)):
            return visit(n.operand)
        elif isinstance(n, ast.BinOp) and isinstance(n.op, (ast.Add, ast.Sub, ast.Mult, ast.Div,
                                                              ast.FloorDiv, ast.Mod)):
            visit(n.left)
            return visit(n.right)
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in funcs:
            name = n.func.id
            for i, a in enumerate(n.args):
                visit(a, str_allowed=(i == 0 and name in str_ok))
            for kw in n.keywords:
                if kw.arg is None or not isinstance(kw.value, ast.Constant) \
                        or not isinstance(kw.value.value, (bool, int)):
                    raise _Unsafe(f"unexpected symbolic expression {s[:60]!r}")
            if ("Pow" in name or name == "LShift") and len(n.args) == 2 and _huge_power(*n.args):
                raise _Unsafe(f"symbolic expression with a huge power {s[:60]!r}")
            return
        raise _Unsafe(f"unexpected symbolic expression {s[:60]!r}")

    visit(tree)


@functools.lru_cache(maxsize=None)
def _sym_op_targets():
    ops = _torch_serde().serde._SYM_OPS
    return frozenset(f"{op.__module__}.{op.__name__}" for op in ops) | {"_operator.getitem"}


def _check_operator(s: str, where: str) -> None:
    """torch resolves a target by getattr from `torch` and calls whatever callable it finds."""
    import torch

    if s in _sym_op_targets():
        return
    m = _OP.match(s)
    if not m:
        raise _Unsafe(f"the program calls {s[:80]!r}, which is not a torch operator")
    ns, op, overload = m.groups()  # op may be a dunder (aten::__and__); the type check below decides
    if ns not in _OP_NAMESPACES:
        raise _Unsafe(f"the program calls operator {ns}::{op} outside the aten/prims namespaces")
    if op in FILE_OPS and ns != "higher_order":
        raise _Unsafe(f"the program calls {ns}::{op}, which accesses files")
    try:
        obj = getattr(getattr(torch.ops, ns), op)
        if overload:
            obj = getattr(obj, overload)
    except Exception:
        raise _Unsafe(f"the program calls unknown operator {s[:80]!r}") from None
    if not isinstance(obj, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        raise _Unsafe(f"the program calls {s[:80]!r}, which is not a torch operator")


def _parse_json(s: str, where: str):
    try:
        return json.loads(s)
    except (ValueError, RecursionError):
        raise _Unsafe(f"malformed {where}") from None


def _check_treespec(s: str, where: str) -> None:
    """Pytree specs are JSON: type names, and contexts (JSON again) holding dict keys, which
    become kwargs keys pasted into the generated forward() code."""
    _walk(_parse_json(s, where), "pytree spec")


def _check_context(s: str, where: str) -> None:
    _walk(_parse_json(s, where), "pytree context")


_STRING_RULES = {
    "expr_str": _check_sym_expr,
    "target": _check_operator,
    "as_operator": _check_operator,
    "in_spec": _check_treespec,
    "out_spec": _check_treespec,
    "context": _check_context,
    "as_string": _free_text,
    "as_strings": _free_text,
    "torch_version": _free_text,
}


def _walk(obj, key: str) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_name(k, key)
            _walk(v, k)
    elif isinstance(obj, list):
        for v in obj:
            _walk(v, key)
    elif isinstance(obj, str):
        _STRING_RULES.get(key, _check_name)(obj, key)
    elif not (obj is None or isinstance(obj, (bool, int, float))):
        raise _Unsafe(f"unexpected value in {key}")


def _strip_code_strings(obj) -> None:
    """Drop what torch would exec but nadoo does not need: guard strings (input checks; the range
    constraints stay enforced) and node metadata (stack traces, module paths for debugging)."""
    if isinstance(obj, dict):
        if isinstance(obj.get("metadata"), dict):
            obj["metadata"] = {}
        for v in obj.values():
            _strip_code_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            _strip_code_strings(v)


def _check_program(prog: dict) -> None:
    if not isinstance(prog, dict) or not isinstance(prog.get("graph_module"), dict):
        raise _Unsafe("the program JSON is not a torch.export program")
    prog["guards_code"] = []
    _strip_code_strings(prog)
    try:
        specs = prog["graph_module"]["signature"]["input_specs"]
    except (KeyError, TypeError):
        raise _Unsafe("the program has no input signature") from None
    for spec in specs if isinstance(specs, list) else [None]:
        kind = next(iter(spec), None) if isinstance(spec, dict) and len(spec) == 1 else None
        if kind not in ("user_input", "parameter", "buffer", "tensor_constant"):
            raise _Unsafe(f"the program takes a {kind or 'malformed'} input (only tensors, "
                          f"parameters, buffers and tensor constants are plain data)")
        if kind == "user_input" and "as_tensor" not in (spec[kind].get("arg") or {}):
            raise _Unsafe("the program takes a non-tensor input")
    _walk(prog, "program")


# ------------------------------------------------------------------------------------------------
# archive members

def _read_json(reader, name: str):
    try:
        return json.loads(reader.read_bytes(name).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _Unsafe(f"{name} is not valid JSON") from None


def _payload_tensors(reader, cfg: dict, base_dir: str, what: str, constants: bool) -> dict:
    """Tensors of a weights/constants config whose members are all raw bytes (never pickles)."""
    import torch

    api = _torch_serde()
    schema, serde, pkg = api.schema, api.serde, api.pkg
    entries = cfg.get("config") if isinstance(cfg, dict) else None
    if not isinstance(entries, dict):
        raise _Unsafe(f"malformed {what} config")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict):
            raise _Unsafe(f"malformed {what} config")
        path_name = meta.get("path_name")
        if meta.get("use_pickle") or (constants and not str(path_name).startswith(pkg.TENSOR_CONSTANT_FILENAME_PREFIX)):
            raise _Unsafe(f"{what} {fqn!r} is stored as a pickled object ({base_dir}{path_name})")
        if not isinstance(meta.get("tensor_meta"), dict):
            raise _Unsafe(f"{what} {fqn!r} has no tensor metadata")
    _walk(entries, what)
    config = serde._dict_to_dataclass(schema.PayloadConfig, cfg)
    file_map = pkg._build_file_map(reader, config, base_dir)
    out = {}
    for fqn, meta in config.config.items():
        tm = meta.tensor_meta
        t = torch.as_strided(file_map[meta.path_name], size=serde.deserialize_size(tm.sizes),
                             stride=serde.deserialize_stride(tm.strides),
                             storage_offset=serde.deserialize_storage_offset(tm.storage_offset))
        out[fqn] = torch.nn.Parameter(t, requires_grad=tm.requires_grad) if meta.is_param else t
    return out


def _example_inputs(reader, name: str, names: set):
    import torch

    if name not in names:
        return None
    data = reader.read_bytes(name)
    if not data:
        return None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:
        raise _Unsafe(f"its example inputs ({name}) are pickled objects, not plain tensors") from None


def _load_checked(path: str):
    api = _torch_serde()
    schema, serde, pkg = api.schema, api.serde, api.pkg
    try:
        reader = api.Reader(path)
        names = set(reader.get_file_names())
        version = reader.read_string(pkg.ARCHIVE_VERSION_PATH) if pkg.ARCHIVE_VERSION_PATH in names else None
    except Exception:
        # not the current archive layout: older torch.export zips pickle their weights
        raise _Unsafe("it is not a current torch.export archive (an older format pickles its weights)") from None
    if version != pkg.ARCHIVE_VERSION_VALUE:
        raise _Unsafe(f"archive version {version!r} is not {pkg.ARCHIVE_VERSION_VALUE!r}")
    for n in sorted(names):
        if n.startswith(pkg.AOTINDUCTOR_DIR):
            raise _Unsafe(f"it contains an AOTInductor library ({n}), i.e. native code")
    model = "model"
    if pkg.MODELS_FILENAME_FORMAT.format(model) not in names:
        raise _Unsafe("it holds no exported program named 'model'")
    for legacy in (f"{pkg.WEIGHTS_DIR}{model}.pt", f"{pkg.CONSTANTS_DIR}{model}.pt"):
        if legacy in names:
            raise _Unsafe(f"it stores weights as a pickle ({legacy}, an older format)")
    prog = _read_json(reader, pkg.MODELS_FILENAME_FORMAT.format(model))
    _check_program(prog)
    tensors = []
    for fmt, base, what, is_const in (
            (pkg.WEIGHTS_CONFIG_FILENAME_FORMAT, pkg.WEIGHTS_DIR, "weight", False),
            (pkg.CONSTANTS_CONFIG_FILENAME_FORMAT, pkg.CONSTANTS_DIR, "constant", True)):
        cfg_name = fmt.format(model)
        cfg = _read_json(reader, cfg_name) if cfg_name in names else {"config": {}}
        tensors.append(_payload_tensors(reader, cfg, base, what, is_const))
    example = _example_inputs(reader, pkg.SAMPLE_INPUTS_FILENAME_FORMAT.format(model), names)
    serialized = serde._dict_to_dataclass(schema.ExportedProgram, prog)
    return serde.ExportedProgramDeserializer().deserialize(serialized, tensors[0], tensors[1], example)


def load_exported_program(path: str):
    """The ExportedProgram in `path`, loaded without unpickling or evaluating anything from it.
    Raises CompileError (one line, naming --allow-pickle) for anything but plain data."""
    try:
        return _load_checked(path)
    except _Unsafe as e:
        raise CompileError(f"{path}: refusing to load this torch.export archive: {e}; {TRUST_HINT}") from None
    except CompileError:
        raise
    except Exception as e:
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise CompileError(f"cannot load torch.export program {path}: {type(e).__name__}: {msg}") from None
