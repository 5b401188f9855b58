"""Builds the golden bundle `tiny.ndc` and its expected decoded tensors `tiny.expected.json`.

Run from the repository root: `python format_spec/golden/make_golden.py`. The tests rebuild it and
require byte-identical output (writer determinism) and decode the committed file with the reader.

The model is y = relu(x @ W.T + b) with W 4x8 in two chunks of two rows, group size 4. Every weight
is one of -1, -0.5, 0, 0.5, so each tier decodes exactly and can be checked by hand:
  q2: scale 0.5,    min -1 -> codes 0..3   (w = 0.5*q - 1)
  q4: scale 0.125,  min -1 -> codes 0,4,8,12
  q8: scale 1/128,  min -1 -> codes 0,64,128,192
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from nadoo.compiler.writer import BundleWriter
from nadoo.runtime import qcodec

HERE = Path(__file__).resolve().parent

W = (np.array([
    [0, 1, 2, 3, 3, 2, 1, 0],
    [1, 1, 1, 1, 2, 2, 2, 2],
    [3, 0, 3, 0, 0, 3, 0, 3],
    [2, 2, 2, 2, 2, 2, 2, 2],
], dtype=np.float32) * 0.5 - 1.0)
B = np.array([0.5, -0.5, 0.0, 1.0], dtype=np.float32)
X = np.array([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=np.float32) / 8
BOUNDS = [0, 2, 4]
G = 4
SCALE = {2: 0.5, 4: 0.125, 8: 1 / 128}


def build(path: Path) -> dict:
    y = np.maximum(X @ W.T + B, 0).astype(np.float32)
    graph = {
        "opset": {"": 18, "nadoo": 1},
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 8]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 4]}],
        "nodes": [
            {"op": "ChunkedLinear", "domain": "nadoo", "name": "fc", "inputs": ["x", "fc.bias"], "outputs": ["h"],
             "attrs": {"weight": "fc.weight"}},
            {"op": "Relu", "domain": "", "name": "relu", "inputs": ["h"], "outputs": ["y"], "attrs": {}},
        ],
        "constants": ["fc.bias"],
    }
    with BundleWriter(path, alignment=64) as w:
        graph_pid = w.add_json(graph)
        const_pid = w.add_array(B, compress="never")
        tiers = {"f32": [], "q8": [], "q4": [], "q2": []}
        for lo, hi in zip(BOUNDS, BOUNDS[1:]):
            chunk = W[lo:hi]
            tiers["f32"].append(w.add_array(chunk, compress="never"))
            for bits in (8, 4, 2):
                s = SCALE[bits]
                codes = np.rint((chunk + 1.0) / s).astype(np.uint8)
                ng = chunk.shape[1] // G
                scales = np.full((hi - lo, ng), s, np.float16)
                mins = np.full((hi - lo, ng), -1.0, np.float16)
                tiers[f"q{bits}"].append(w.add_payload(qcodec.pack(codes, scales, mins, bits, G), compress="never"))
        xin = w.add_array(X, compress="never")
        yout = w.add_array(y, compress="never")
        index = {
            "format": "ndc",
            "producer": {"name": "nadoo", "version": "golden"},
            "model": {"source": "format_spec/golden/make_golden.py"},
            "graph": graph_pid,
            "profile": None,
            "constants": {"payload": const_pid,
                          "tensors": [{"name": "fc.bias", "dtype": "float32", "shape": [4], "offset": 0}]},
            "sample": {"inputs": [{"name": "x", "dtype": "float32", "shape": [1, 8], "payload": xin}],
                       "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 4], "payload": yout}]},
            "tensors": [{
                "name": "fc.weight", "kind": "linear", "shape": [4, 8], "group_size": G, "bounds": BOUNDS,
                "tiers": tiers,
                "errors": {t: {"mse": [0.0, 0.0], "out_err": [0.0, 0.0]} for t in ("q8", "q4", "q2")},
            }],
            "stats": {"dense_fp32_weight_bytes": int(W.nbytes)},
        }
        w.finish(index)
    return {"fc.weight": W.tolist(), "fc.bias": B.tolist(), "x": X.tolist(), "y": y.tolist()}


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    expected = build(out / "tiny.ndc")
    (out / "tiny.expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {out / 'tiny.ndc'} and {out / 'tiny.expected.json'}")
