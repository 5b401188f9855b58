"""A ``torch.save`` file → a torch module: a state_dict built into ``--model-class``, or (only with
``allow_pickle``) a fully pickled ``nn.Module``.

torch.load runs with ``weights_only=True`` first: that unpickler only rebuilds tensors and plain
containers. Anything else in the pickle (a module, a custom class) is code that runs while it is
unpickled, so it is loaded only when the user vouches for the file with --allow-pickle.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import warnings

from nadoo.runtime.errors import CompileError, one_line

from .error_text import err_text
from .torch_io import import_torch

_CLASS_FORM = "must look like package.module:ClassName"


def load_torch_save(path: str, model_class: str | None, allow_pickle: bool):
    """(module, source kind "pickle" | "state_dict")."""
    torch = import_torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if not _is_unsupported_global(e):
            raise CompileError(one_line(f"cannot load {path} with torch.load (truncated or corrupt?): "
                                        f"{err_text(e)}")) from None
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
                obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise CompileError(one_line(f"cannot unpickle {path}: {err_text(e2)}", 340)) from None
    # a module also comes out of weights_only=True when the user allow-listed its globals
    if isinstance(obj, torch.nn.Module):
        return obj, "pickle"
    sd = _extract_state_dict(obj)
    if sd is None:
        raise CompileError(f"{path} holds a {type(obj).__name__}, not a state_dict (a dict of tensors) or a model")
    if not model_class:
        raise CompileError(
            f"{path} is a state_dict (weights only); pass --model-class package.module:ClassName "
            f"so the model can be built, or save TorchScript / torch.export / ONNX instead"
        )
    return _module_from_state_dict(sd, model_class, path), "state_dict"


def _is_unsupported_global(e: BaseException) -> bool:
    """Whether torch.load(weights_only=True) refused a pickle GLOBAL (as opposed to a broken file)."""
    s = str(e)
    return "Unsupported global" in s or "GLOBAL " in s


def _extract_state_dict(obj):
    """A dict of tensors, possibly wrapped as {"state_dict": ...} / {"model": ...}."""
    torch = import_torch()

    def tensors(d):
        return isinstance(d, dict) and d and all(isinstance(v, torch.Tensor) for v in d.values())

    if not isinstance(obj, dict):
        return None
    if tensors(obj):
        return obj
    return next((obj[k] for k in ("state_dict", "model_state_dict", "model") if tensors(obj.get(k))), None)


def _import_class(spec: str):
    """The object `spec` ("package.module:Class" or "package.module.Class") names. The current folder
    is tried as a last resort for the top-level module, as `python -m` would."""
    if ":" in spec:
        mod_name, _, qual = spec.partition(":")
    elif "." in spec:
        mod_name, _, qual = spec.rpartition(".")
    else:
        mod_name = qual = ""
    if not mod_name or not qual:
        raise CompileError(f"--model-class {spec!r} {_CLASS_FORM}")
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
        raise CompileError(one_line(f"--model-class {spec!r}: cannot import module {mod_name!r} ({err_text(e)})",
                                    380)) from None
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


def _module_from_state_dict(sd, model_class: str, path: str):
    """`model_class()` with `sd` loaded; a mismatch names the keys or shapes that differ, which is
    what a user needs to pick the right class or constructor defaults."""
    torch = import_torch()
    cls = _import_class(model_class)
    if not (inspect.isclass(cls) and issubclass(cls, torch.nn.Module)):
        raise CompileError(f"--model-class {model_class!r} is not a torch.nn.Module subclass")
    try:
        module = cls()
    except Exception as e:
        raise CompileError(one_line(f"--model-class {model_class!r}: constructing it with no arguments failed "
                                    f"({err_text(e)})", 400)) from None
    own = module.state_dict()
    missing = set(own) - set(sd)
    unexpected = set(sd) - set(own)
    misfit = f"state_dict {path} does not fit {model_class}"
    if missing or unexpected:
        parts = ([f"missing keys: {_fmt_keys(missing)}"] if missing else []) \
            + ([f"unexpected keys: {_fmt_keys(unexpected)}"] if unexpected else [])
        raise CompileError(f"{misfit}: " + "; ".join(parts))
    bad = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
    if bad:
        k = bad[0]
        raise CompileError(
            f"{misfit}: shape mismatch for {k} (file {tuple(sd[k].shape)}, model {tuple(own[k].shape)})"
            + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
        )
    try:
        module.load_state_dict(sd, strict=True)
    except Exception as e:
        raise CompileError(f"{misfit}: {one_line(e)}") from None
    return module
