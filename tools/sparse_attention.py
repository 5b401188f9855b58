"""Sparse attention on a language model bundle: fidelity and cost of each policy against dense.

For each context length L (the first L tokens of the perplexity text, GPL-3, BOS first) and each policy:
one prefill of L tokens under the policy, the perplexity of the last `--cont` tokens (the continuation;
each of them attends to everything before it, as the policy allows) and their top-1 agreement with
dense attention's, then `--decode` greedy decode steps at that context for the KV bytes read and the
attention time per token (and the agreement of those greedy tokens with dense's). Then retrieval
prompts: a fact stated early, GPL-3 text as filler, the question at the end; accuracy per policy.

    PYTHONPATH=.pp .venv/bin/python tools/sparse_attention.py work_out/gemma.ndc --plot sparse.png

Heavy on a shared machine: every row is one long prefill; keep the contexts few.
"""
from __future__ import annotations

import argparse
import json
import os
import time

# as the CLI: one BLAS thread (a decode step's small products lose more to waking threads than they gain)
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

import nadoo.runtime as nd  # noqa: E402
from nadoo.runtime.generate import LanguageModel, _nll  # noqa: E402
from nadoo.runtime.sparse_attention import AttentionPolicy  # noqa: E402

TEXT = "/usr/share/common-licenses/GPL-3"  # the perplexity text of tools/gemma_figures.py
FACTS = [("blue door", "4817"), ("old lighthouse", "2093"), ("garden shed", "7351"), ("red bicycle", "6624")]


def policy(spec: str, budget: int, kv_dtype: str) -> AttentionPolicy:
    """A policy from its name, optionally with settings: "pages", "pages:candidates=1536:page=32"."""
    kind, *opts = spec.split(":")
    kw = {k: int(v) for k, v in (o.split("=") for o in opts)}
    return AttentionPolicy(kv_dtype=kv_dtype) if kind == "dense" else AttentionPolicy(kind, budget, kv_dtype=kv_dtype,
                                                                                      **kw)


def mark(state):
    glob = sum(c.bytes_read for c in state.layers.values() if c.window is None or not c.ring)
    return state.bytes_read, glob, state.attention_s, time.perf_counter(), state.attention_cpu_s


def measure(sess, lm, ids, L, cont, decode) -> dict:
    win = ids[:L]
    m0 = mark(sess.state)
    logits, _ = lm.forward(win, 0, keep=cont + 1)
    m1 = mark(sess.state)
    nll = _nll(logits[:-1], np.asarray(win[L - cont:]))
    top1 = logits[:-1].argmax(axis=-1)
    toks, t = [], int(logits[-1].argmax())
    for i in range(decode):
        toks.append(t)
        step, _ = lm.forward([t], L + i)
        t = int(step[-1].argmax())
    m2 = mark(sess.state)
    return {"nll": float(nll.mean()), "top1": top1, "greedy": toks, "prefill_s": m1[3] - m0[3],
            "kv_bytes_read_per_token": (m2[0] - m1[0]) / decode,
            "kv_bytes_read_per_token_global": (m2[1] - m1[1]) / decode,
            "attention_s_per_token": (m2[2] - m1[2]) / decode, "attention_cpu_s_per_token": (m2[4] - m1[4]) / decode,
            "kv_cache_bytes": sess.state.nbytes}


def retrieval_prompt(lm, filler_ids, thing, code, before=200):
    head = lm.encode("Remember this. ")
    fact = lm.encode(f" The password for the {thing} is {code}. ")[1:]  # no second BOS
    q = lm.encode(f"\n\nQuestion: what is the password for the {thing}?\nAnswer: The password for the {thing} is")[1:]
    return head + filler_ids[1:before] + fact + filler_ids[before:] + q


def retrieval(sess, lm, ids, kinds, budget, kv_dtype, filler) -> dict:
    acc = {}
    for kind in kinds:
        sess.state.set_attention(policy(kind, budget, kv_dtype))
        hits = []
        for thing, code in FACTS:
            # digits are one token each: a space and four digits, and a token to spare
            r = sess.generate(prompt_ids=retrieval_prompt(lm, ids[:filler], thing, code), max_new_tokens=6)
            hits.append(code in r.text.replace(" ", ""))
            print(f"  retrieval {kind:6s} {thing:15s} -> {r.text!r} {'ok' if hits[-1] else 'miss'}", flush=True)
        acc[kind] = sum(hits) / len(hits)
    return acc


def table(out) -> str:
    """The README table (markdown)."""
    lines = ["| context | policy | perplexity (vs dense) | top-1 = dense | greedy = dense | KV read / token (all layers; "
             "global layers vs dense) | attention CPU / token (vs dense) | KV cache |", "|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['context']} | {r['policy']} | {r['ppl']:.3f} ({(r['ppl_vs_dense'] - 1) * 100:+.1f} %) | "
                     f"{r['top1_agree'] * 100:.0f} % | {r['greedy_agree'] * 100:.0f} % | "
                     f"{r['kv_bytes_read_per_token'] / 2**20:.1f} MiB; {r['kv_read_global_vs_dense']:.2f}× | "
                     f"{r['attention_cpu_s_per_token'] * 1e3:.1f} ms ({r['attention_cpu_vs_dense']:.2f}×) | "
                     f"{r['kv_cache_bytes'] / 2**20:.1f} MiB |")
    if out.get("retrieval"):
        lines.append("\nretrieval (fact early, question at the end): " + ", ".join(
            f"{k} {v * 100:.0f} %" for k, v in out["retrieval"].items()))
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for kind in sorted({r["policy"] for r in rows}):
        rs = [r for r in rows if r["policy"] == kind]
        a.plot([r["context"] for r in rs], [r["ppl_vs_dense"] for r in rs], "o-", label=kind)
        b.plot([r["context"] for r in rs], [r["kv_read_vs_dense"] for r in rs], "o-", label=kind)
    a.set(xlabel="context (tokens)", ylabel="continuation perplexity / dense", title="fidelity")
    b.set(xlabel="context (tokens)", ylabel="KV bytes read per decoded token / dense", title="reads")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--bits", default="8")
    ap.add_argument("--contexts", default="2048,4096,7424")
    ap.add_argument("--text", default=TEXT, help="comma list of text files, joined (GPL-3's 7563 tokens end "
                    "short of 8k: e.g. GPL-2,GPL-3 for 8192; both unseen by the bundle's calibration)")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--policies", default="dense,window,pages,heavy,oracle",
                    help="comma list; settings after colons, e.g. pages:candidates=1536:page=32")
    ap.add_argument("--kv-dtype", default="float16")
    ap.add_argument("--cont", type=int, default=128, help="continuation tokens scored at the end of each context")
    ap.add_argument("--decode", type=int, default=6, help="decode steps timed after each prefill")
    ap.add_argument("--retrieval-filler", type=int, default=1600, help="filler tokens (0: no retrieval prompts)")
    ap.add_argument("--retrieval-policies", default="dense,window,pages,heavy")
    ap.add_argument("--json", help="write the rows here (after each row)")
    ap.add_argument("--merge", help="rows of an earlier run (its --json) to table and plot with these")
    ap.add_argument("--plot", help="write a PNG plot here")
    args = ap.parse_args()

    kinds = args.policies.split(",")
    sess = nd.Session(args.bundle, policy=nd.Policy(bits=args.bits))
    lm = LanguageModel(sess)
    files = args.text.split(",")
    ids = lm.encode("\n\n".join(open(f, encoding="utf-8").read() for f in files))
    print(f"# {' + '.join(files)}: {len(ids)} tokens; bits {args.bits}; kv {args.kv_dtype}; budget {args.budget} on global layers; "
          f"uptime: {os.getloadavg()}", flush=True)
    out = {"rows": [], "retrieval": {}}
    if args.merge:
        with open(args.merge) as f:
            out = json.load(f)
    rows = out["rows"]

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    for L in (int(x) for x in args.contexts.split(",") if x):
        if L > len(ids):
            raise SystemExit(f"context {L} is longer than the text ({len(ids)} tokens)")
        dense = None
        for kind in kinds:
            sess.state.set_attention(policy(kind, args.budget, args.kv_dtype))
            r = measure(sess, lm, ids, L, args.cont, args.decode)
            dense = dense or r
            row = {"context": L, "policy": kind, "ppl": float(np.exp(r["nll"])),
                   "ppl_vs_dense": float(np.exp(r["nll"] - dense["nll"])),
                   "top1_agree": float((r["top1"] == dense["top1"]).mean()),
                   "greedy_agree": float(np.mean([a == b for a, b in zip(r["greedy"], dense["greedy"])])),
                   **{k: r[k] for k in ("kv_bytes_read_per_token", "kv_bytes_read_per_token_global",
                                        "attention_s_per_token", "attention_cpu_s_per_token", "kv_cache_bytes",
                                        "prefill_s")},
                   "kv_read_vs_dense": r["kv_bytes_read_per_token"] / dense["kv_bytes_read_per_token"],
                   "kv_read_global_vs_dense": (r["kv_bytes_read_per_token_global"]
                                               / dense["kv_bytes_read_per_token_global"]),
                   "attention_time_vs_dense": r["attention_s_per_token"] / dense["attention_s_per_token"],
                   "attention_cpu_vs_dense": r["attention_cpu_s_per_token"] / dense["attention_cpu_s_per_token"],
                   "load": os.getloadavg()[0]}
            rows.append(row)
            save()
            print(f"L={L:5d} {kind:6s} ppl {row['ppl']:8.3f} ({row['ppl_vs_dense']:.4f}x) top1 {row['top1_agree']:.3f} "
                  f"greedy {row['greedy_agree']:.2f} kv/token {row['kv_bytes_read_per_token'] / 1e6:6.2f} MB "
                  f"({row['kv_read_vs_dense']:.2f}x, global {row['kv_read_global_vs_dense']:.2f}x) "
                  f"attn {row['attention_s_per_token'] * 1e3:6.1f} ms ({row['attention_time_vs_dense']:.2f}x, "
                  f"cpu {row['attention_cpu_s_per_token'] * 1e3:.1f} ms {row['attention_cpu_vs_dense']:.2f}x) "
                  f"cache {row['kv_cache_bytes'] / 1e6:6.1f} MB prefill {row['prefill_s']:.0f} s load {row['load']:.1f}",
                  flush=True)
    if args.retrieval_filler:
        out["retrieval"] = retrieval(sess, lm, ids, args.retrieval_policies.split(","), args.budget, args.kv_dtype,
                                     args.retrieval_filler)
        print("retrieval accuracy:", out["retrieval"], flush=True)
        save()
    print(table(out))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
