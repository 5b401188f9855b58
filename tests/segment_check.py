"""Shared by the segment-shape tests: record the signatures an ORT session's segments settle, then check
that runtime/segment_shapes.py gives every value onnx's shape inference gives, the same shape."""
from __future__ import annotations

import contextlib

import numpy as np


@contextlib.contextmanager
def recorded_settles(monkeypatch, forbid_onnx: bool = True):
    """Yields a list that collects (segment, args) of every shape settle; with `forbid_onnx`, a settle
    that would need onnx's inference fails the test."""
    import pytest

    from nadoo.runtime import ort_engine

    seen, real = [], ort_engine.OrtSegment._settle

    def record(self, args):
        seen.append((self, [np.array(a) if isinstance(a, np.ndarray) else a for a in args]))
        return real(self, args)

    with monkeypatch.context() as m:
        m.setattr(ort_engine.OrtSegment, "_settle", record)
        if forbid_onnx:
            m.setattr(ort_engine.OrtSegment, "_infer", lambda *a: pytest.fail("onnx inference used"))
        yield seen


def assert_shapes_agree(seen) -> int:
    """Every recorded segment settles with our rules alone, and each value onnx's inference settles has
    the same shape; returns how many values were compared (the caller checks it is not a vacuous few)."""
    compared = 0
    for seg, args in seen:
        assert seg.own_shapes, [n["op"] for n in seg.nodes]
        ours = seg._own_shapes(args, partial=False)
        assert ours is not None
        theirs = seg._infer(args, {k: v for k, v in ours[1].items() if k not in seg._consts})
        assert theirs is not None
        for o in (o for n in seg.nodes for o in n["outputs"] if o):
            assert o in ours[0]
            if o in theirs:
                assert ours[0][o] == theirs[o], o
                compared += 1
    return compared
