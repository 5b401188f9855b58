"""Load every supported model form into one in-memory ONNX ModelProto.

Forms (told apart by extension and content in detect.py), one module each:
  * ``.onnx``, external data files beside it loaded into memory (onnx_file.py)
  * a TorchScript archive, ``torch.jit.save`` (torchscript.py)
  * a ``torch.export`` program, ``torch.export.save`` / .pt2 (exported_program.py); without
    ``allow_pickle`` it must be plain data (archive_safety.py), never torch.export.load
  * a ``torch.save``d state_dict + ``model_class="pkg.mod:Class"``, or a fully pickled
    ``nn.Module`` only with ``allow_pickle=True`` since unpickling runs code (torch_save.py)

Torch modules are exported to ONNX by exporter.py with example inputs from inputs.py, and the
exported graph is tidied by onnx_cleanup.py. Every failure a user can cause is a one-line
:class:`CompileError`.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from nadoo.runtime.errors import CompileError
from nadoo.runtime.files import open_regular

from .detect import detect
from .exported_program import load_exported
from .exporter import export_module
from .inputs import example_arrays, signature_names
from .onnx_cleanup import finish
from .onnx_file import load_onnx, specs_from_graph
from .torch_io import flatten_outputs, import_torch
from .torch_save import load_torch_save
from .torchscript import load_torchscript

__all__ = ["LoadedModel", "load_model", "run_torch_reference"]


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


def load_model(path, *, example_inputs: dict | None = None, input_shapes: dict | None = None,
               model_class: str | None = None, allow_pickle: bool = False, opset: int = 18) -> LoadedModel:
    """Load `path` (any supported form) into a LoadedModel holding one ONNX ModelProto."""
    path = os.fspath(path)
    _check_regular(path)
    kind = detect(path)
    if kind == "onnx":
        return LoadedModel(*load_onnx(path), "onnx", None)

    import_torch()
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if kind == "export":
            model, names, out_names, n_out, arrays, module = load_exported(path, example_inputs, opset, allow_pickle)
            source = "export"
        else:
            if kind == "torchscript":
                module, source = load_torchscript(path, allow_pickle), "torchscript"
            else:
                module, source = load_torch_save(path, model_class, allow_pickle)
            sig_names, required = signature_names(module, torchscript=source == "torchscript")
            arrays = example_arrays(module, sig_names, required, example_inputs, input_shapes)
            model, names, out_names, n_out = export_module(module, source, arrays, opset, path)
        model = finish(model, arrays, names, n_out, path)
    # pass on what the exporter said about this model (fallbacks, specialised axes), not torch's
    # deprecation chatter
    for w in caught:
        msg = str(w.message)
        if w.category in (FutureWarning, DeprecationWarning) or "training mode" in msg:
            continue
        if path in msg or "exporter" in msg:
            notes.append(msg)
            warnings.warn(msg, stacklevel=2)
    specs, outs = specs_from_graph(model)  # dtypes of inputs as exported (int token ids stay int64)
    return LoadedModel(model, specs, outs, source, module, notes)


def _check_regular(path: str) -> None:
    """Refuse a missing, empty or non-regular model file before any loader opens it: a FIFO or a
    device would block the loader's open() or feed it without end."""
    fd = open_regular(path, "model file", CompileError)
    try:
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size == 0:
        raise CompileError(f"model file {path} is empty")


def run_torch_reference(loaded: LoadedModel, inputs: dict) -> dict:
    """Run `loaded.torch_module` on numpy inputs; returns {output_name: ndarray}."""
    if loaded.torch_module is None:
        raise CompileError("this model was loaded from ONNX; there is no torch reference")
    torch = import_torch()
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
    flat = flatten_outputs(res)
    return {n: t.detach().cpu().numpy() for n, t in zip(loaded.output_names, flat)}
