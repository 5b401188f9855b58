"""Turning one nadoo-graph node into a callable: attribute access for builders (`BuildContext`), the
built-in NumPy kernels, custom ops, and — only where onnx is installed — a per-node onnx.reference
fallback; plus each node's size rule, which the plan checks before a kernel allocates. The plan that
runs these callables is runtime/engine.py.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from .errors import ModelError, NadooError, UnsupportedError
from .ops import REGISTRY, Fallback
from .ops.shape import decode_tensor_attr
from .ops.sizes import SIZE_RULES
from .schema import is_int, is_number, normalize_domain

Builder = Callable[[dict, "BuildContext"], Callable[..., Any]]

__all__ = ["BuildContext", "Builder", "build_node", "reference_available", "size_rule_of"]


class BuildContext:
    """What a builder may look at: the node, its attributes, which inputs are constants, the opset,
    (for size rules of the nadoo ops) the shapes of the chunked weights the plan's model holds, and
    `state`: the plan owner's per-sequence state for stateful ops (KV caches), or None."""

    __slots__ = ("node", "attrs", "_consts", "opset", "opsets", "n_inputs", "n_outputs", "weight_shapes", "state")

    def __init__(self, node: dict, consts: list, opsets: Mapping[str, int],
                 weight_shapes: Mapping[str, tuple] | None = None, state: Any = None):
        self.node = node
        self.weight_shapes = weight_shapes or {}
        self.state = state
        self.attrs = node.get("attrs") or {}
        self._consts = consts
        self.opsets = dict(opsets)
        dom = normalize_domain(node.get("domain", "") or "")
        self.opset = int(self.opsets.get(dom) or (18 if dom == "" else 1))
        self.n_inputs = len(node.get("inputs", []))
        self.n_outputs = len(node.get("outputs", []))

    def attr(self, name: str, default: Any = ...) -> Any:
        """Attribute value; tensor attributes come back as np.ndarray. Missing & no default -> UnsupportedError."""
        if name in self.attrs:
            v = self.attrs[name]
            if isinstance(v, dict) and "tensor" in v:
                return decode_tensor_attr(v)
            return v
        if default is ...:
            raise UnsupportedError(f"operator {self.node.get('op')} node {self.node.get('name', '')!r} "
                                   f"misses required attribute {name!r}")
        return default

    def _typed(self, name: str, default, ok, kind: str, convert):
        if name not in self.attrs:
            return self.attr(name, default)
        v = self.attrs[name]
        if not ok(v):
            raise ModelError(f"operator {self.node.get('op')} node {self.node.get('name', '')!r}: attribute "
                             f"{name!r} must be {kind}, got {str(v)[:60]}")
        return convert(v)

    # Typed attribute access: a value of the wrong type for the operator is a ModelError at plan build.
    def attr_int(self, name: str, default: Any = ...) -> int:
        return self._typed(name, default, lambda v: is_int(v) or type(v) is bool, "an int", int)

    def attr_float(self, name: str, default: Any = ...) -> float:
        return self._typed(name, default, lambda v: is_number(v) or type(v) is bool, "a number", float)

    def attr_str(self, name: str, default: Any = ...) -> str:
        return self._typed(name, default, lambda v: isinstance(v, str), "a string", str)

    def attr_ints(self, name: str, default: Any = ...) -> list[int]:
        return self._typed(name, default, lambda v: isinstance(v, list) and all(is_int(x) for x in v),
                           "a list of ints", list)

    def attr_floats(self, name: str, default: Any = ...) -> list[float]:
        return self._typed(name, default, lambda v: isinstance(v, list) and all(is_number(x) for x in v),
                           "a list of numbers", lambda v: [float(x) for x in v])

    def attr_tensor(self, name: str, default: Any = ...) -> np.ndarray:
        """A tensor attribute (a plain number is taken as a 0-d tensor)."""
        return self._typed(name, default, lambda v: (isinstance(v, dict) and "tensor" in v) or is_number(v),
                           "a tensor", decode_tensor_attr)

    def has_input(self, i: int) -> bool:
        ins = self.node.get("inputs", [])
        return i < len(ins) and ins[i] != ""

    def const(self, i: int) -> np.ndarray | None:
        """The constant array bound to input i, or None if that input is dynamic or omitted."""
        if i < len(self._consts):
            return self._consts[i]
        return None

    def input_name(self, i: int) -> str:
        ins = self.node.get("inputs", [])
        return ins[i] if i < len(ins) else ""


# ---------------------------------------------------------------------------------------------- fallback
def _to_onnx_attr(name, v):
    from onnx import helper, numpy_helper, AttributeProto

    if isinstance(v, dict) and "tensor" in v:
        return helper.make_attribute(name, numpy_helper.from_array(decode_tensor_attr(v)))
    if isinstance(v, np.ndarray):
        return helper.make_attribute(name, numpy_helper.from_array(v))
    if isinstance(v, (list, tuple)) and len(v) == 0:
        return helper.make_attribute(name, [], attr_type=AttributeProto.INTS)
    return helper.make_attribute(name, v)


def reference_available(op: str, domain: str = "", version: int | None = None) -> bool:
    """Whether onnx.reference implements (domain, op). False if onnx is not installed."""
    try:
        from onnx.reference.ops import load_op
    except Exception:  # pragma: no cover - runtime-only machines
        return False
    try:
        load_op(domain or "", op, version)
        return True
    except Exception:
        return False


def _fallback_builder(node: dict, ctx: BuildContext):
    """Run a single node through onnx.reference.ReferenceEvaluator (lazy: onnx imported here only)."""
    op, domain = node["op"], node.get("domain", "") or ""
    try:
        import onnx  # noqa: F401
        from onnx import helper, TensorProto  # noqa: F401
        from onnx.reference import ReferenceEvaluator
    except Exception:
        raise UnsupportedError(f"unsupported operator {op} (domain {domain!r}); the onnx.reference "
                               "fallback needs the onnx package") from None
    if not reference_available(op, domain, ctx.opset if domain == "" else None):
        raise UnsupportedError(f"unsupported operator {op} (domain {domain!r})")

    attrs = [_to_onnx_attr(k, v) for k, v in (node.get("attrs") or {}).items()]
    in_names = [f"i{k}" if n else "" for k, n in enumerate(node.get("inputs", []))]
    out_names = [f"o{k}" if n else "" for k, n in enumerate(node.get("outputs", []))]
    opsets = dict(ctx.opsets) or {"": 18}
    opsets.setdefault("", 18)
    cache: dict = {}

    def make(args):
        from onnx import helper

        ins = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), None)
               for n, a in zip(in_names, args) if n]
        outs = [helper.make_tensor_value_info(n, 0, None) for n in out_names if n]
        nd = helper.make_node(op, in_names, out_names, domain=domain)
        nd.attribute.extend(attrs)
        g = helper.make_graph([nd], "fallback", ins, outs)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, int(v)) for d, v in opsets.items()])
        return ReferenceEvaluator(m)

    n_out = len(out_names)

    def f(*args):
        args = [np.asarray(a) if a is not None else None for a in args]
        key = tuple(None if a is None else a.dtype.str for a in args)
        ev = cache.get(key)
        if ev is None:
            ev = cache[key] = make(args)
        feeds = {n: a for n, a in zip(in_names, args) if n}
        res = ev.run(None, feeds)
        res = [np.asarray(r) for r in res]
        return res[0] if n_out == 1 else tuple(res)
    f.onnx_reference = True  # marks the callable for Plan.fallback_nodes
    return f


def build_node(node: dict, consts: list, opsets: Mapping[str, int],
               custom_ops: Mapping[tuple[str, str], Builder] | None = None, state: Any = None) -> Callable:
    """Resolve one node to a callable: custom ops, then built-ins, then the onnx.reference fallback.
    A builder that cannot use the node (attribute of the wrong type or value, unusable constant input)
    raises ModelError naming the node, whatever it raised itself."""
    op = node["op"]
    domain = normalize_domain(node.get("domain", "") or "")
    ctx = BuildContext(node, consts, opsets, state=state)
    try:
        if custom_ops:
            b = custom_ops.get((domain, op))
            if b is not None:
                return b(node, ctx)
        b = REGISTRY.get((domain, op))
        if b is not None:
            try:
                return b(node, ctx)
            except Fallback:
                pass
        return _fallback_builder(node, ctx)
    except NadooError:
        raise
    except Exception as e:
        raise ModelError(f"node {node.get('name') or op} ({op}): cannot be built from its attributes and "
                         f"constant inputs: {type(e).__name__}: {e}") from None


def size_rule_of(node: dict, ctx_args: tuple):
    """The node's size rule (ops/sizes.py) built once, or None. A rule that cannot read the node's
    attributes is a ModelError like a builder's."""
    rule = SIZE_RULES.get((normalize_domain(node.get("domain", "") or ""), node["op"]))
    if rule is None:
        return None
    try:
        return rule(node, BuildContext(node, *ctx_args))
    except NadooError:
        raise
    except Exception as e:
        raise ModelError(f"node {node.get('name') or node['op']} ({node['op']}): {type(e).__name__}: {e}") from None
