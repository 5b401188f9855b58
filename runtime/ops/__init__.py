"""Built-in NumPy operator implementations for the nadoo engine.

Every operator is a *builder*: ``builder(node: dict, ctx: BuildContext) -> callable``. The builder runs once
when a :class:`~nadoo.runtime.engine.Plan` is built; it reads the node's attributes and any constant inputs
(``ctx.const(i)``) to precompute what it can, and returns a callable that takes the node's inputs (arrays, or
``None`` for an omitted optional input) and returns one array (single-output nodes) or a tuple of arrays.

A builder may raise :class:`Fallback` to say "this particular node configuration is not implemented natively";
the engine then uses the onnx.reference fallback for that node (compile machines only). Builders read
attributes through the typed ``ctx.attr_int`` / ``attr_ints`` / ``attr_float`` / ``attr_str`` / ... so a
value of the wrong type is a ModelError at plan build. An operator whose output can be much larger than
its inputs also has a size rule in :mod:`.sizes`, checked by the engine before the kernel runs.
"""
from __future__ import annotations

from ._common import Fallback, REGISTRY, register  # noqa: F401
from . import elementwise, matmul, conv, shape, indexing, reduce, norm, rnn, resize, conv_transpose, rmsnorm, attention, encoder_attention  # noqa: F401  (populate REGISTRY)

__all__ = ["REGISTRY", "Fallback", "register"]
