"""Why a sparse selection loses perplexity: on one dense prefill, how much of each global layer's dense
attention the keys each selection would read keep.

Runs one dense prefill of the first L tokens of the texts (BOS first), keeps the queries and keys of the
global-attention layers, then for the last `--rows` query rows (and rows sampled every 256 before them)
scores each selection offline: "mass" is the dense attention probability on the keys it reads (mean over
query heads and rows; 1 = dense), "err" the relative error of the attention output, "kv" the KV bytes read
per query against dense (first stages included). The selections are the runtime's own (page_mask,
round_outward) where the runtime has them; the rest spell theirs out here.

    PYTHONPATH=.pp .venv/bin/python tools/sparse_attention_choice.py BUNDLE --text GPL-2,GPL-3 --context 8192
"""
from __future__ import annotations

import argparse
import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

import nadoo.runtime as nd  # noqa: E402
import nadoo.runtime.lm_kernels as K  # noqa: E402
from nadoo.runtime.generate import LanguageModel  # noqa: E402
from nadoo.runtime.sparse_attention import AttentionPolicy, page_bounds, page_mask, round_outward  # noqa: E402

F16 = np.dtype(np.float16)


def softmax(s, mask):
    s = np.where(mask, s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def topmask(w, k):
    out = np.zeros(w.shape, bool)
    np.put_along_axis(out, np.argsort(-w, axis=-1)[..., :k], True, axis=-1)
    return out


def selections(q, k, qpos, scale, budget, sink, win):
    """(name, mask [rows, keys], first-stage bytes in keys) for one KV head; q [g, rows, D], k [M, D]."""
    g, rows, d = q.shape
    m = k.shape[0]
    kpos = np.arange(m)
    allowed = kpos[None] <= qpos[:, None]
    s = scale * np.einsum("hrd,md->hrm", q, k)
    mass = np.where(allowed[None], softmax(s, allowed[None]), 0).sum(0)
    base = ((kpos[None] < sink) | (kpos[None] > qpos[:, None] - win)) & allowed
    free = allowed & ~base
    nk = budget - sink - win

    def rerank(cand):  # exact weights over the candidates choose the attended keys; their keys were read
        w = np.where(cand, softmax(s, (base | cand)[None]).sum(0), -1)
        return base | (topmask(w, nk) & cand), 0.5 * (base | cand).sum(1).mean() - 0.5 * nk

    yield "oracle (exact top keys)", topmask(np.where(allowed, mass, -1), budget) & allowed, 0.0
    for page in (8, 16, 32, 64):
        pm = np.add.reduceat(np.where(free, mass, 0), np.arange(0, m, page), axis=1)
        if page == 16:
            yield f"page oracle p{page} (exact best pages)", base | (topmask(pm, nk // page)[:, kpos // page] & free), 0.0
        lo, hi = page_bounds(k[None], kpos, page, (m - 1) // page + 1)
        lo = round_outward(lo, F16, -np.inf).astype(np.float32)
        hi = round_outward(hi, F16, np.inf).astype(np.float32)
        bound_keys = (m - win) / page  # a page's float16 min and max cost one float16 key and value
        for cand in (None, 1536) if page in (16, 64) else (None,):
            pol = AttentionPolicy("pages", budget, page=page, window=win, sink=sink, candidates=cand, kv_dtype="float16")
            sel = page_mask(pol, q.reshape(1, g * rows, d), g, lo, hi, kpos, qpos, scale)[0][0] & allowed
            if cand is None:
                yield f"pages p{page} (Quest bound)", sel, bound_keys
            else:
                final, extra = rerank(sel & ~base)
                yield f"pages p{page} candidates {cand}", final, bound_keys + extra
    for r in (16,):
        idx = np.argsort(-np.abs(q).sum(0), axis=-1)[:, :r]
        qi = np.take_along_axis(q, idx[None], axis=-1)
        approx = np.einsum("hrj,mrj->hrm", qi, k[:, idx]) * scale
        tau = np.sqrt(np.abs(qi).sum(-1) / np.abs(q).sum(-1))[..., None]
        aw = np.where(free, softmax(approx / tau, allowed[None]).sum(0), -1)
        final, extra = rerank(topmask(aw, budget + budget // 2) & free)
        yield f"sparq r{r} candidates {budget + budget // 2}", final, r / d / 2 * m + extra
    yield "__dense__", (s, allowed), 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--bits", default="8")
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-2,/usr/share/common-licenses/GPL-3")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=128, help="last query rows scored (the tool's continuation)")
    ap.add_argument("--budget", type=int, default=1024)
    args = ap.parse_args()
    sess = nd.Session(args.bundle, policy=nd.Policy(bits=args.bits))
    lm = LanguageModel(sess)
    ids = lm.encode("\n\n".join(open(f, encoding="utf-8").read() for f in args.text.split(",")))[:args.context]
    if len(ids) < args.context:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than --context {args.context}")
    sess.state.set_attention(AttentionPolicy(kv_dtype="float16"))
    layers, orig = [], K._attend

    def keep(q4, view, qstart, cache, out, **kw):
        orig(q4, view, qstart, cache, out, **kw)
        if kw["window"] is None and q4.shape[2] > 1:  # a global layer's prefill
            layers.append((q4.copy(), view.take()[0], view.take()[1], out.copy(), kw["scale"]))

    K._attend = keep
    try:
        lm.forward(ids, 0, keep=1)
    finally:
        K._attend = orig
    pol = AttentionPolicy("pages", args.budget, kv_dtype="float16")
    print(f"# {len(ids)} tokens, budget {args.budget} (sink {pol.sink}, window {pol.window}); uptime {os.getloadavg()}")
    m = len(ids)
    for li, (q4, keys, values, out, scale) in enumerate(layers):
        for what, qpos in ((f"last {args.rows} rows", np.arange(m - args.rows, m)),
                           ("rows every 256 before", np.arange(pol.budget + 128, m - args.rows, 256))):
            print(f"global layer {li}, {what}")
            for kv in range(q4.shape[0]):
                q, k, v, od = q4[kv][:, qpos], keys[kv], values[kv], out[kv][:, qpos]
                sels = list(selections(q, k, qpos, scale, args.budget, pol.sink, pol.window))
                s, _ = sels.pop()[1]
                p = softmax(s, (np.arange(m)[None] <= qpos[:, None])[None])
                for name, mask, first in sels:
                    o = softmax(s, mask[None]) @ v
                    err = (np.linalg.norm(o - od, axis=-1) / np.linalg.norm(od, axis=-1)).mean()
                    kvr = (first + mask.sum(1).mean()) / (qpos + 1).mean()
                    print(f"  kv head {kv} {name:34s} mass {(p * mask[None]).sum(-1).mean():.3f} err {err:.3f} "
                          f"kv {kvr:.3f}x", flush=True)


if __name__ == "__main__":
    main()
