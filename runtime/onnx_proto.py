"""ONNX models written without the `onnx` package: the few protobuf messages the ORT engine builds.

Why: `import onnx` pulls in ml_dtypes and protobuf's generated classes, ~0.75 s of CPU — a third of a
cold `nadoo generate` on Gemma 3 270M — only to serialize small graphs whose weights go to ONNX Runtime
as external initializers anyway. Protobuf's wire format is simple (tagged varints and length-prefixed
bytes), so the messages are written here directly, fields in field-number order as protobuf itself
writes them; tests/test_onnx_proto.py checks byte for byte against `onnx`'s own serialization.

The functions mirror the subset of `onnx.helper` / `onnx.numpy_helper` the engine uses (same names and
arguments), so the engine's builders take either module.
"""
from __future__ import annotations

import numbers
import struct

import numpy as np

__all__ = ["IR_VERSION", "make_attribute", "make_graph", "make_model", "make_node", "make_opsetid",
           "make_tensor_value_info", "from_array", "np_dtype_to_tensor_dtype", "tensor_dtype_to_np_dtype"]

IR_VERSION = 10  # readable by every ONNX Runtime release this engine supports


class TensorProto:
    UNDEFINED, FLOAT, UINT8, INT8, UINT16, INT16, INT32, INT64, STRING, BOOL, FLOAT16, DOUBLE, UINT32, UINT64 = range(14)
    DEFAULT, EXTERNAL = 0, 1


class AttributeProto:
    FLOAT, INT, STRING, TENSOR, GRAPH, FLOATS, INTS, STRINGS, TENSORS = 1, 2, 3, 4, 5, 6, 7, 8, 9


_NP_OF = {TensorProto.FLOAT: np.float32, TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8,
          TensorProto.UINT16: np.uint16, TensorProto.INT16: np.int16, TensorProto.INT32: np.int32,
          TensorProto.INT64: np.int64, TensorProto.STRING: np.object_, TensorProto.BOOL: np.bool_,
          TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64, TensorProto.UINT32: np.uint32,
          TensorProto.UINT64: np.uint64}
_TYPE_OF = {np.dtype(v): k for k, v in _NP_OF.items()}


def np_dtype_to_tensor_dtype(dtype) -> int:
    dt = np.dtype(dtype)
    if dt.kind in "US":
        return TensorProto.STRING
    try:
        return _TYPE_OF[dt]
    except KeyError:
        raise ValueError(f"no ONNX tensor type for numpy dtype {dt}") from None


def tensor_dtype_to_np_dtype(elem: int) -> np.dtype:
    return np.dtype(_NP_OF[elem])


# ------------------------------------------------------------------ wire format
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64: two's complement, ten bytes
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _int(field: int, v: int) -> bytes:
    return _varint(field << 3) + _varint(int(v))


def _bytes(field: int, b) -> bytes:
    if isinstance(b, str):
        b = b.encode("utf-8")
    return _varint(field << 3 | 2) + _varint(len(b)) + b


def _float(field: int, v: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", v)


# ------------------------------------------------------------------ messages
class _Repeated(list):
    """A repeated message field: `append`/`extend` as a list, `add(**fields)` as protobuf's."""

    def __init__(self, cls):
        super().__init__()
        self._cls = cls

    def add(self, **fields):
        m = self._cls(**fields)
        self.append(m)
        return m


class Entry:
    def __init__(self, key: str = "", value: str = ""):
        self.key, self.value = key, value

    def serialize(self) -> bytes:
        return _bytes(1, self.key) + _bytes(2, self.value)


class Tensor:
    def __init__(self, name: str | None = None, data_type: int = 0, dims=(), raw_data: bytes | None = None,
                 string_data=None, data_location: int | None = None):
        self.name, self.data_type, self.dims = name, data_type, list(dims)
        self.raw_data, self.string_data, self.data_location = raw_data, string_data, data_location
        self.external_data = _Repeated(Entry)

    def serialize(self) -> bytes:
        out = b"".join(_int(1, d) for d in self.dims) + _int(2, self.data_type)
        out += b"".join(_bytes(6, s) for s in self.string_data or ())
        if self.name is not None:
            out += _bytes(8, self.name)
        if self.raw_data is not None:
            out += _bytes(9, self.raw_data)
        out += b"".join(_bytes(13, e.serialize()) for e in self.external_data)
        if self.data_location is not None:
            out += _int(14, self.data_location)
        return out


class Attribute:
    def __init__(self, name: str, type_: int, value):
        self.name, self.type, self.value = name, type_, value

    _FIELD = {"f": 1, "i": 2, "s": 3, "t": 4, "floats": 6, "ints": 7, "strings": 8, "tensors": 9}

    def __getattr__(self, field: str):
        """Read access by protobuf's field names (`a.i`, `a.ints`, ...): the value, or that field's default."""
        t = Attribute._FIELD.get(field)
        if t is None:
            raise AttributeError(field)
        if self.type == t:
            return self.value
        return [] if t >= 6 else {1: 0.0, 2: 0, 3: b"", 4: None}[t]

    def serialize(self) -> bytes:
        t, v = self.type, self.value
        out = _bytes(1, self.name)
        if t == AttributeProto.FLOAT:
            out += _float(2, v)
        elif t == AttributeProto.INT:
            out += _int(3, v)
        elif t == AttributeProto.STRING:
            out += _bytes(4, v)
        elif t == AttributeProto.TENSOR:
            out += _bytes(5, v.serialize())
        elif t == AttributeProto.FLOATS:
            out += b"".join(_float(7, x) for x in v)
        elif t == AttributeProto.INTS:
            out += b"".join(_int(8, x) for x in v)
        elif t == AttributeProto.STRINGS:
            out += b"".join(_bytes(9, x) for x in v)
        elif t == AttributeProto.TENSORS:
            out += b"".join(_bytes(10, x.serialize()) for x in v)
        else:
            raise ValueError(f"attribute {self.name}: type {t} is not written here")
        return out + _int(20, t)


class Node:
    def __init__(self, op_type: str, inputs, outputs, name: str | None, domain: str | None):
        self.op_type, self.input, self.output, self.name, self.domain = op_type, list(inputs), list(outputs), name, domain
        self.attribute: list[Attribute] = []

    def serialize(self) -> bytes:
        out = b"".join(_bytes(1, i) for i in self.input) + b"".join(_bytes(2, o) for o in self.output)
        if self.name is not None:
            out += _bytes(3, self.name)
        out += _bytes(4, self.op_type) + b"".join(_bytes(5, a.serialize()) for a in self.attribute)
        if self.domain is not None:
            out += _bytes(7, self.domain)
        return out


class ValueInfo:
    def __init__(self, name: str, elem_type: int, shape):
        self.name, self.elem_type, self.shape = name, elem_type, None if shape is None else list(shape)

    def serialize(self) -> bytes:
        tensor = _int(1, self.elem_type)
        if self.shape is not None:  # an empty shape (a scalar) is written, unlike an unknown one
            dims = []
            for d in self.shape:
                dims.append(b"" if d is None else _bytes(2, d) if isinstance(d, str) else _int(1, d))
            tensor += _bytes(2, b"".join(_bytes(1, d) for d in dims))
        return _bytes(1, self.name) + _bytes(2, _bytes(1, tensor))


class Graph:
    def __init__(self, nodes, name: str, inputs, outputs, initializer=None, value_info=None):
        self.node, self.name, self.input, self.output = list(nodes), name, list(inputs), list(outputs)
        self.initializer = _Repeated(Tensor)
        self.initializer.extend(initializer or ())
        self.value_info = list(value_info or ())

    def serialize(self) -> bytes:
        return (b"".join(_bytes(1, n.serialize()) for n in self.node) + _bytes(2, self.name)
                + b"".join(_bytes(5, t.serialize()) for t in self.initializer)
                + b"".join(_bytes(11, v.serialize()) for v in self.input)
                + b"".join(_bytes(12, v.serialize()) for v in self.output)
                + b"".join(_bytes(13, v.serialize()) for v in self.value_info))


class Model:
    def __init__(self, graph: Graph, opset_imports, producer_name: str | None = None):
        self.graph, self.opset_import, self.producer_name = graph, list(opset_imports), producer_name
        self.ir_version = IR_VERSION

    def SerializeToString(self) -> bytes:  # noqa: N802 (protobuf's name, so callers take either model)
        out = _int(1, self.ir_version)
        if self.producer_name is not None:
            out += _bytes(2, self.producer_name)
        out += _bytes(7, self.graph.serialize())
        return out + b"".join(_bytes(8, _bytes(1, d) + _int(2, v)) for d, v in self.opset_import)


# ------------------------------------------------------------------ onnx.helper's names
def make_attribute(key: str, value, attr_type: int | None = None) -> Attribute:
    if attr_type is not None:
        return Attribute(key, attr_type, list(value) if attr_type in (AttributeProto.INTS, AttributeProto.FLOATS,
                                                                       AttributeProto.STRINGS) else value)
    if isinstance(value, Tensor):
        return Attribute(key, AttributeProto.TENSOR, value)
    if isinstance(value, (str, bytes)):
        return Attribute(key, AttributeProto.STRING, value)
    if isinstance(value, numbers.Integral):
        return Attribute(key, AttributeProto.INT, int(value))
    if isinstance(value, numbers.Real):
        return Attribute(key, AttributeProto.FLOAT, float(value))
    value = list(value)
    if not value:
        raise ValueError(f"attribute {key}: an empty list needs attr_type")
    if all(isinstance(v, numbers.Integral) for v in value):
        return Attribute(key, AttributeProto.INTS, [int(v) for v in value])
    if all(isinstance(v, numbers.Real) for v in value):
        return Attribute(key, AttributeProto.FLOATS, [float(v) for v in value])
    if all(isinstance(v, (str, bytes)) for v in value):
        return Attribute(key, AttributeProto.STRINGS, value)
    if all(isinstance(v, Tensor) for v in value):
        return Attribute(key, AttributeProto.TENSORS, value)
    raise ValueError(f"attribute {key}: unsupported value {value!r}")


def make_node(op_type: str, inputs, outputs, name: str | None = None, domain: str | None = None, **attrs) -> Node:
    n = Node(op_type, inputs, outputs, name or None, domain)  # as onnx: an empty name is not written
    n.attribute.extend(make_attribute(k, v) for k, v in sorted(attrs.items()) if v is not None)
    return n


def make_tensor_value_info(name: str, elem_type: int, shape) -> ValueInfo:
    return ValueInfo(name, elem_type, shape)


def make_graph(nodes, name: str, inputs, outputs, initializer=None, value_info=None) -> Graph:
    return Graph(nodes, name, inputs, outputs, initializer, value_info)


def make_opsetid(domain: str, version: int) -> tuple[str, int]:
    return domain, int(version)


def make_model(graph: Graph, opset_imports=(), producer_name: str | None = None) -> Model:
    return Model(graph, opset_imports, producer_name)


def from_array(a: np.ndarray, name: str | None = None) -> Tensor:
    a = np.asarray(a)
    if a.dtype.hasobject or a.dtype.kind in "US":
        return Tensor(name, TensorProto.STRING, a.shape,
                      string_data=[s if isinstance(s, bytes) else str(s).encode("utf-8") for s in a.reshape(-1)])
    return Tensor(name, np_dtype_to_tensor_dtype(a.dtype), a.shape, raw_data=np.ascontiguousarray(a).astype(
        a.dtype.newbyteorder("<"), copy=False).tobytes())
