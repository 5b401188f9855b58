"""What every torch source shares: importing torch, quieting its exporter, feeding a module numpy
inputs and flattening what it returns into the ordered tensor list the ONNX graph outputs.

torch is imported lazily everywhere in this package, so loading an .onnx file never needs it.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import warnings

import numpy as np

from nadoo.runtime.errors import CompileError, one_line

# loggers the exporter fills with notes (torchvision registration, progress, symbolic shapes)
_CHATTY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx", "torch._dynamo",
                   "torch.utils._sympy", "torch.fx.experimental.symbolic_shapes", "onnxscript")


def import_torch():
    try:
        import torch
    except Exception as e:  # pragma: no cover - environment problem
        raise CompileError(f"loading a torch model needs torch installed: {one_line(e)}") from None
    return torch


@contextlib.contextmanager
def quiet_torch_logs():
    """The exporter logs a lot (torchvision registration notes, progress); keep the CLI clean."""
    saved = []
    for n in _CHATTY_LOGGERS:
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


def to_torch(arrays: dict) -> dict:
    torch = import_torch()
    return {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in arrays.items()}


def flatten_outputs(obj) -> list:
    """The tensors in a model's return value, depth first: a tensor, tuples/lists and dicts of them
    (a transformers ModelOutput is a dict without its None fields; last_hidden_state comes first)."""
    torch = import_torch()
    if obj is None:
        return []
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        keys = [k for k in obj.keys() if obj[k] is not None]
        if "last_hidden_state" in keys:
            keys.remove("last_hidden_state")
            keys.insert(0, "last_hidden_state")
        values = [obj[k] for k in keys]
    elif isinstance(obj, (list, tuple)):
        values = obj
    else:
        raise CompileError(f"the model returns a {type(obj).__name__}; only tensors (or tuples/dicts of them) "
                           f"are supported")
    return [t for v in values for t in flatten_outputs(v)]


def output_names(n: int) -> list[str]:
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


def flat_wrapper(module, input_names):
    """Wrap `module` so forward(<input_names>) returns a flat tuple of tensors in our order. The
    wrapper's forward gets an explicit signature so torch.export can match dynamic_shapes keys."""
    torch = import_torch()

    class Flat(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return tuple(flatten_outputs(self.inner(*args, **kwargs)))

    P = inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD)] + [P(n, P.POSITIONAL_OR_KEYWORD) for n in input_names]
    fwd = Flat.forward

    def forward(self, *args, **kwargs):
        return fwd(self, *args, **kwargs)

    forward.__signature__ = inspect.Signature(params)
    Flat.forward = forward
    return Flat(module)
