#!/usr/bin/env python
"""nadoo's figures for Gemma 3 270M next to the transformers reference of tools/lm_reference.py:
for each tier, in a fresh single-threaded process, greedy 32 new tokens for the reference prompts
(equal to transformers'?), time to first token, decode tok/s, peak RSS and the bytes the cache holds,
then perplexity at context 512 on /usr/share/common-licenses/GPL-3 (second half of each window).

    nadoo compile work_out/gemma-3-270m-q4_k_m.gguf -o work_out/gemma.ndc --keep-float --calib-text ...
    nice -n 10 .venv/bin/python tools/gemma_figures.py [--bundle work_out/gemma.ndc] [--bits float,8,4]
        [--bits-for embed=8 --out work_out/gemma_figures_embed8.json]

Writes work_out/gemma_figures.json (one record per tier). Takes ~5 min per tier on one core.
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


def one_tier(bundle: str, bits: str, ref: dict, bits_for: str = "") -> dict:
    """Runs in its own process (peak RSS is per process)."""
    import nadoo.runtime as nd
    from nadoo.runtime.files import read_text
    from nadoo.runtime.generate import perplexity

    rec = {"bits": bits, "bits_for": bits_for, "loadavg_start": os.getloadavg(), "prompts": []}
    with nd.Session(bundle, policy=nd.Policy(bits=bits, bits_for=bits_for)) as s:
        for p in ref["prompts"]:
            r = s.generate(p["prompt"], max_new_tokens=ref["new_tokens"], stop_at_eos=False)
            want = p["transformers_tokens"]
            agree = next((i for i, (a, b) in enumerate(zip(r.token_ids, want)) if a != b), len(want))
            rec["prompts"].append({"prompt": p["prompt"], "tokens_equal": r.token_ids == want, "first_difference":
                                   None if agree == len(want) else agree, "text": r.text,
                                   **{k: r.stats[k] for k in ("ttft_s", "decode_tokens_per_s", "bytes_read",
                                                              "bytes_read_per_token", "resident_weight_bytes",
                                                              "kv_cache_bytes")}})
        rec["peak_rss_bytes_generate"] = r.stats["peak_rss_bytes"]
        ppl = perplexity(s, read_text(TEXT, "text"), context=ref["ctx"])
        rec.update({k: ppl[k] for k in ("perplexity", "tokens_scored", "seconds", "peak_rss_bytes")})
    rec["loadavg_end"] = os.getloadavg()
    return rec


def main():
    from bench_lm import gemma_parser  # tools/ is this script's folder, first on sys.path

    ap = gemma_parser(__doc__, "float,8,4")
    ap.add_argument("--ref", default=str(ROOT / "work_out" / "gemma_ref.json"))
    ap.add_argument("--bits-for", default="", help="per-tensor tiers over --bits, e.g. embed=8")
    ap.add_argument("--out", default=str(ROOT / "work_out" / "gemma_figures.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one tier, print its record
    args = ap.parse_args()
    ref = json.loads(Path(args.ref).read_text())
    if args.one:
        print(json.dumps(one_tier(args.bundle, args.one, ref, args.bits_for)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = {"reference_perplexity": ref["transformers_perplexity"], "tiers": []}
    for bits in args.bits.split(","):
        r = subprocess.run([sys.executable, __file__, "--bundle", args.bundle, "--ref", args.ref, "--one", bits,
                            "--bits-for", args.bits_for],
                           capture_output=True, text=True, env=env)
        if r.returncode:
            sys.exit(r.stderr)
        out["tiers"].append(json.loads(r.stdout.splitlines()[-1]))
        Path(args.out).write_text(json.dumps(out, indent=1))
        t = out["tiers"][-1]
        print(bits, f"ppl {t['perplexity']:.4f}", "tokens equal:", [p["tokens_equal"] for p in t["prompts"]],
              f"decode {min(p['decode_tokens_per_s'] for p in t['prompts']):.2f} tok/s",
              f"peak RSS {t['peak_rss_bytes_generate'] / 2**20:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
