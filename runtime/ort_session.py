"""One onnxruntime.InferenceSession over a segment's model, with its weights handed over as external
initializers, and the probe that tells which of those arrays ORT keeps its own prepacked copy of (so
ours can be dropped). Used by runtime/ort_engine.py.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .ort_engine import OrtOptions

_EMBED_BYTES = 4096  # initializers up to this size go into the model bytes, larger ones as external initializers


def _session(ort, options: OrtOptions, m, inits: dict, nodes, constants, embed_bytes: int = _EMBED_BYTES):
    """An InferenceSession over model `m` and its initializers `inits`, and the arrays it needs kept.

    Large initializers are not copied into the model: the model names them as external data and the
    session is given the arrays themselves as shared initializers (SessionOptions.add_initializer):
    ORT builds its tensors over our buffers, without a copy of its own, and still prepacks them (ORT
    1.32: 102 MiB of MatMulNBits weights, 41k page faults and 0.40 s CPU instead of 67k and 0.47 s
    through add_external_initializers, which copies every array first). The external data they are
    named by is /dev/null, never read for a shared initializer; were ORT ever to read one (an optimizer
    reading a constant's values), that read fails at once, and the session is built again with the
    arrays handed over by add_external_initializers (copied, read as values). ORT may use such memory
    for the session's lifetime, so every array is kept, except a weight the installed ORT is seen to
    prepack (or copy) and never read again (`_prepacked`): dropped once the session exists."""
    from . import onnx_proto as helper
    from .onnx_proto import TensorProto

    numpy_helper = helper
    names, values, held = [], [], {}
    for k in list(inits):
        a = np.asarray(inits.pop(k), order="C")  # (ascontiguousarray would make a 0-d constant 1-d)
        if a.nbytes <= embed_bytes or a.dtype.hasobject:
            m.graph.initializer.append(numpy_helper.from_array(a, k))
            continue
        t = m.graph.initializer.add(name=k, data_type=helper.np_dtype_to_tensor_dtype(a.dtype), dims=a.shape,
                                    data_location=TensorProto.EXTERNAL)
        t.external_data.add(key="location", value=_PLACEHOLDER[1])
        names.append(k)
        values.append(ort.OrtValue.ortvalue_from_numpy(a))
        held[k] = a
    model = m.SerializeToString()
    try:
        sess = _build(ort, options, model, names, values, shared=True)
    except Exception:  # ORT read a shared initializer's (placeholder) data: hand the arrays over as values
        sess = _build(ort, options, model, names, values, shared=False)
    del values
    for k in _prepacked(ort, options, nodes, {k: a for k, a in held.items() if k not in constants}):
        del held[k]
    return sess, held


# The external data file shared initializers are named by: read by ORT only for an initializer it was
# not given (then it fails: "Random-access reads require a regular file"), never for one it was.
_PLACEHOLDER = ("/dev", "null")


def _build(ort, options: OrtOptions, model: bytes, names: list, values: list, shared: bool):
    so = options.session_options(ort)  # one per session: it holds that session's initializers
    if names and shared:
        # ORT keeps pointers to `values`, which the caller holds until the session exists
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", _PLACEHOLDER[0])
        for k, v in zip(names, values):
            so.add_initializer(k, v)
    elif names:
        so.add_external_initializers(names, values)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _prepacked(ort, options: OrtOptions, nodes, held: dict) -> set:
    """The arrays of `held` whose only consumer is one node the installed ORT prepacks them for into a
    buffer of its own, never reading them again (`_prepacks`): a MatMulNBits' weight, scales and zero
    points, a float MatMul's 2-D weight, a GatherBlockQuantized's codes, scales and zero points, each
    where the probe sees the installed ORT not read that input after the session is built."""
    users: dict[str, list] = {}
    for nd in nodes:
        for i in nd.input:
            users.setdefault(i, []).append(nd)
    out = set()
    for k, a in held.items():
        nd = users.get(k, [])
        if len(nd) != 1 or list(nd[0].input).count(k) != 1:
            continue
        n, at = nd[0], list(nd[0].input).index(k)
        if n.op_type == "MatMulNBits" and n.domain == "com.microsoft" and at in (1, 2, 3):
            attrs = {x.name: x.i for x in n.attribute}
            kind = ("MatMulNBits", attrs.get("bits", 4), attrs.get("block_size", 0), attrs.get("accuracy_level", 0))
        elif n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and at == 1 and a.ndim == 2 and a.dtype == np.float32:
            kind = ("MatMul",)
        elif n.op_type == "GatherBlockQuantized" and n.domain == "com.microsoft" and at in (0, 2, 3):
            attrs = {x.name: x.i for x in n.attribute}
            kind = ("GatherBlockQuantized", attrs.get("bits", 4), attrs.get("block_size", 128))
        else:
            continue
        if at in _prepacks(ort, options, kind):
            out.add(k)
    return out


_PREPACKS: dict[tuple, frozenset] = {}
_PREPACKS_LOCK = threading.Lock()


def _prepacks(ort, options: OrtOptions, kind: tuple) -> frozenset:
    """The inputs (positions) of this ORT's node of `kind` (("MatMulNBits", bits, block_size,
    accuracy_level), ("GatherBlockQuantized", bits, block_size) or ("MatMul",)) whose initializers it
    reads only while the session is built: in a small session over arrays handed over as `_session`
    does, overwriting that array leaves the product as it was (ORT 1.32's MatMulNBits at level 0 packs
    its codes but reads the scales we hand it at every call). Seen once per process and kind; whatever
    fails to show it keeps the arrays."""
    with _PREPACKS_LOCK:
        if kind not in _PREPACKS:
            _PREPACKS[kind] = _probe_prepack(ort, options, kind)
        return _PREPACKS[kind]


def _probe_prepack(ort, options: OrtOptions, kind: tuple) -> frozenset:
    from . import onnx_proto as helper
    from .onnx_proto import TensorProto

    try:
        if kind[0] == "MatMul":
            k, n = 64, 32
            arrays, at = {"b": _pattern((k, n), np.float32)}, {"b": 1}
            node, extra = helper.make_node("MatMul", ["x", "b"], ["y"]), []
            x = {"x": _pattern((1, k), np.float32)}
        elif kind[0] == "GatherBlockQuantized":  # x: row indices
            bits, block = kind[1:]
            n, k = 16, 2 * block
            arrays = {"b": _pattern((n, k * bits // 8), np.uint8), "s": _scales((n, 2)),
                      "z": _pattern((n, -(-(2 * bits) // 8)), np.uint8)}
            at = {"b": 0, "s": 2, "z": 3}
            node = helper.make_node("GatherBlockQuantized", ["b", "x", "s", "z"], ["y"], domain="com.microsoft",
                                    bits=bits, block_size=block, gather_axis=0, quantize_axis=1)
            extra, x = [helper.make_opsetid("com.microsoft", 1)], {"x": np.array([[3, 0, 15]], np.int64)}
        else:
            bits, block, level = kind[1:]
            n, k = 16, 2 * block
            ng = k // block
            arrays = {"b": _pattern((n, ng, block * bits // 8), np.uint8), "s": _scales((n * ng,)),
                      "z": _pattern((n * -(-(ng * bits) // 8),), np.uint8)}
            at = {"b": 1, "s": 2, "z": 3}
            node = helper.make_node("MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n,
                                    bits=bits, block_size=block, accuracy_level=level)
            extra = [helper.make_opsetid("com.microsoft", 1)]
            x = {"x": _pattern((1, k), np.float32)}
        g = helper.make_graph([node], "probe", [helper.make_tensor_value_info(
                                  "x", helper.np_dtype_to_tensor_dtype(x["x"].dtype), list(x["x"].shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), *extra])
        m.ir_version = min(m.ir_version, 10)
        # every array as an external initializer (none embedded), none dropped (all named as constants)
        sess, held = _session(ort, options, m, dict(arrays), [], set(arrays), embed_bytes=0)
        if set(held) != set(arrays):
            return frozenset()
        before, out = sess.run(None, x)[0], set()
        if not np.any(before != 0):
            return frozenset()
        for name, a in held.items():  # one array at a time: a product that changes reads that one
            a[...] = 255 - a if a.dtype == np.uint8 else 7.0
            after = sess.run(None, x)[0]
            if np.array_equal(before, after):
                out.add(at[name])
            before = after
        return frozenset(out)
    except Exception:
        return frozenset()


def _pattern(shape: tuple, dtype) -> np.ndarray:
    """Deterministic, varied values (uint8: all of 0..255; float: within [-4, 4)) without numpy.random,
    whose import alone is ~20-40 ms of a cold process's CPU."""
    a = (np.arange(int(np.prod(shape)), dtype=np.int64) * 37 + 11) % 256
    return (a.astype(np.uint8) if dtype == np.uint8 else (a / 32.0 - 4.0).astype(dtype)).reshape(shape)


def _scales(shape: tuple) -> np.ndarray:
    return 0.75 + _pattern(shape, np.float32) / 16  # in [0.5, 1)

