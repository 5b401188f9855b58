"""Load every supported model form into one in-memory ONNX ModelProto.

Forms (detected by extension and content):
  * ``.onnx`` (external data files beside it are loaded into memory)
  * TorchScript archive (``torch.jit.save``)              → exported to ONNX
  * ``torch.export`` program (``torch.export.save``, .pt2) → exported to ONNX; without
    ``allow_pickle`` it must be plain data (compiler/archive_safety.py), never torch.export.load
  * ``torch.save``d state_dict + ``model_class="pkg.mod:Class"`` → exported to ONNX
  * a fully pickled ``nn.Module`` — only with ``allow_pickle=True`` (unpickling runs code)

Every failure a user can cause is a one-line :class:`CompileError`.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import logging
import os
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass, field

import numpy as np

from nadoo.runtime.errors import CompileError

from .archive_safety import check_torchscript_code, load_exported_program
from .calib_data import InputSpec

__all__ = ["LoadedModel", "load_model", "run_torch_reference"]

log = logging.getLogger(__name__)

_MAX_MSG = 300
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class LoadedModel:
    onnx_model: object  # onnx.ModelProto, external data loaded into memory
    input_specs: list  # list[InputSpec]; dynamic axes as strings ("batch", "seq", or the graph's dim_param)
    output_names: list  # list[str]
    source_kind: str  # "onnx" | "torchscript" | "export" | "state_dict" | "pickle"
    torch_module: object | None = None  # torch callable for torch sources; None for ONNX
    warnings: list = field(default_factory=list)  # human-readable notes (fallback exporter, ...)

    def run_torch(self, inputs: dict) -> dict:
        """Run the source torch model on numpy `inputs` (keyed by input name); returns
        {output_name: ndarray} in the ONNX output order. Raises CompileError for ONNX sources."""
        return run_torch_reference(self, inputs)


# ------------------------------------------------------------------------------------------------
# small helpers

def _one_line(msg, limit: int = _MAX_MSG) -> str:
    s = _ANSI.sub("", str(msg))
    s = " ".join(s.split())
    if not s:
        s = "unknown error"
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _err_text(e: BaseException) -> str:
    msg = " ".join(_ANSI.sub("", str(e)).split())
    return f"{type(e).__name__}: {_one_line(msg, 1000)}" if msg else type(e).__name__


def _root_cause(e: BaseException) -> BaseException:
    seen = set()
    c = e
    while id(c) not in seen:
        seen.add(id(c))
        nxt = c.__cause__ or (c.__context__ if not c.__suppress_context__ else None)
        if nxt is None:
            break
        c = nxt
    return c


def _export_error_text(e: BaseException) -> str:
    """One informative line from a (very verbose) torch.onnx exporter error."""
    root = _root_cause(e)
    text = _ANSI.sub("", str(root))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # prefer a line naming an operator / unsupported thing
    pick = None
    for ln in lines:
        if re.search(r"(unsupported|not supported|no .*function|aten::|torch\.ops\.|operator)", ln, re.I):
            pick = ln
            break
    if pick is None:
        pick = lines[0] if lines else type(root).__name__
    return f"{type(root).__name__}: {pick}"


@contextlib.contextmanager
def _quiet_torch_logs():
    """The exporter logs a lot (torchvision registration notes, progress); keep the CLI clean."""
    names = ["torch.onnx", "torch.export", "torch._export", "torch.fx", "torch._dynamo",
             "torch.utils._sympy", "torch.fx.experimental.symbolic_shapes", "onnxscript"]
    saved = []
    for n in names:
        lg = logging.getLogger(n)
        saved.append((lg, lg.level))
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message=".*will be removed.*")
            warnings.filterwarnings("ignore", message=".*no signature found.*")
            yield
    finally:
        for lg, lvl in saved:
            lg.setLevel(lvl)


def _import_torch():
    try:
        import torch  # noqa: F401
    except Exception as e:  # pragma: no cover - environment problem
        raise CompileError(f"loading a torch model needs torch installed: {_one_line(e)}") from None
    return torch


# ------------------------------------------------------------------------------------------------
# format detection

def _detect(path: str) -> str:
    """Return one of "onnx", "torchscript", "export", "torch_save", or raise CompileError."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".onnx":
        return "onnx"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except Exception as e:
            raise CompileError(f"cannot read {path}: corrupt zip archive ({_one_line(e)})") from None
        base = {n.split("/", 1)[1] if "/" in n else n for n in names}
        if any(n.endswith("constants.pkl") for n in names) or any("/code/" in n or n.startswith("code/") for n in names):
            return "torchscript"
        if ("archive_format" in base or "models/model.json" in base
                or any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in names)):
            return "export"
        if "data.pkl" in base:
            return "torch_save"
        raise CompileError(
            f"unknown model format: {path} is a zip archive but neither a TorchScript archive, "
            f"a torch.export .pt2 nor a torch.save file"
        )
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:1] == b"\x80" or head[:8] == b"\x8a\x0al\xfc\x9cF\xf9 ":  # pickle protocol / legacy torch magic
        return "torch_save"
    # ONNX protobuf has no magic number: try to parse it
    try:
        import onnx

        m = onnx.load_model(path, load_external_data=False)
        if m.graph.node or m.graph.output:
            return "onnx"
    except Exception:
        pass
    if head[:2] == b"PK":
        raise CompileError(f"cannot read {path}: truncated or corrupt zip archive (torch.save / TorchScript / .pt2)")
    raise CompileError(
        f"unknown model format: {path} (expected .onnx, a TorchScript archive, a torch.export .pt2, "
        f"or a torch.save state_dict)"
    )


# ------------------------------------------------------------------------------------------------
# ONNX

def _np_dtype_name(elem_type: int) -> str:
    import onnx

    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except Exception:
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _specs_from_graph(model) -> tuple[list, list]:
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise CompileError(f"model input {vi.name!r} is not a tensor; only tensor inputs are supported")
        shape: list = []
        if tt.HasField("shape"):
            for d in tt.shape.dim:
                if d.HasField("dim_value"):
                    shape.append(int(d.dim_value))
                elif d.HasField("dim_param"):
                    shape.append(d.dim_param)
                else:
                    shape.append(None)
        specs.append(InputSpec(name=vi.name, dtype=_np_dtype_name(tt.elem_type), shape=shape))
    outs = [o.name for o in model.graph.output]
    return specs, outs


def _check(model, where: str):
    import onnx

    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise CompileError(f"{where}: ONNX model is invalid: {_one_line(e)}") from None


def _all_tensors(model):
    from onnx.external_data_helper import _get_all_tensors

    return list(_get_all_tensors(model))


def _load_onnx(path: str) -> LoadedModel:
    import onnx

    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:
        raise CompileError(f"cannot load {path}: not a valid ONNX file ({_one_line(e)})") from None
    if not model.graph.node and not model.graph.output:
        raise CompileError(f"cannot load {path}: not a valid ONNX file (empty graph)")
    try:
        if any(uses_external_data(t) for t in _all_tensors(model)):
            load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    except Exception as e:
        raise CompileError(
            f"cannot load {path}: its external data could not be read ({_one_line(e, 200)}); keep "
            f"the data files next to the .onnx"
        ) from None
    _check(model, path)
    specs, outs = _specs_from_graph(model)
    if not specs:
        raise CompileError(f"{path}: the ONNX graph has no inputs")
    return LoadedModel(model, specs, outs, "onnx", None)


# ------------------------------------------------------------------------------------------------
# torch sources → a module

def _torch_load(path: str, weights_only: bool):
    torch = _import_torch()
    return torch.load(path, map_location="cpu", weights_only=weights_only)


def _is_unsupported_global(e: BaseException) -> bool:
    s = str(e)
    return "Unsupported global" in s or "GLOBAL " in s


def _import_class(spec: str):
    if ":" in spec:
        mod_name, _, qual = spec.partition(":")
    elif "." in spec:
        mod_name, _, qual = spec.rpartition(".")
    else:
        raise CompileError(f"--model-class {spec!r} must look like package.module:ClassName")
    if not mod_name or not qual:
        raise CompileError(f"--model-class {spec!r} must look like package.module:ClassName")
    try:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            cwd = os.getcwd()
            if cwd in sys.path or e.name != mod_name.split(".")[0]:
                raise
            sys.path.insert(0, cwd)
            mod = importlib.import_module(mod_name)
    except Exception as e:
        raise CompileError(f"--model-class {spec!r}: cannot import module {mod_name!r} ({_err_text(e)})"[:_MAX_MSG + 80]) from None
    obj = mod
    for part in qual.split("."):
        if not hasattr(obj, part):
            raise CompileError(f"--model-class {spec!r}: module {mod_name!r} has no attribute {qual!r}")
        obj = getattr(obj, part)
    return obj


def _fmt_keys(keys, n: int = 5) -> str:
    keys = sorted(keys)
    s = ", ".join(keys[:n])
    if len(keys) > n:
        s += f", ... ({len(keys)} in all)"
    return s


def _extract_state_dict(obj):
    """A dict of tensors, possibly wrapped as {"state_dict": ...} / {"model": ...}."""
    torch = _import_torch()
    if isinstance(obj, dict):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    return None


def _module_from_state_dict(sd, model_class: str, path: str):
    torch = _import_torch()
    cls = _import_class(model_class)
    if not (inspect.isclass(cls) and issubclass(cls, torch.nn.Module)):
        raise CompileError(f"--model-class {model_class!r} is not a torch.nn.Module subclass")
    try:
        module = cls()
    except Exception as e:
        raise CompileError(f"--model-class {model_class!r}: constructing it with no arguments failed ({_err_text(e)})"[:_MAX_MSG + 100]) from None
    own = module.state_dict()
    missing = set(own) - set(sd)
    unexpected = set(sd) - set(own)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_fmt_keys(unexpected)}")
        raise CompileError(f"state_dict {path} does not fit {model_class}: " + "; ".join(parts))
    bad = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
    if bad:
        k = bad[0]
        raise CompileError(
            f"state_dict {path} does not fit {model_class}: shape mismatch for {k} "
            f"(file {tuple(sd[k].shape)}, model {tuple(own[k].shape)})"
            + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
        )
    try:
        module.load_state_dict(sd, strict=True)
    except Exception as e:
        raise CompileError(f"state_dict {path} does not fit {model_class}: {_one_line(e)}") from None
    return module


def _load_torch_save(path: str, model_class, allow_pickle: bool):
    """Returns (module, kind)."""
    torch = _import_torch()
    try:
        obj = _torch_load(path, weights_only=True)
    except Exception as e:
        if not _is_unsupported_global(e):
            raise CompileError(_one_line(f"cannot load {path} with torch.load (truncated or corrupt?): {_err_text(e)}")) from None
        if not allow_pickle:
            m = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f" (it references {m.group(1)})" if m else ""
            raise CompileError(
                f"{path} is a pickled Python object{what}, e.g. a whole nn.Module; unpickling it runs "
                f"arbitrary code, so re-run with --allow-pickle only if you trust the file "
                f"(or save a state_dict / TorchScript / torch.export program instead)"
            ) from None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = _torch_load(path, weights_only=False)
        except Exception as e2:
            raise CompileError(f"cannot unpickle {path}: {_err_text(e2)}"[:_MAX_MSG + 40]) from None
        if isinstance(obj, torch.nn.Module):
            return obj, "pickle"
        sd = _extract_state_dict(obj)
        if sd is None:
            raise CompileError(f"{path} holds a pickled {type(obj).__name__}, not an nn.Module or a state_dict")
        if not model_class:
            raise CompileError(f"{path} holds a state_dict; pass --model-class package.module:ClassName to build the model")
        return _module_from_state_dict(sd, model_class, path), "state_dict"
    if isinstance(obj, torch.nn.Module):  # possible if the user allow-listed globals
        return obj, "pickle"
    sd = _extract_state_dict(obj)
    if sd is None:
        raise CompileError(
            f"{path} holds a {type(obj).__name__}, not a state_dict (a dict of tensors) or a model"
        )
    if not model_class:
        raise CompileError(
            f"{path} is a state_dict (weights only); pass --model-class package.module:ClassName "
            f"so the model can be built, or save TorchScript / torch.export / ONNX instead"
        )
    return _module_from_state_dict(sd, model_class, path), "state_dict"


# ------------------------------------------------------------------------------------------------
# input names & example inputs

_INT_NAME = re.compile(r"(ids|mask|token|position|index|indices)", re.I)


def _signature_names(module, kind: str) -> tuple[list[str], list[str]]:
    """(all input names in order, required names)."""
    if kind == "torchscript":
        try:
            args = list(module.forward.schema.arguments)[1:]
        except Exception as e:
            raise CompileError(f"cannot read the TorchScript forward signature: {_one_line(e)}") from None
        names = [a.name for a in args]
        required = [a.name for a in args if not a.has_default_value()]
        return names, required
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return [], []
    names, required = [], []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        names.append(p.name)
        if p.default is p.empty:
            required.append(p.name)
    return names, required


def _first_leaf_is_embedding(module) -> bool:
    torch = _import_torch()
    try:
        for m in module.modules():
            if getattr(m, "original_name", None) == "Embedding":  # TorchScript
                return True
            if len(list(m.children())) == 0 and any(True for _ in m.parameters(recurse=False)):
                return isinstance(m, torch.nn.Embedding)
    except Exception:
        pass
    return False


def _choose_names(sig_names, required, given: list[str], source: str) -> list[str]:
    if not sig_names:
        return list(given)
    unknown = [g for g in given if g not in sig_names]
    if unknown:
        raise CompileError(
            f"{source} names {', '.join(unknown)} which the model's forward() does not take "
            f"(its inputs: {', '.join(sig_names)})"
        )
    miss = [r for r in required if r not in given]
    if miss:
        raise CompileError(
            f"{source} lacks required model input(s) {', '.join(miss)} (forward() takes: {', '.join(sig_names)})"
        )
    return [n for n in sig_names if n in given]


def _example_arrays(module, kind, sig_names, required, example_inputs, input_shapes) -> dict[str, np.ndarray]:
    """Example numpy inputs for the export (≥ 2 along every dynamic axis, so nothing specializes)."""
    if example_inputs:
        names = _choose_names(sig_names, required, list(example_inputs), "the calibration data")
        out = {}
        for n in names:
            a = np.asarray(example_inputs[n])
            if a.ndim == 0:
                raise CompileError(f"calibration array {n!r} is a scalar; the first axis must be the samples")
            a = a[:2]
            if a.shape[0] < 2:
                a = np.concatenate([a, a], axis=0)
            if a.dtype.kind == "f":
                a = a.astype(np.float32)
            elif a.dtype.kind in "iu":
                a = a.astype(np.int64)
            out[n] = np.ascontiguousarray(a)
        return out
    if input_shapes:
        shapes = dict(input_shapes)
        if "" in shapes:
            if len(shapes) > 1:
                raise CompileError("--input-shape: name every input (NAME=D0,D1,...) for a multi-input model")
            cands = required or sig_names
            if not cands:
                raise CompileError("--input-shape without a name needs a model with a forward(x) signature; use NAME=D0,...")
            if len(required) > 1:
                raise CompileError(
                    f"the model takes {len(required)} inputs ({', '.join(required)}); give "
                    f"--input-shape NAME=D0,D1,... for each"
                )
            shapes = {cands[0]: shapes[""]}
        names = _choose_names(sig_names, required, list(shapes), "--input-shape")
        emb_first = _first_leaf_is_embedding(module)
        out = {}
        for i, n in enumerate(names):
            dims = [int(d) for d in shapes[n]]
            if not dims:
                raise CompileError(f"--input-shape for {n!r} is empty")
            is_int = bool(_INT_NAME.search(n)) or (i == 0 and emb_first)
            dims[0] = max(dims[0], 2)
            if is_int and len(dims) == 2:
                dims[1] = max(dims[1], 2)
            if is_int:
                fill = 1 if "mask" in n.lower() else 0
                out[n] = np.full(dims, fill, dtype=np.int64)
            else:
                out[n] = np.ones(dims, dtype=np.float32)
        return out
    hint = f" (model inputs: {', '.join(sig_names)})" if sig_names else ""
    raise CompileError(
        f"cannot export the torch model without knowing its input shapes{hint}: pass --calib "
        f"with sample inputs or --input-shape NAME=D0,D1,..."
    )


def _dynamic_axes_for(arrays: dict[str, np.ndarray]) -> dict[str, dict[int, str]]:
    axes = {}
    for n, a in arrays.items():
        d = {0: "batch"}
        if a.dtype.kind in "iu" and a.ndim == 2:
            d[1] = "seq"
        axes[n] = d
    return axes


# ------------------------------------------------------------------------------------------------
# outputs

def _flatten_outputs(obj) -> list:
    torch = _import_torch()
    if obj is None:
        return []
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):  # includes transformers ModelOutput (an OrderedDict without Nones)
        keys = [k for k in obj.keys() if obj[k] is not None]
        if "last_hidden_state" in keys:
            keys.remove("last_hidden_state")
            keys.insert(0, "last_hidden_state")
        out = []
        for k in keys:
            out.extend(_flatten_outputs(obj[k]))
        return out
    if isinstance(obj, (list, tuple)):
        out = []
        for v in obj:
            out.extend(_flatten_outputs(v))
        return out
    raise CompileError(f"the model returns a {type(obj).__name__}; only tensors (or tuples/dicts of them) are supported")


def _output_names(n: int) -> list[str]:
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


def _flat_wrapper(module, input_names):
    """Wrap `module` so forward(<input_names>) returns a flat tuple of tensors in our order. The
    wrapper's forward gets an explicit signature so torch.export can match dynamic_shapes keys."""
    torch = _import_torch()

    class Flat(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return tuple(_flatten_outputs(self.inner(*args, **kwargs)))

    P = inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD)] + [P(n, P.POSITIONAL_OR_KEYWORD) for n in input_names]
    fwd = Flat.forward

    def forward(self, *args, **kwargs):
        return fwd(self, *args, **kwargs)

    forward.__signature__ = inspect.Signature(params)
    Flat.forward = forward
    return Flat(module)


def run_torch_reference(loaded: LoadedModel, inputs: dict) -> dict:
    """Run `loaded.torch_module` on numpy inputs; returns {output_name: ndarray}."""
    if loaded.torch_module is None:
        raise CompileError("this model was loaded from ONNX; there is no torch reference")
    torch = _import_torch()
    names = [s.name for s in loaded.input_specs]
    kw = {}
    for s in loaded.input_specs:
        if s.name not in inputs:
            raise CompileError(f"reference run: missing input {s.name!r}")
        a = np.asarray(inputs[s.name]).astype(np.dtype(s.dtype), copy=False)
        kw[s.name] = torch.from_numpy(np.ascontiguousarray(a))
    with torch.no_grad():
        if loaded.source_kind in ("torchscript", "export"):
            res = loaded.torch_module(*[kw[n] for n in names])
        else:
            res = loaded.torch_module(**kw)
    flat = _flatten_outputs(res)
    return {n: t.detach().cpu().numpy() for n, t in zip(loaded.output_names, flat)}


# ------------------------------------------------------------------------------------------------
# ONNX post-processing

def _rename_dims(model, input_axes: dict[str, dict[int, str]]):
    """Give the exporter's symbolic dims (s43, ...) readable names: "batch", "seq"."""
    mapping: dict[str, str] = {}
    for vi in model.graph.input:
        axes = input_axes.get(vi.name, {})
        dims = vi.type.tensor_type.shape.dim
        for ax, want in axes.items():
            if ax >= len(dims):
                continue
            d = dims[ax]
            # every input's axis 0 is the shared sample/batch axis (calibration arrays are
            # stacked along it), so distinct exporter symbols for it all become "batch"
            if d.HasField("dim_param") and d.dim_param not in mapping:
                mapping[d.dim_param] = want
    if not mapping:
        return

    def fix(vis):
        for vi in vis:
            if not vi.type.HasField("tensor_type"):
                continue
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_param") and d.dim_param in mapping:
                    d.dim_param = mapping[d.dim_param]

    fix(model.graph.input)
    fix(model.graph.output)
    fix(model.graph.value_info)


def _rename_values(graph, mapping: dict[str, str]):
    if not mapping:
        return
    import onnx

    for n in graph.node:
        for i, x in enumerate(n.input):
            if x in mapping:
                n.input[i] = mapping[x]
        for i, x in enumerate(n.output):
            if x in mapping:
                n.output[i] = mapping[x]
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _rename_values(a.g, mapping)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    _rename_values(g, mapping)
    for coll in (graph.input, graph.output, graph.value_info):
        for vi in coll:
            if vi.name in mapping:
                vi.name = mapping[vi.name]
    for t in graph.initializer:
        if t.name in mapping:
            t.name = mapping[t.name]


def _constants_to_initializers(model):
    """Constant nodes holding real tensors (more than one element) become initializers."""
    import onnx
    from onnx import numpy_helper

    g = model.graph
    outputs = {o.name for o in g.output}
    keep = []
    moved = 0
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.attribute) == 1 \
                and n.attribute[0].name == "value" and n.output[0] not in outputs:
            t = n.attribute[0].t
            numel = int(np.prod(t.dims)) if len(t.dims) else 1
            if numel > 1 and t.data_location != onnx.TensorProto.EXTERNAL:
                arr = numpy_helper.to_array(t)
                init = numpy_helper.from_array(arr, name=n.output[0])
                g.initializer.append(init)
                moved += 1
                continue
        keep.append(n)
    if moved:
        del g.node[:]
        g.node.extend(keep)


def _finish(model, arrays, input_names, n_out, where: str):
    """Name inputs/outputs/dims, move constants, check."""
    import onnx

    g = model.graph
    inits = {i.name for i in g.initializer}
    graph_inputs = [vi for vi in g.input if vi.name not in inits]
    if len(graph_inputs) != len(input_names):
        raise CompileError(
            f"{where}: the exported ONNX graph has {len(graph_inputs)} inputs but the model takes "
            f"{len(input_names)} ({', '.join(input_names)}); the exporter drops inputs the model "
            f"ignores or cannot trace (e.g. numpy/Python code on tensor values)"
        )
    mapping = {vi.name: want for vi, want in zip(graph_inputs, input_names) if vi.name != want}
    out_names = _output_names(len(g.output))
    mapping.update({o.name: want for o, want in zip(g.output, out_names) if o.name != want})
    # avoid collisions with existing value names
    if mapping:
        taken = set()
        for n in g.node:
            taken.update(n.output)
        taken.update(i.name for i in g.initializer)
        clash = {v for v in mapping.values() if v in taken and v not in mapping}
        if clash:
            tmp = {c: f"{c}__orig" for c in clash}
            _rename_values(g, tmp)
        _rename_values(g, mapping)
    if n_out is not None and len(g.output) != n_out:
        warnings.warn(f"{where}: the exported graph has {len(g.output)} outputs, the torch model returned {n_out}")
    _rename_dims(model, _dynamic_axes_for(arrays))
    _constants_to_initializers(model)
    _check(model, where)
    return model


# ------------------------------------------------------------------------------------------------
# export

def _to_torch(arrays):
    torch = _import_torch()
    return {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in arrays.items()}


def _export_dynamo(module, kwargs_t, input_names, output_names, opset, positional=False, table=None, axes=None):
    """`axes` {input: dynamic axes} overrides the default: batch, plus the sequence of 2-D int inputs."""
    torch = _import_torch()
    D = torch.export.Dim.DYNAMIC
    dyn = {}
    for n, t in kwargs_t.items():
        d = {0: D}
        if not t.is_floating_point() and t.dim() == 2:
            d[1] = D
        dyn[n] = d if axes is None else {a: D for a in sorted(axes[n])}
    with _quiet_torch_logs(), contextlib.redirect_stdout(io.StringIO()):
        prog = torch.onnx.export(
            module, tuple(kwargs_t.values()) if positional else (), None,
            kwargs=None if positional else kwargs_t, dynamic_shapes=tuple(dyn.values()) if positional else dyn, dynamo=True, verbose=False, opset_version=opset,
            input_names=input_names, output_names=output_names, external_data=False,
            custom_translation_table=table,  # [nadoo#7 MoE] nadoo::moe -> one nadoo.MoE node
        )
    return prog.model_proto


def _export_legacy(module, kwargs_t: dict, input_names, output_names, opset, arrays, positional: bool):
    torch = _import_torch()
    import onnx

    axes = _dynamic_axes_for(arrays)
    for o in output_names:
        axes[o] = {0: "batch"}
    f = io.BytesIO()
    args = tuple(kwargs_t.values()) if positional else ()
    kwargs = None if positional else dict(kwargs_t)
    with _quiet_torch_logs(), contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            module, args, f, kwargs=kwargs, dynamo=False, opset_version=opset,
            input_names=input_names, output_names=output_names, dynamic_axes=axes,
            do_constant_folding=True,
        )
    return onnx.load_model_from_string(f.getvalue())


def _export_torchscript(module, kwargs_t, input_names, output_names, opset, arrays):
    """TorchScript → a torch.export program (TS2EPConverter re-traces the TorchScript graph into
    ATen ops, every axis dynamic where the graph allows) → the dynamo ONNX exporter. The legacy
    exporter lacks ops transformers' models and nn.MultiheadAttention emit (aten::diff,
    aten::_native_multi_head_attention); the dynamo exporter has them. The inputs' axes are then
    fixed as for every other torch source: only batch (and the sequence of token ids) stay dynamic."""
    torch = _import_torch()
    from torch._export.converter import TS2EPConverter

    from .fastpath import DECOMPOSITIONS

    args = tuple(kwargs_t.values())
    with _quiet_torch_logs(), contextlib.redirect_stdout(io.StringIO()):
        ep = TS2EPConverter(module, args).convert()
        if any(n.target in DECOMPOSITIONS for n in ep.graph.nodes):  # fused fast-path kernels (compiler/fastpath.py)
            ep = ep.run_decompositions(DECOMPOSITIONS)
        prog = torch.onnx.export(ep, args, None, dynamo=True, verbose=False, opset_version=opset,
                                 input_names=input_names, output_names=output_names, external_data=False)
    model = prog.model_proto
    dynamic = _dynamic_axes_for(arrays)
    inits = {i.name for i in model.graph.initializer}
    for vi, (name, a) in zip([vi for vi in model.graph.input if vi.name not in inits], arrays.items()):
        for ax, d in enumerate(vi.type.tensor_type.shape.dim):
            if ax not in dynamic[name] and ax < a.ndim:
                d.dim_value = int(a.shape[ax])
    for vi in model.graph.output:  # axes the converter specialised come out as digit-only dim_params
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param.isdigit():
                d.dim_value = int(d.dim_param)
    return model


def _output_mismatch(model, module, arrays, positional) -> bool:
    """Whether the ONNX graph, run by onnxruntime on fresh inputs, gives other results than the torch
    module (False when onnxruntime is missing or the check cannot run)."""
    try:
        import onnxruntime as ort
    except Exception:
        return False
    torch = _import_torch()
    rng = np.random.default_rng(1234)
    feeds = {}
    for n, a in arrays.items():
        if a.dtype.kind == "f":
            feeds[n] = rng.standard_normal(a.shape).astype(a.dtype)
        else:
            feeds[n] = a.copy()
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        got = sess.run(None, {n: feeds[n] for n in names if n in feeds})
        t = {n: torch.from_numpy(v) for n, v in feeds.items()}
        with torch.no_grad():
            ref = module(*t.values()) if positional else module(**t)
        ref = [r.detach().numpy() for r in _flatten_outputs(ref)]
    except Exception:
        return False  # cannot verify (e.g. inputs dropped); later checks report structural problems
    return any(g.shape != r.shape or not np.allclose(g, r, atol=1e-3, rtol=1e-3) for g, r in zip(got, ref))


def _verify_fallback(model, module, kwargs_t, arrays, positional, where):
    """The legacy exporter traces: Python/numpy code on tensor values becomes constants silently.
    If onnxruntime is available, check the traced graph on fresh inputs against the module."""
    if _output_mismatch(model, module, arrays, positional):
        raise CompileError(
            f"{where}: ONNX export failed: the torch.export-based exporter failed and the legacy "
            f"tracing exporter gives different results than the model (data-dependent Python "
            f"or numpy code in forward?)"
        )


def _export_module(module, kind, arrays, opset, where):
    torch = _import_torch()
    input_names = list(arrays)
    kwargs_t = _to_torch(arrays)
    try:
        module.eval()
    except Exception:
        pass
    # [nadoo#7 MoE] recognised mixture-of-experts blocks become one nadoo::moe op each (compiler/moe.py)
    from .moe import patch_moe_blocks, translation_table
    moe_table = translation_table() if kind != "torchscript" and patch_moe_blocks(module) else None
    # run once: output structure (and a clean error if the inputs don't fit the model)
    try:
        with torch.no_grad():
            if kind == "torchscript":
                res = module(*kwargs_t.values())
            else:
                res = module(**kwargs_t)
    except CompileError:
        raise
    except Exception as e:
        shapes = ", ".join(f"{n}{list(a.shape)}:{a.dtype}" for n, a in arrays.items())
        raise CompileError(
            _one_line(f"{where}: the model fails on example inputs {shapes}: {_err_text(_root_cause(e))}")
        ) from None
    flat = _flatten_outputs(res)
    if not flat:
        raise CompileError(f"{where}: the model returns no tensors")
    output_names = _output_names(len(flat))
    plain_tensor = isinstance(res, torch.Tensor) or (
        isinstance(res, (tuple, list)) and all(isinstance(r, torch.Tensor) for r in res))

    errors = []
    model = None
    target = module if (plain_tensor or kind == "torchscript") else _flat_wrapper(module, input_names)
    try:
        if kind == "torchscript":  # torch.export cannot take a ScriptModule: convert it to a program first
            model = _export_torchscript(target, kwargs_t, input_names, output_names, opset, arrays)
            if _output_mismatch(model, target, arrays, positional=True):
                model = None
                errors.append(CompileError("the TorchScript → torch.export conversion changes the model's results"))
        else:
            model = _export_dynamo(target, kwargs_t, input_names, output_names, opset, False, moe_table)
    except Exception as e:
        errors.append(e)
    if model is None:
        try:
            model = _export_legacy(target, kwargs_t, input_names, output_names, opset, arrays,
                                   positional=(kind == "torchscript"))
            _verify_fallback(model, target, kwargs_t, arrays, kind == "torchscript", where)
            if errors:
                msg = (f"{where}: the torch.export-based ONNX exporter failed "
                       f"({_export_error_text(errors[0])}); used the legacy TorchScript-based exporter")
                warnings.warn(_one_line(msg, 500), stacklevel=3)
        except CompileError:
            raise
        except Exception as e:
            errors.append(e)
    if model is None:
        first = errors[0]
        raise CompileError(_one_line(f"{where}: ONNX export failed: {_export_error_text(first)}")) from None
    return model, input_names, output_names, len(flat)


def _load_exported_program(path, example_inputs, opset, allow_pickle=False):
    torch = _import_torch()
    try:
        with _quiet_torch_logs():
            # torch.export.load unpickles and evaluates parts of the file; only a trusted file gets it
            ep = torch.export.load(path) if allow_pickle else load_exported_program(path)
    except CompileError:
        raise
    except Exception as e:
        raise CompileError(_one_line(f"cannot load torch.export program {path}: {_err_text(_root_cause(e))}")) from None
    sig = ep.graph_signature
    names = list(sig.user_inputs)
    try:
        module = ep.module(check_guards=False)  # guards would exec code strings from the file
    except Exception as e:
        raise CompileError(_one_line(f"{path}: cannot rebuild the exported program's module: {_err_text(e)}")) from None
    # example inputs: the calibration data if given, else the samples saved with the program
    arrays = None
    if example_inputs:
        arrays = _example_arrays(module, "export", names, names, example_inputs, None)
    if arrays is None:
        ex = getattr(ep, "example_inputs", None)
        if ex is None:
            raise CompileError(f"{path}: the exported program carries no example inputs; pass --calib")
        args, kwargs = ex
        flat = list(args) + list(kwargs.values())
        if len(flat) != len(names) or not all(isinstance(t, torch.Tensor) for t in flat):
            raise CompileError(f"{path}: only exported programs taking plain tensor inputs are supported")
        arrays = {n: t.detach().cpu().numpy() for n, t in zip(names, flat)}
    args_t = tuple(_to_torch(arrays).values())
    with torch.no_grad():
        try:
            res = module(*args_t)
        except Exception as e:
            raise CompileError(_one_line(f"{path}: the exported program fails on example inputs: {_err_text(_root_cause(e))}")) from None
    flat = _flatten_outputs(res)
    output_names = _output_names(len(flat))
    # Re-export .module() with the axes the saved program keeps symbolic (its graph may rely on
    # the others, e.g. a fixed sequence length), plus the batch axis calibration stacks samples
    # along, where the graph allows it; fall back to the ExportedProgram itself.
    saved = _saved_dynamic_axes(ep, names)
    with_batch = {n: saved[n] | {0} for n in names}
    errors = []
    model = None
    for target, axes in [("module", with_batch)] + ([("module", saved)] if saved != with_batch else []) \
            + [("program", saved)]:
        try:
            with _quiet_torch_logs(), contextlib.redirect_stdout(io.StringIO()):
                if target == "program":
                    prog = torch.onnx.export(ep, args_t, None, dynamo=True, verbose=False,
                                             opset_version=opset, input_names=names,
                                             output_names=output_names, external_data=False)
                    model = prog.model_proto
                else:
                    model = _export_dynamo(module, dict(zip(names, args_t)), names, output_names,
                                           opset, positional=True, axes=axes)
            break
        except Exception as e:
            errors.append(e)
    if model is None:
        raise CompileError(_one_line(f"{path}: ONNX export failed: {_export_error_text(errors[-1])}")) from None
    if target == "program":
        warnings.warn(f"{path}: exported the program with the shapes it was saved with (re-exporting "
                      f"its module failed: {_export_error_text(errors[0])[:200]})")
    elif axes is not with_batch:
        warnings.warn(f"{path}: the saved program's graph specializes the batch axis, so the bundle takes "
                      f"only the input shapes it was saved with; export with a dynamic batch "
                      f"(torch.export.Dim) to vary it")
    return model, names, output_names, len(flat), arrays, module


def _saved_dynamic_axes(ep, names) -> dict[str, set[int]]:
    """The axes of each user input that the exported program keeps symbolic."""
    torch = _import_torch()
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    return {n: {i for i, d in enumerate(getattr(vals.get(n), "shape", ())) if isinstance(d, torch.SymInt)}
            for n in names}


# ------------------------------------------------------------------------------------------------
# public entry point

def load_model(path, *, example_inputs: dict | None = None, input_shapes: dict | None = None,
               model_class: str | None = None, allow_pickle: bool = False, opset: int = 18) -> LoadedModel:
    """Load `path` (any supported form) into a LoadedModel holding one ONNX ModelProto."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CompileError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise CompileError(f"{path} is a directory; pass the model file itself (.onnx, .pt, .pt2)")
    if os.path.getsize(path) == 0:
        raise CompileError(f"model file {path} is empty")
    kind = _detect(path)
    if kind == "onnx":
        return _load_onnx(path)

    _import_torch()
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if kind == "export":
            model, names, out_names, n_out, arrays, module = _load_exported_program(
                path, example_inputs, opset, allow_pickle)
            source = "export"
        else:
            if kind == "torchscript":
                torch = _import_torch()
                if not allow_pickle:
                    check_torchscript_code(path)
                try:
                    module = torch.jit.load(path, map_location="cpu")
                except Exception as e:
                    raise CompileError(_one_line(f"cannot load TorchScript archive {path}: {_err_text(e)}")) from None
                source = "torchscript"
            else:
                module, source = _load_torch_save(path, model_class, allow_pickle)
            sig_names, required = _signature_names(module, source if source == "torchscript" else "module")
            arrays = _example_arrays(module, source, sig_names, required, example_inputs, input_shapes)
            model, names, out_names, n_out = _export_module(module, source, arrays, opset, path)
        model = _finish(model, arrays, names, n_out, path)
    for w in caught:
        msg = str(w.message)
        if w.category in (FutureWarning, DeprecationWarning) or "training mode" in msg:
            continue
        if path in msg or "exporter" in msg:
            notes.append(msg)
            warnings.warn(msg, stacklevel=2)
    specs, outs = _specs_from_graph(model)
    # dtypes of inputs as exported (int token ids stay int64)
    return LoadedModel(model, specs, outs, source, module, notes)
