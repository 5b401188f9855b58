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
    session is given the arrays (SessionOptions.add_external_initializers), as initializers, so ORT
    still prepacks them. ORT may use such memory for the session's lifetime, so every array is kept,
    except a weight the installed ORT is seen to prepack (or copy) and never read again (`_prepacked`):
    dropped once the session exists (ORT 1.32 copies external initializers, then prepacks)."""
    from . import onnx_proto as helper
    from .onnx_proto import TensorProto

    numpy_helper = helper
    so = options.session_options(ort)  # one per session: it holds that session's initializers
    names, values, held = [], [], {}
    for k in list(inits):
        a = np.asarray(inits.pop(k), order="C")  # (ascontiguousarray would make a 0-d constant 1-d)
        if a.nbytes <= embed_bytes or a.dtype.hasobject:
            m.graph.initializer.append(numpy_helper.from_array(a, k))
            continue
        t = m.graph.initializer.add(name=k, data_type=helper.np_dtype_to_tensor_dtype(a.dtype), dims=a.shape,
                                    data_location=TensorProto.EXTERNAL)
        t.external_data.add(key="location", value="nadoo-memory")
        names.append(k)
        values.append(ort.OrtValue.ortvalue_from_numpy(a))
        held[k] = a
    if names:
        so.add_external_initializers(names, values)
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del so, values
    for k in _prepacked(ort, options, nodes, {k: a for k, a in held.items() if k not in constants}):
        del held[k]
    return sess, held


def _prepacked(ort, options: OrtOptions, nodes, held: dict) -> set:
    """The arrays of `held` whose only consumer is one node the installed ORT prepacks them for into a
    buffer of its own, never reading them again (`_prepacks`): a MatMulNBits' weight, scales and zero
    points, a float MatMul's 2-D weight, a GatherBlockQuantized's codes, scales and zero points (ORT
    1.32 copies external initializers; the probe says whether the installed one does)."""
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
        if _prepacks(ort, options, kind):
            out.add(k)
    return out


_PREPACKS: dict[tuple, bool] = {}
_PREPACKS_LOCK = threading.Lock()


def _prepacks(ort, options: OrtOptions, kind: tuple) -> bool:
    """Whether this ORT's node of `kind` (("MatMulNBits", bits, block_size, accuracy_level) or
    ("MatMul",)) reads its weight initializers only while the session is built: a small session over
    arrays handed over as external initializers must give the same product after the arrays are
    overwritten. Seen once per process and kind; whatever fails to show it keeps the arrays."""
    with _PREPACKS_LOCK:
        if kind not in _PREPACKS:
            _PREPACKS[kind] = _probe_prepack(ort, options, kind)
        return _PREPACKS[kind]


def _probe_prepack(ort, options: OrtOptions, kind: tuple) -> bool:
    from . import onnx_proto as helper
    from .onnx_proto import TensorProto

    try:
        if kind[0] == "MatMul":
            k, n = 64, 32
            arrays = {"b": _pattern((k, n), np.float32)}
            node, extra = helper.make_node("MatMul", ["x", "b"], ["y"]), []
            x = {"x": _pattern((1, k), np.float32)}
        elif kind[0] == "GatherBlockQuantized":  # x: row indices
            bits, block = kind[1:]
            n, k = 16, 2 * block
            arrays = {"b": _pattern((n, k * bits // 8), np.uint8), "s": _scales((n, 2)),
                      "z": _pattern((n, -(-(2 * bits) // 8)), np.uint8)}
            node = helper.make_node("GatherBlockQuantized", ["b", "x", "s", "z"], ["y"], domain="com.microsoft",
                                    bits=bits, block_size=block, gather_axis=0, quantize_axis=1)
            extra, x = [helper.make_opsetid("com.microsoft", 1)], {"x": np.array([[3, 0, 15]], np.int64)}
        else:
            bits, block, level = kind[1:]
            n, k = 16, 2 * block
            ng = k // block
            arrays = {"b": _pattern((n, ng, block * bits // 8), np.uint8), "s": _scales((n * ng,)),
                      "z": _pattern((n * -(-(ng * bits) // 8),), np.uint8)}
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
            return False
        before = sess.run(None, x)[0]
        for a in held.values():
            a[...] = 255 - a if a.dtype == np.uint8 else 7.0
        after = sess.run(None, x)[0]
        return bool(np.any(before != 0) and np.array_equal(before, after))
    except Exception:
        return False


def _pattern(shape: tuple, dtype) -> np.ndarray:
    """Deterministic, varied values (uint8: all of 0..255; float: within [-4, 4)) without numpy.random,
    whose import alone is ~20-40 ms of a cold process's CPU."""
    a = (np.arange(int(np.prod(shape)), dtype=np.int64) * 37 + 11) % 256
    return (a.astype(np.uint8) if dtype == np.uint8 else (a / 32.0 - 4.0).astype(dtype)).reshape(shape)


def _scales(shape: tuple) -> np.ndarray:
    return 0.75 + _pattern(shape, np.float32) / 16  # in [0.5, 1)

