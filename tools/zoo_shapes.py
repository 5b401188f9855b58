"""Do the ORT engine's segments settle their shapes without onnx on the zoo's models, to onnx's shapes?

    python tools/zoo_shapes.py                          # every zoo model, each export form
    python tools/zoo_shapes.py --models bert,gpt2 --forms onnx

Per model and form (tools/zoo.py's export, compiled on 8 random samples, 8-bit): open it on the ORT and
NumPy engines, run batch 1 and 3, and for every shape signature a segment settled report whether
runtime/segment_shapes.py covered every node, how many values it gave the same shape as onnx's
inference (`compared`) and how many differ (`mismatch`, must be 0), and the engines' largest output
difference. Bundles are kept under work_out/zoo_shapes/ (delete a file to rebuild it).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tools.zoo import FORMS, MODELS, _quiet, build, export  # noqa: E402

WORK = os.path.join(ROOT, "work_out", "zoo_shapes")


def check(name: str, form: str) -> str:
    import nadoo.runtime as nd
    from nadoo.compiler.pipeline import CompileOptions, compile_model
    from nadoo.runtime import ort_engine
    from nadoo.runtime.segment_shapes import covers

    z = build(name)
    ndc = os.path.join(WORK, f"{name}.{form}.ndc")
    if not os.path.exists(ndc):
        calib = os.path.join(WORK, f"{name}.calib.npz")
        np.savez(calib, **z.draw(8, 0))
        src = export(z, form, WORK)
        with _quiet():
            compile_model(src, ndc, CompileOptions(calib=calib), quiet=True)
    seen, real = [], ort_engine.OrtSegment._settle

    def record(self, args):
        seen.append((self, [np.array(a) if isinstance(a, np.ndarray) else a for a in args]))
        return real(self, args)

    ort_engine.OrtSegment._settle = record
    uncovered, diffs = collections.Counter(), []
    try:
        with nd.Session(ndc, policy=nd.Policy(bits="8"), engine="ort") as o, \
                nd.Session(ndc, policy=nd.Policy(bits="8"), engine="numpy") as n:
            for seg in o.segments:
                ops = iter(seg.whole)
                for node in seg.nodes:
                    op = next(ops) if (node.get("domain") or "") == "nadoo" else None
                    if not covers(node, op):
                        uncovered[node["op"]] += 1
            for batch, seed in ((1, 3), (3, 4)):
                feeds = z.draw(batch, seed)
                diffs.append(float(np.abs(o.run(None, feeds)[0] - n.run(None, feeds)[0]).max()))
    finally:
        ort_engine.OrtSegment._settle = real
    compared = mismatch = open_ = 0
    for seg, args in seen:
        ours = seg._own_shapes(args, partial=not seg.own_shapes)
        theirs = seg._infer(args, {k: v for k, v in ours[1].items() if k not in seg._consts})
        if not seg.own_shapes or theirs is None:
            open_ += 1
            continue
        for o in (o for node in seg.nodes for o in node["outputs"] if o):
            if o in theirs:
                compared += 1
                mismatch += ours[0].get(o) != theirs[o]
    return (f"{name} {form}: {len(seen)} settles, without onnx: {all(s.own_shapes for s, _ in seen)}, "
            f"uncovered {dict(uncovered) or '-'}, compared {compared}, mismatch {mismatch}, not compared {open_}, "
            f"engines differ by {max(diffs):.1e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--forms", default=",".join(FORMS))
    args = ap.parse_args(argv)
    os.makedirs(WORK, exist_ok=True)
    for name in args.models.split(","):
        for form in args.forms.split(","):
            try:
                print(check(name, form), flush=True)
            except Exception as e:  # an export or compile the zoo itself reports: listed, the rest goes on
                print(f"{name} {form}: failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
