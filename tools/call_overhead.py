"""Print (not assert) what a warm MiniLM call costs beside ONNX Runtime's own kernels (issue #13).

    PYTHONPATH=.pp .venv/bin/python tools/call_overhead.py [--threads 1] [--batch b1] [--runs 150]

Rows, interleaved in a fresh random order every round, in one process: nadoo dense q8/q4 on the ORT
engine (`Session.run`), the same plan's ORT session called bare (when one segment is the whole plan:
what is left is then the Session's per-call Python), and ONNX Runtime fp32 on the source .onnx at the
same thread count. Medians of wall time and of the calling thread's CPU time: on a loaded machine the
CPU time holds better, and at --threads 1 ORT computes in the calling thread, so it is the whole cost.
The bundle and inputs are tools/bench.py's (built there on first use). To measure another revision,
put its runtime/compiler first on PYTHONPATH (tools/bench.py --rev exports one under work_out/bench/).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the nadoo CLI sets it
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (HERE, os.path.dirname(HERE)) if p not in sys.path]

import bench_models as bm  # noqa: E402
from bench import WORK, load_npz  # noqa: E402


def rows(man: dict, feeds: dict, threads: int, bits: list[str]) -> dict:
    import onnxruntime as ort

    import nadoo.runtime as nd

    out = {}
    for b in bits:
        s = nd.Session(man["ndc"], policy=nd.Policy("dense", bits=b), engine="ort", threads=threads or None)
        f = {i.name: feeds[i.name] for i in s.get_inputs()}
        out[f"nadoo dense q{b} (Session.run)"] = lambda s=s, f=f: s.run([man["output"]], f)
        segs = s.segments
        if len(segs) == 1 and segs[0].nodes == s.plan.nodes:
            seg, sf = segs[0], {n: f[n] for n in segs[0].inputs}
            out[f"nadoo dense q{b} bare ORT session"] = lambda seg=seg, sf=sf: seg.sess.run(seg.outputs, sf)
        print(f"q{b}: {len(segs)} ORT segment(s), {s.ort_nodes} of {len(s.plan.nodes)} nodes in ORT", file=sys.stderr)
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    o = ort.InferenceSession(man["onnx"], so, providers=["CPUExecutionProvider"])
    f = {i.name: feeds[i.name] for i in o.get_inputs()}
    out["ORT fp32"] = lambda: o.run([man["output"]], f)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads, both sides (0: ORT's default)")
    ap.add_argument("--batch", default="b1", choices=["b1", "b8"])
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--runs", type=int, default=150)
    a = ap.parse_args(argv)
    man = bm.minilm(WORK)
    fns = rows(man, load_npz(man["inputs"][a.batch]), a.threads, a.bits.split(","))
    for fn in fns.values():
        fn(), fn()
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    rng = random.Random(0)
    for _ in range(a.runs):
        names = list(fns)
        rng.shuffle(names)
        for k in names:
            t, c = time.perf_counter(), time.thread_time()
            fns[k]()
            cpu[k].append(time.thread_time() - c)
            wall[k].append(time.perf_counter() - t)
    rw, rc = np.median(wall["ORT fp32"]), np.median(cpu["ORT fp32"])
    print(f"MiniLM {a.batch}, threads {a.threads or 'default'}, {a.runs} interleaved rounds, load {os.getloadavg()[0]:.1f}")
    print("| row | wall ms | ×ORT fp32 | thread CPU ms | ×ORT fp32 |\n|---|---|---|---|---|")
    for k in fns:
        w, c = np.median(wall[k]), np.median(cpu[k])
        print(f"| {k} | {w * 1e3:.2f} | {w / rw:.3f} | {c * 1e3:.2f} | {c / rc:.3f} |")


if __name__ == "__main__":
    main()
