"""Where a cold MiniLM process spends its CPU: per stage, for nadoo on each engine and for the ORT script
tools/bench.py compares it with, and the floors under both (interpreter, numpy, onnxruntime imports).

    .venv/bin/python tools/cold_start.py               # 7 fresh processes per row, interleaved
    .venv/bin/python tools/cold_start.py --runs 11 --bits 4

Each row is a fresh process (the bench's bundle and inputs, bench.py's cold environment: bytecode cached,
one untimed round first) that times its own stages with time.process_time (CPU of every thread: a loaded
machine inflates it less than wall time) and prints them; medians per stage. OPENBLAS_NUM_THREADS=1
in every row, as the nadoo CLI sets it. nadoo's rows go through
`Session` (what `nadoo run --input` does, without the CLI's argument parsing and output file).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (HERE, os.path.dirname(HERE)) if p not in sys.path]

import bench  # noqa: E402
import bench_models as bm  # noqa: E402

_MARKS = """import sys, time, json
_T = [("start", time.process_time())]
def mark(n):
    _T.append((n, time.process_time()))
def report():
    import resource
    ru = resource.getrusage(resource.RUSAGE_SELF)  # the whole process, interpreter start included
    print(json.dumps({"stages": {b: c1 - c0 for (_, c0), (b, c1) in zip(_T, _T[1:])}, "total": ru.ru_utime + ru.ru_stime}))
"""
NADOO = _MARKS + """
import numpy as np; mark("import numpy")
import nadoo.runtime.cli; mark("import nadoo CLI")
import nadoo.runtime as nd
from nadoo.runtime import session; mark("import nadoo session")
engine, bits = sys.argv[3], sys.argv[4]
if engine == "ort":
    import onnxruntime; mark("import onnxruntime")
    from nadoo.runtime import ort_engine; mark("import nadoo ORT engine")
    import onnxruntime as ort
    real_init = ort.InferenceSession._create_inference_session
    spent = [0.0]
    def timed(*a, **k):
        c = time.process_time()
        try:
            return real_init(*a, **k)
        finally:
            spent[0] += time.process_time() - c
    ort.InferenceSession._create_inference_session = timed
with np.load(sys.argv[2]) as z:
    feeds = {k: z[k] for k in z.files}
mark("read input")
s = nd.Session(sys.argv[1], policy=nd.Policy(bits=bits), engine=engine); mark("open")
if engine == "ort":  # the open's share spent creating InferenceSessions (the prepack probe's included)
    _T.insert(-1, ("ORT sessions", _T[-2][1] + spent[0]))
    _T[-1] = ("open: the rest (read, decode, build)", _T[-1][1])
s.run(None, feeds); mark("first call")
report()
"""
ORT = _MARKS + """
import numpy as np; mark("import numpy")
import onnxruntime as ort; mark("import onnxruntime")
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"]); mark("InferenceSession (file)")
with np.load(sys.argv[2]) as z:
    feeds = {i.name: z[i.name] for i in s.get_inputs()}
mark("read input")
s.run(None, feeds); mark("first call")
report()
"""
FLOOR = _MARKS + """
import numpy; mark("import numpy")
import onnxruntime; mark("import onnxruntime")
report()
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--bits", default="8")
    args = ap.parse_args(argv)
    man = bm.minilm(bench.WORK)
    b1, py = man["inputs"]["b1"], sys.executable
    rows = {f"nadoo ORT engine, q{args.bits}": [py, "-c", NADOO, man["ndc"], b1, "ort", args.bits],
            f"nadoo NumPy engine, q{args.bits}": [py, "-c", NADOO, man["ndc"], b1, "numpy", args.bits],
            "ORT script, fp32 .onnx": [py, "-c", ORT, man["onnx"], b1],
            "floor: python + numpy + onnxruntime": [py, "-c", FLOOR]}
    # OPENBLAS_NUM_THREADS=1 as the nadoo CLI sets it for itself (rows here call Session, not the CLI)
    env, rng, got = {**bench.cold_env(), "OPENBLAS_NUM_THREADS": "1"}, random.Random(0), {n: [] for n in rows}
    names = list(rows)
    for rnd in range(args.runs + 1):  # round 0 untimed: bytecode and page cache
        rng.shuffle(names)
        for n in names:
            p = subprocess.run([*rows[n]], capture_output=True, text=True, env=env, cwd=bench.ROOT)
            if p.returncode:
                print(f"{n} failed: {p.stderr[-1500:]}", file=sys.stderr)
                return 1
            if rnd:
                got[n].append(json.loads(p.stdout.strip().splitlines()[-1]))
    print(f"CPU ms per stage, median of {args.runs} fresh processes (load {os.getloadavg()[0]:.1f} at the end)")
    for n, runs in got.items():
        print(f"\n{n}: {np.median([r['total'] for r in runs]) * 1e3:.0f} ms for the whole process")
        for stage in runs[0]["stages"]:
            print(f"  {stage:40s} {np.median([r['stages'][stage] for r in runs]) * 1e3:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
