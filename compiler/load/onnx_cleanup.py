"""Tidying an ONNX graph the torch exporter wrote, so every torch source comes out alike: inputs
named as forward() names them, outputs "output" / "output_<i>", symbolic dims "batch" / "seq",
multi-element Constant nodes as initializers (where the compiler looks for weights)."""
from __future__ import annotations

import warnings

import numpy as np

from nadoo.runtime.errors import CompileError

from .inputs import dynamic_axes_for
from .onnx_file import check_model
from .torch_io import output_names


def finish(model, arrays, input_names, n_out, where: str):
    """Name inputs/outputs/dims, move constants, check."""
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
    mapping.update({o.name: want for o, want in zip(g.output, output_names(len(g.output))) if o.name != want})
    if mapping:
        # a wanted name some other value already has: move that value out of the way first
        taken = set()
        for n in g.node:
            taken.update(n.output)
        taken.update(i.name for i in g.initializer)
        clash = {v for v in mapping.values() if v in taken and v not in mapping}
        if clash:
            _rename_values(g, {c: f"{c}__orig" for c in clash})
        _rename_values(g, mapping)
    if n_out is not None and len(g.output) != n_out:
        warnings.warn(f"{where}: the exported graph has {len(g.output)} outputs, the torch model returned {n_out}")
    _rename_dims(model, dynamic_axes_for(arrays))
    _constants_to_initializers(model)
    check_model(model, where)
    return model


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
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if not vi.type.HasField("tensor_type"):
            continue
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in mapping:
                d.dim_param = mapping[d.dim_param]


def _rename_values(graph, mapping: dict[str, str]):
    """Rename values everywhere they appear, subgraphs (If/Loop bodies) included."""
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
                for sub in a.graphs:
                    _rename_values(sub, mapping)
    for vi in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
        if vi.name in mapping:
            vi.name = mapping[vi.name]


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
                g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(t), name=n.output[0]))
                moved += 1
                continue
        keep.append(n)
    if moved:
        del g.node[:]
        g.node.extend(keep)
