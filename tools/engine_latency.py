"""Print (not assert) MiniLM latency: nadoo Plan vs onnxruntime, batch 1 x 32 tokens, median of 30 runs.

    python tools/engine_latency.py [--runs 30] [--onnx cached.onnx] [--profile]

NumPy's BLAS thread count is fixed when numpy is imported: run with OPENBLAS_NUM_THREADS=1 (or =2) to compare
single/multi-threaded; onnxruntime is measured with its default and with 1 intra-op thread.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see the report: multi-threaded BLAS thrashes at batch 1
import numpy as np  # noqa: E402


def _median_ms(fn, runs, warmup=5):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1e3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--onnx", help="use/keep this exported MiniLM .onnx (exported if missing)")
    ap.add_argument("--profile", action="store_true", help="also print time per op type")
    args = ap.parse_args(argv)

    import onnx
    import onnxruntime as ort
    from examples import models
    from nadoo.compiler.onnx_to_graph import onnx_to_graph
    from nadoo.runtime.engine import Plan

    tok, model = models.load_minilm()
    feeds = models.minilm_inputs(tok, (models.SENTENCES * 8)[:args.batch], seq_len=args.seq)
    path = args.onnx or os.path.join(tempfile.mkdtemp(), "minilm.onnx")
    if not os.path.exists(path):
        axes = {k: {0: "batch", 1: "seq"} for k in feeds}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models.export_onnx(model, feeds, path, list(feeds), ["last_hidden_state", "pooler_output"], axes)

    t = time.perf_counter()
    graph, consts = onnx_to_graph(onnx.load(path))
    plan = Plan(graph, consts)
    build_ms = (time.perf_counter() - t) * 1e3

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess1 = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    ours = plan.run(feeds)
    ref = sess.run(None, feeds)
    err = max(float(np.abs(a - b).max()) for a, b in zip(ours, ref))

    t_ort = _median_ms(lambda: sess.run(None, feeds), args.runs)
    t_ort1 = _median_ms(lambda: sess1.run(None, feeds), args.runs)
    t_nadoo = _median_ms(lambda: plan.run(feeds), args.runs)
    print(f"MiniLM-L6 batch {args.batch} x {args.seq} tokens, median of {args.runs} runs "
          f"(OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'default')}, cpus={os.cpu_count()})")
    print(f"  graph: {len(graph['nodes'])} nodes, {len(consts)} constants; convert+plan {build_ms:.0f} ms; "
          f"max |nadoo - ort| = {err:.2e}")
    print(f"  onnxruntime (default threads): {t_ort:8.2f} ms")
    print(f"  onnxruntime (1 thread):        {t_ort1:8.2f} ms")
    print(f"  nadoo Plan:                    {t_nadoo:8.2f} ms   ({t_nadoo / t_ort:.2f}x ORT default, "
          f"{t_nadoo / t_ort1:.2f}x ORT 1-thread)")
    if args.profile:
        tot: dict[str, float] = {}
        for _ in range(args.runs):
            _, prof = plan.run_profile(feeds)
            for k, v in prof.items():
                tot[k] = tot.get(k, 0.0) + v / args.runs
        for k, v in sorted(tot.items(), key=lambda kv: -kv[1]):
            print(f"    {k:24s} {v * 1e3:7.3f} ms")


if __name__ == "__main__":
    main()
