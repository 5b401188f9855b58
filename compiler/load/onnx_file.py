"""Loading an .onnx file (its external data files pulled into memory), checking an ONNX model,
and reading the input specs every loaded model reports from its graph."""
from __future__ import annotations

import os

from nadoo.runtime.errors import CompileError, one_line

from ..calib_data import InputSpec


def specs_from_graph(model) -> tuple[list, list]:
    """([InputSpec] of the graph inputs that are not initializers, [output name])."""
    from ..onnx_to_graph import value_info

    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if not vi.type.HasField("tensor_type"):
            raise CompileError(f"model input {vi.name!r} is not a tensor; only tensor inputs are supported")
        v = value_info(vi)
        if v["dtype"] is None:
            raise CompileError(f"model input {vi.name!r} has no element type")
        specs.append(InputSpec(name=vi.name, dtype=v["dtype"], shape=v["shape"] or []))
    return specs, [o.name for o in model.graph.output]


def check_model(model, where: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise CompileError(f"{where}: ONNX model is invalid: {one_line(e)}") from None


def load_onnx(path: str):
    """(checked ModelProto with its external data in memory, input specs, output names)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, load_external_data_for_model, uses_external_data

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:
        raise CompileError(f"cannot load {path}: not a valid ONNX file ({one_line(e)})") from None
    if not model.graph.node and not model.graph.output:
        raise CompileError(f"cannot load {path}: not a valid ONNX file (empty graph)")
    try:
        # onnx itself refuses data paths outside the model's folder and files that are not regular
        if any(uses_external_data(t) for t in _get_all_tensors(model)):
            load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    except Exception as e:
        raise CompileError(
            f"cannot load {path}: its external data could not be read ({one_line(e, 200)}); keep "
            f"the data files next to the .onnx"
        ) from None
    check_model(model, path)
    specs, outs = specs_from_graph(model)
    if not specs:
        raise CompileError(f"{path}: the ONNX graph has no inputs")
    return model, specs, outs
