"""A ``torch.export`` program (``torch.export.save``, .pt2) → ONNX.

Without ``allow_pickle`` the archive is read by archive_safety.load_exported_program, which
refuses anything but plain data; torch.export.load unpickles and evaluates parts of the file.
"""
from __future__ import annotations

import warnings

from nadoo.runtime.errors import CompileError, one_line

from .archive_safety import load_exported_program
from .error_text import err_text, export_error_text, root_cause
from .exporter import export_dynamic, to_onnx
from .inputs import example_arrays
from .torch_io import flatten_outputs, import_torch, output_names, quiet_torch_logs, to_torch


def load_exported(path, example_inputs, opset, allow_pickle=False):
    """(ModelProto, input names, output names, number of outputs, example arrays, torch module)."""
    torch = import_torch()
    try:
        with quiet_torch_logs():
            ep = torch.export.load(path) if allow_pickle else load_exported_program(path)
    except CompileError:
        raise
    except Exception as e:
        raise CompileError(one_line(f"cannot load torch.export program {path}: {err_text(root_cause(e))}")) from None
    names = list(ep.graph_signature.user_inputs)
    try:
        module = ep.module(check_guards=False)  # guards would exec code strings from the file
    except Exception as e:
        raise CompileError(one_line(f"{path}: cannot rebuild the exported program's module: {err_text(e)}")) from None
    _copy_before_strided_reshapes(torch, module)
    arrays = _examples(ep, module, names, example_inputs, path)
    args_t = tuple(to_torch(arrays).values())
    with torch.no_grad():
        try:
            res = module(*args_t)
        except Exception as e:
            raise CompileError(one_line(f"{path}: the exported program fails on example inputs: "
                                        f"{err_text(root_cause(e))}")) from None
    flat = flatten_outputs(res)
    out_names = output_names(len(flat))
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
            if target == "program":
                model = to_onnx(ep, args_t, names, out_names, opset)
            else:
                model = export_dynamic(module, dict(zip(names, args_t)), names, out_names, opset,
                                       positional=True, axes=axes)
            break
        except Exception as e:
            errors.append(e)
    if model is None:
        raise CompileError(one_line(f"{path}: ONNX export failed: {export_error_text(errors[-1])}")) from None
    if target == "program":
        warnings.warn(f"{path}: exported the program with the shapes it was saved with (re-exporting "
                      f"its module failed: {export_error_text(errors[0])[:200]})")
    elif axes is not with_batch:
        warnings.warn(f"{path}: the saved program's graph specializes the batch axis, so the bundle takes "
                      f"only the input shapes it was saved with; export with a dynamic batch "
                      f"(torch.export.Dim) to vary it")
    return model, names, out_names, len(flat), arrays, module


def _copy_before_strided_reshapes(torch, module) -> int:
    """Put a contiguous copy (aten.clone) before every view/reshape of a value the saved program does
    not know to be contiguous (a transpose's output, say); returns how many. Re-exporting the module,
    torch decomposes such a reshape into a view under symbolic shapes, which then fails on the
    transpose's strides ("Cannot view a tensor with shape ... and strides ..."; Swin's and T5's
    attention). A reshape of a non-contiguous value copies anyway, so the program computes the same."""
    aten = torch.ops.aten
    reshapes = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)

    def contiguous(node) -> bool:
        try:
            return bool(node.meta["val"].is_contiguous())
        except Exception:  # no recorded value, or a symbolic answer: copy to be safe
            return False

    g, n = module.graph, 0
    for node in list(g.nodes):
        if node.op == "call_function" and node.target in reshapes and node.args and not contiguous(node.args[0]):
            with g.inserting_before(node):
                copy = g.call_function(aten.clone.default, (node.args[0],), {"memory_format": torch.contiguous_format})
            node.args = (copy,) + tuple(node.args[1:])
            n += 1
    if n:
        module.recompile()
    return n


def _examples(ep, module, names, example_inputs, path):
    """Example inputs: the calibration data if given, else the samples saved with the program."""
    if example_inputs:
        return example_arrays(module, names, names, example_inputs, None)
    torch = import_torch()
    ex = getattr(ep, "example_inputs", None)
    if ex is None:
        raise CompileError(f"{path}: the exported program carries no example inputs; pass --calib")
    args, kwargs = ex
    flat = list(args) + list(kwargs.values())
    if len(flat) != len(names) or not all(isinstance(t, torch.Tensor) for t in flat):
        raise CompileError(f"{path}: only exported programs taking plain tensor inputs are supported")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, flat)}


def _saved_dynamic_axes(ep, names) -> dict[str, set[int]]:
    """The axes of each user input that the exported program keeps symbolic."""
    torch = import_torch()
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    return {n: {i for i, d in enumerate(getattr(vals.get(n), "shape", ())) if isinstance(d, torch.SymInt)}
            for n in names}
