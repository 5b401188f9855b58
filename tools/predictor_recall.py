"""Recall of the cheap top-k predictors against the exact oracle, on inputs outside calibration.

    python tools/predictor_recall.py BUNDLE INPUTS.npz [--topk 0.5] [--bits 4]

For each sample (one per call, as deployed), every routed layer's chosen chunks under the `sketch`
and `static` predictors are compared with the oracle's (which computes the full product):
recall = |predicted ∩ oracle| / |oracle|. Also prints the output error of each predictor vs dense.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from nadoo.runtime import Policy, Session  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("inputs", help=".npz keyed by input name, first axis = samples")
    ap.add_argument("--topk", type=float, default=0.5)
    ap.add_argument("--bits", default="4")
    ap.add_argument("--limit", type=int, default=64)
    a = ap.parse_args()
    with np.load(a.inputs) as z:
        feeds = {k: z[k] for k in z.files}
    n = min(a.limit, len(next(iter(feeds.values()))))
    sessions = {p: Session(a.bundle, Policy("topk", bits=a.bits, topk=a.topk, predictor=p))
                for p in ("sketch", "static", "oracle")}
    dense = Session(a.bundle, Policy(bits=a.bits))
    hits = {p: {} for p in ("sketch", "static")}
    err = {p: [] for p in sessions}
    for i in range(n):
        one = {k: v[i : i + 1] for k, v in feeds.items()}
        ref = dense.run(None, one)[0].astype(np.float64).ravel()
        chosen = {}
        for p, s in sessions.items():
            y = s.run(None, one)[0].astype(np.float64).ravel()
            err[p].append(1 - y @ ref / (np.linalg.norm(y) * np.linalg.norm(ref) + 1e-30))
            chosen[p] = {op.entry.name: set(op.selected.tolist()) for op in s.ops if op.selected is not None}
        for p in hits:
            for name, oracle in chosen["oracle"].items():
                h, t = hits[p].get(name, (0, 0))
                hits[p][name] = (h + len(chosen[p].get(name, set()) & oracle), t + len(oracle))
    print(f"{n} samples, top-k {a.topk:g}, {a.bits}-bit; recall vs oracle per routed layer")
    for name in hits["sketch"]:
        cells = "  ".join(f"{p} {hits[p][name][0] / max(hits[p][name][1], 1):.3f}" for p in hits)
        print(f"  {name}: {cells}")
    for p in hits:
        tot = [sum(v[i] for v in hits[p].values()) for i in (0, 1)]
        print(f"overall {p} recall {tot[0] / max(tot[1], 1):.3f}")
    for p, e in err.items():
        print(f"output cosine vs dense, {p:>6}: mean {1 - np.mean(e):.5f}  min {1 - np.max(e):.5f}")


if __name__ == "__main__":
    main()
