"""The elementwise activations of fused FFNs and MoE experts: one implementation each, one set of names.

Names are lower case: `relu`, `gelu` (the erf form), `gelu_tanh`, `silu`. A ChunkedFFN node names its
activation after the ONNX operator the compiler fused ("Relu", "Gelu"), so names match whatever
their case. GELU is the engine's own (runtime/ops/elementwise.py), so a fused FFN computes exactly
what the graph's nodes did. Every function may overwrite its argument: callers pass a fresh
intermediate (a product they just computed).
"""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .ops.elementwise import gelu


def _relu(z: np.ndarray) -> np.ndarray:
    return np.maximum(z, 0, out=z)


def _gelu_tanh(z: np.ndarray) -> np.ndarray:
    return gelu(z, "tanh")


def _silu(z: np.ndarray) -> np.ndarray:
    return z / (1.0 + np.exp(-z))


ACTIVATIONS = {"relu": _relu, "gelu": gelu, "gelu_tanh": _gelu_tanh, "silu": _silu}


def activation(name: str):
    """The function computing activation `name`."""
    fn = ACTIVATIONS.get(name.lower()) if isinstance(name, str) else None
    if fn is None:
        raise InputError(f"unknown activation {name!r} (known: {', '.join(ACTIVATIONS)})")
    return fn


def apply(name: str, z: np.ndarray) -> np.ndarray:
    """activation(name)(z), for callers that name the activation at each use."""
    return activation(name)(z)
