"""A torch module → an ONNX ModelProto, with a dynamic batch axis (and sequence axis of token ids).

The torch.export-based ("dynamo") exporter comes first: it keeps the graph exact. TorchScript
modules go there through TS2EPConverter. When it fails, the legacy tracing exporter is the
fallback, and its graph is run against the module on fresh inputs (tracing silently freezes
Python/numpy code on tensor values into constants).
"""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np

from nadoo.runtime.errors import CompileError, one_line

from .error_text import err_text, export_error_text, root_cause
from .inputs import dynamic_axes_for
from .torch_io import flat_wrapper, flatten_outputs, import_torch, output_names, quiet_torch_logs, to_torch


def export_module(module, kind, arrays, opset, where):
    """(ModelProto, input names, output names, number of tensors the module returns) for a module
    loaded from a TorchScript archive (`kind` "torchscript", called positionally) or a torch.save
    file (called with keyword arguments)."""
    torch = import_torch()
    input_names = list(arrays)
    kwargs_t = to_torch(arrays)
    torchscript = kind == "torchscript"
    try:
        module.eval()
    except Exception:
        pass
    # recognised mixture-of-experts blocks become one nadoo::moe op each (compiler/moe.py)
    from ..moe import patch_moe_blocks, translation_table
    moe_table = translation_table() if not torchscript and patch_moe_blocks(module) else None
    # run once: output structure (and a clean error if the inputs don't fit the model)
    try:
        with torch.no_grad():
            res = module(*kwargs_t.values()) if torchscript else module(**kwargs_t)
    except CompileError:
        raise
    except Exception as e:
        shapes = ", ".join(f"{n}{list(a.shape)}:{a.dtype}" for n, a in arrays.items())
        raise CompileError(
            one_line(f"{where}: the model fails on example inputs {shapes}: {err_text(root_cause(e))}")
        ) from None
    flat = flatten_outputs(res)
    if not flat:
        raise CompileError(f"{where}: the model returns no tensors")
    out_names = output_names(len(flat))
    plain_tensor = isinstance(res, torch.Tensor) or (
        isinstance(res, (tuple, list)) and all(isinstance(r, torch.Tensor) for r in res))

    errors = []
    model = None
    target = module if (plain_tensor or torchscript) else flat_wrapper(module, input_names)
    try:
        if torchscript:  # torch.export cannot take a ScriptModule: convert it to a program first
            model = _export_torchscript(target, kwargs_t, input_names, out_names, opset, arrays)
            if _output_mismatch(model, target, arrays, positional=True):
                model = None
                errors.append(CompileError("the TorchScript → torch.export conversion changes the model's results"))
        else:
            model = export_dynamic(target, kwargs_t, input_names, out_names, opset, False, moe_table)
    except Exception as e:
        errors.append(e)
    if model is None:
        try:
            model = _export_legacy(target, kwargs_t, input_names, out_names, opset, arrays, positional=torchscript)
            if _output_mismatch(model, target, arrays, torchscript):
                raise CompileError(
                    f"{where}: ONNX export failed: the torch.export-based exporter failed and the legacy "
                    f"tracing exporter gives different results than the model (data-dependent Python "
                    f"or numpy code in forward?)"
                )
            if errors:
                msg = (f"{where}: the torch.export-based ONNX exporter failed "
                       f"({export_error_text(errors[0])}); used the legacy TorchScript-based exporter")
                warnings.warn(one_line(msg, 500), stacklevel=3)
        except CompileError:
            raise
        except Exception as e:
            errors.append(e)
    if model is None:
        raise CompileError(one_line(f"{where}: ONNX export failed: {export_error_text(errors[0])}")) from None
    return model, input_names, out_names, len(flat)


def to_onnx(target, args: tuple, input_names, out_names, opset, **options):
    """torch.onnx.export(dynamo=True) of a module or ExportedProgram, quietly, to a ModelProto;
    `options` go to torch.onnx.export (kwargs, dynamic_shapes, custom_translation_table)."""
    torch = import_torch()
    with quiet_torch_logs(), contextlib.redirect_stdout(io.StringIO()):
        prog = torch.onnx.export(target, args, None, dynamo=True, verbose=False, opset_version=opset,
                                 input_names=input_names, output_names=out_names, external_data=False, **options)
    return prog.model_proto


def export_dynamic(module, kwargs_t, input_names, out_names, opset, positional=False, table=None, axes=None):
    """The dynamo export of `module` with dynamic axes: by default the batch, plus the second axis of
    2-D non-float inputs (token ids, masks); `axes` {input: dynamic axes} overrides that.
    `table` is a custom translation table (the nadoo::moe op → one nadoo.MoE node)."""
    torch = import_torch()
    D = torch.export.Dim.DYNAMIC
    dyn = {}
    for n, t in kwargs_t.items():
        d = {0: D}
        if not t.is_floating_point() and t.dim() == 2:
            d[1] = D
        dyn[n] = d if axes is None else {a: D for a in sorted(axes[n])}
    if positional:
        return to_onnx(module, tuple(kwargs_t.values()), input_names, out_names, opset,
                       dynamic_shapes=tuple(dyn.values()), custom_translation_table=table)
    return to_onnx(module, (), input_names, out_names, opset, kwargs=kwargs_t, dynamic_shapes=dyn,
                   custom_translation_table=table)


def _export_legacy(module, kwargs_t: dict, input_names, out_names, opset, arrays, positional: bool):
    torch = import_torch()
    import onnx

    axes = dynamic_axes_for(arrays)
    for o in out_names:
        axes[o] = {0: "batch"}
    f = io.BytesIO()
    args = tuple(kwargs_t.values()) if positional else ()
    kwargs = None if positional else dict(kwargs_t)
    with quiet_torch_logs(), contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            module, args, f, kwargs=kwargs, dynamo=False, opset_version=opset,
            input_names=input_names, output_names=out_names, dynamic_axes=axes,
            do_constant_folding=True,
        )
    return onnx.load_model_from_string(f.getvalue())


def _export_torchscript(module, kwargs_t, input_names, out_names, opset, arrays):
    """TorchScript → a torch.export program (TS2EPConverter re-traces the TorchScript graph into
    ATen ops, every axis dynamic where the graph allows) → the dynamo ONNX exporter. The legacy
    exporter lacks ops transformers' models and nn.MultiheadAttention emit (aten::diff,
    aten::_native_multi_head_attention); the dynamo exporter has them. The inputs' axes are then
    fixed as for every other torch source: only batch (and the sequence of token ids) stay dynamic."""
    from torch._export.converter import TS2EPConverter

    from .fastpath import DECOMPOSITIONS

    args = tuple(kwargs_t.values())
    with quiet_torch_logs(), contextlib.redirect_stdout(io.StringIO()):
        ep = TS2EPConverter(module, args).convert()
        if any(n.target in DECOMPOSITIONS for n in ep.graph.nodes):  # fused fast-path kernels (fastpath.py)
            ep = ep.run_decompositions(DECOMPOSITIONS)
    model = to_onnx(ep, args, input_names, out_names, opset)
    dynamic = dynamic_axes_for(arrays)
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
    torch = import_torch()
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
        t = to_torch(feeds)
        with torch.no_grad():
            ref = module(*t.values()) if positional else module(**t)
        ref = [r.detach().numpy() for r in flatten_outputs(ref)]
    except Exception:
        return False  # cannot verify (e.g. inputs dropped); later checks report structural problems
    return any(g.shape != r.shape or not np.allclose(g, r, atol=1e-3, rtol=1e-3) for g, r in zip(got, ref))
