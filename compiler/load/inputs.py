"""The example inputs a torch model is exported with: its input names (from forward's signature),
arrays from the calibration data or from --input-shape, and which of their axes stay dynamic.

Every dynamic axis of an example is at least 2 long: the exporter specializes an axis of length 1
(or one equal to another axis) to a constant, and the bundle could then take only that shape.
"""
from __future__ import annotations

import inspect
import re

import numpy as np

from nadoo.runtime.errors import CompileError, one_line

from .torch_io import import_torch

# input names that carry integers (token ids, masks, positions), so get int64 examples
_INT_NAME = re.compile(r"(ids|mask|token|position|index|indices)", re.I)


def signature_names(module, torchscript: bool) -> tuple[list[str], list[str]]:
    """(all input names of forward() in order, the required ones); ([], []) when unknown."""
    if torchscript:
        try:
            args = list(module.forward.schema.arguments)[1:]
        except Exception as e:
            raise CompileError(f"cannot read the TorchScript forward signature: {one_line(e)}") from None
        return [a.name for a in args], [a.name for a in args if not a.has_default_value()]
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return [], []
    params = [p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return [p.name for p in params], [p.name for p in params if p.default is p.empty]


def example_arrays(module, sig_names, required, example_inputs, input_shapes) -> dict[str, np.ndarray]:
    """Example numpy inputs for the export: the first two calibration samples if there are any,
    else arrays of the --input-shape shapes (ones, or int64 ids/masks)."""
    if example_inputs:
        return _from_calibration(sig_names, required, example_inputs)
    if input_shapes:
        return _from_shapes(module, sig_names, required, input_shapes)
    hint = f" (model inputs: {', '.join(sig_names)})" if sig_names else ""
    raise CompileError(
        f"cannot export the torch model without knowing its input shapes{hint}: pass --calib "
        f"with sample inputs or --input-shape NAME=D0,D1,..."
    )


def dynamic_axes_for(arrays: dict[str, np.ndarray]) -> dict[str, dict[int, str]]:
    """The axes every export keeps dynamic: the batch, and the sequence of 2-D integer inputs (ids)."""
    axes = {}
    for n, a in arrays.items():
        d = {0: "batch"}
        if a.dtype.kind in "iu" and a.ndim == 2:
            d[1] = "seq"
        axes[n] = d
    return axes


def _from_calibration(sig_names, required, example_inputs) -> dict[str, np.ndarray]:
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


def _from_shapes(module, sig_names, required, input_shapes) -> dict[str, np.ndarray]:
    shapes = dict(input_shapes)
    if "" in shapes:  # --input-shape D0,D1,... without a name: the model's only input
        if len(shapes) > 1:
            raise CompileError("--input-shape: name every input (NAME=D0,D1,...) for a multi-input model")
        cands = required or sig_names
        if not cands:
            raise CompileError("--input-shape without a name needs a model with a forward(x) signature; "
                               "use NAME=D0,...")
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


def _first_leaf_is_embedding(module) -> bool:
    """Whether the first layer with weights is an embedding: then the first input holds token ids."""
    torch = import_torch()
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
    """The `given` input names in forward()'s order, refusing unknown names and missing required ones."""
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
