#!/usr/bin/env python
"""FFN activation sparsity on Gemma 3 270M: a curve over --ffn-sparsity per tier, and a plot.

For each tier and target sparsity, in a fresh single-threaded process: greedy 32 new tokens on the
three prompts (first token differing from the dense run at the same tier), decode tok/s, measured
share of skipped neurons, MLP (down) bytes read per decode token under --memory-budget (an unbounded
cache holds every weight after the first token, so only a bounded one shows what a token reads), and
perplexity at context 512 on /usr/share/common-licenses/GPL-3 (second half of each window, as
tools/gemma_figures.py).

    nadoo compile work_out/gemma-3-270m-q4_k_m.gguf -o work_out/gemma.ndc --keep-float --calib-text ...
    nice -n 10 .venv/bin/python tools/ffn_sparsity.py [--bundle work_out/gemma.ndc] [--bits 8,4]
        [--sparsity 0,0.25,0.4,0.5] [--windows N]

Writes work_out/ffn_sparsity.json and work_out/ffn_sparsity.png. ~3-5 min per (tier, sparsity) on one core.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = "/usr/share/common-licenses/GPL-3"
PROMPTS = ("The capital of France is", "Once upon a time, in a small village,",
           "The three laws of thermodynamics state that")
NEW_TOKENS = 32
BUDGET_TOKENS = 8  # under a budget the 262144-row tied head streams through the cache every token: slow
CTX = 512


def one_point(bundle: str, bits: str, sparsity: float, budget: str, windows: int | None) -> dict:
    """One (tier, sparsity) point; runs in its own process."""
    import nadoo.runtime as nd
    from nadoo.runtime.files import read_text
    from nadoo.runtime.generate import LanguageModel, perplexity

    rec = {"bits": bits, "ffn_sparsity_target": sparsity, "loadavg_start": os.getloadavg(), "prompts": []}
    pol = dict(bits=bits, ffn_sparsity=sparsity)
    with nd.Session(bundle, policy=nd.Policy(**pol)) as s:
        for p in PROMPTS:
            r = s.generate(p, max_new_tokens=NEW_TOKENS, stop_at_eos=False)
            rec["prompts"].append({"prompt": p, "token_ids": r.token_ids, "text": r.text,
                                   "decode_tokens_per_s": r.stats["decode_tokens_per_s"],
                                   "ffn_sparsity": r.stats.get("ffn_sparsity"),
                                   "ffn_dense_fallback_rate": r.stats.get("ffn_dense_fallback_rate")})
        text = read_text(TEXT, "text")
        if windows:  # a quick run: the first windows of the same token stream
            ppl = perplexity(s, ids=LanguageModel(s).encode(text)[: windows * CTX], context=CTX)
        else:
            ppl = perplexity(s, text, context=CTX)
        rec.update({k: ppl[k] for k in ("perplexity", "tokens_scored", "seconds")})
        rec["ffn_sparsity_perplexity_run"] = ppl.get("ffn_sparsity")
    with nd.Session(bundle, policy=nd.Policy(**pol), memory_budget=budget) as s:
        rec.update(budget_decode(s, budget))
    rec["loadavg_end"] = os.getloadavg()
    return rec


def budget_decode(s, budget: str) -> dict:
    """Greedy decode of the first prompt under a memory budget, counted per decode token (prefill excluded)."""
    import time

    import numpy as np

    from nadoo.runtime.generate import LanguageModel

    lm = LanguageModel(s)
    ids = lm.encode(PROMPTS[0])
    logits, _ = lm.forward(ids, 0)
    keys = ("bytes_read", "macs", "dense_macs")
    tot = dict.fromkeys(["bytes_read", *(f"mlp_{k}" for k in keys)], 0)
    t0 = time.perf_counter()
    for step in range(BUDGET_TOKENS):
        t = int(np.argmax(logits[-1]))
        logits, st = lm.forward([t], len(ids) + step)
        tot["bytes_read"] += st["bytes_read"]
        for name, layer in st["layers"].items():
            if name.endswith("mlp.down"):  # a gated MLP's layer entry (gate, up and down read together)
                for k in keys:
                    tot[f"mlp_{k}"] += layer[k]
    dt = time.perf_counter() - t0
    n = BUDGET_TOKENS
    return {"budget": budget, "decode_tokens_per_s_budget": n / dt, **{f"{k}_per_token": v / n for k, v in tot.items()}}


def first_difference(a: list, b: list) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for bits in sorted({p["bits"] for p in out["points"]}):
        pts = sorted((p for p in out["points"] if p["bits"] == bits), key=lambda p: p["ffn_sparsity_target"])
        xs = [100 * p["ffn_sparsity_target"] for p in pts]
        base = pts[0]["perplexity"]
        axes[0].plot(xs, [100 * (p["perplexity"] / base - 1) for p in pts], "o-", label=f"{bits}-bit")
        axes[1].plot(xs, [p["mlp_bytes_read_per_token"] / 2**20 for p in pts], "o-", label=f"{bits}-bit")
        axes[2].plot(xs, [min(q["decode_tokens_per_s"] for q in p["prompts"]) for p in pts], "o-", label=f"{bits}-bit")
    axes[0].set(xlabel="FFN sparsity target (%)", ylabel="perplexity vs dense (%)", title="GPL-3, ctx 512")
    axes[1].set(xlabel="FFN sparsity target (%)", ylabel="MiB", title="MLP bytes read per decode token (budget)")
    axes[2].set(xlabel="FFN sparsity target (%)", ylabel="tok/s", title="decode (slowest prompt, 1 thread)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Gemma 3 270M, FFN activation sparsity (load {out['points'][0]['loadavg_start'][0]:.1f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(ROOT / "work_out" / "gemma.ndc"))
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--sparsity", default="0,0.25,0.4,0.5")
    ap.add_argument("--memory-budget", default="16MB", help="cache budget for the bytes-read run")
    ap.add_argument("--windows", type=int, default=0, help="score only the first N windows of the text (0: all)")
    ap.add_argument("--out", default=str(ROOT / "work_out" / "ffn_sparsity.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: BITS:SPARSITY, print its record
    args = ap.parse_args()
    if args.one:
        bits, s = args.one.split(":")
        print(json.dumps(one_point(args.bundle, bits, float(s), args.memory_budget, args.windows or None)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = {"bundle": args.bundle, "points": []}
    for bits in args.bits.split(","):
        dense = None
        for s in (float(x) for x in args.sparsity.split(",")):
            r = subprocess.run([sys.executable, __file__, "--bundle", args.bundle, "--one", f"{bits}:{s}",
                                "--memory-budget", args.memory_budget, "--windows", str(args.windows)],
                               capture_output=True, text=True, env=env)
            if r.returncode:
                sys.exit(r.stderr)
            p = json.loads(r.stdout.splitlines()[-1])
            dense = dense or p  # the first point of a tier is its reference (run sparsity 0 first)
            for q, d in zip(p["prompts"], dense["prompts"]):
                q["first_difference_vs_dense"] = first_difference(q["token_ids"], d["token_ids"])
            out["points"].append(p)
            Path(args.out).write_text(json.dumps(out, indent=1))
            print(f"{bits}-bit s={s:.2f}: ppl {p['perplexity']:.4f}, measured {p['prompts'][0]['ffn_sparsity']:.3f}, "
                  f"first diff {[q['first_difference_vs_dense'] for q in p['prompts']]}, "
                  f"decode {min(q['decode_tokens_per_s'] for q in p['prompts']):.2f} tok/s, "
                  f"MLP bytes/token {p['mlp_bytes_read_per_token'] / 2**20:.2f} MiB, load {p['loadavg_end'][0]:.1f}",
                  flush=True)
    plot(out, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
