#!/usr/bin/env python
"""The routed LM head on a language-model bundle: per tier, greedy tokens with --lm-head dense and
topk on the reference prompts (identical?), head chunks read per token, the certified rate, head and
model MACs per token, decode tok/s of both, the session-open time the certificate costs; then one
sampled generation and its bound on the probability mass left out.

    nice -n 10 .venv/bin/python tools/lm_head_figures.py work_out/gemma.ndc [--bits 8,4] [--k 4]

Prints one JSON record per tier (load average at start and end included).
"""
from __future__ import annotations

import argparse
import json
import os
import time

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "The three primary colors are"]


def run(bundle: str, bits: str, head: str, k: int, new: int, temperature: float = 0.0) -> dict:
    import nadoo.runtime as nd

    t0 = time.perf_counter()
    with nd.Session(bundle, policy=nd.Policy(bits=bits, lm_head=head, lm_head_k=k)) as s:
        opened = time.perf_counter() - t0
        out = []
        for p in PROMPTS:
            r = s.generate(p, max_new_tokens=new, stop_at_eos=False, temperature=temperature, seed=0)
            out.append({"tokens": r.token_ids, **{key: r.stats[key] for key in (
                "decode_tokens_per_s", "lm_head_chunks_read_per_token", "lm_head_chunks_total",
                "lm_head_certified_rate", "lm_head_tail_mass_max", "lm_head_macs_per_token",
                "lm_head_dense_macs_per_token", "macs_per_token", "dense_macs_per_token", "bytes_read_per_token")}})
    return {"open_s": opened, "prompts": out}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--new", type=int, default=32)
    args = ap.parse_args()
    for bits in args.bits.split(","):
        rec = {"bits": bits, "loadavg_start": os.getloadavg()}
        dense = run(args.bundle, bits, "dense", args.k, args.new)
        topk = run(args.bundle, bits, "topk", args.k, args.new)
        rec["tokens_identical"] = [a["tokens"] == b["tokens"] for a, b in zip(dense["prompts"], topk["prompts"])]
        rec["dense"], rec["topk"] = dense, topk
        rec["sampled"] = run(args.bundle, bits, "topk", args.k, args.new, temperature=0.8)["prompts"]
        rec["loadavg_end"] = os.getloadavg()
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
