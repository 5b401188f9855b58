"""Block-sparse encoder attention on MiniLM: embedding fidelity and attention time against dense.

For each length L (128/256/512 tokens: the held-out SENTENCES of examples/models.py concatenated,
starting at a different sentence per input) and each share of key blocks (--attention blocks
--attention-blocks SHARE --block B), the cosine of the mean-pooled embedding against dense attention
at the same tier, the share of key blocks read and the time spent in attention (the NumPy kernel,
median over the inputs, CPU time: what a loaded machine inflates least).

    PYTHONPATH=.pp .venv/bin/python tools/encoder_attention.py work_out/minilm/minilm.ndc

The bundle: examples/minilm.py (an all-MiniLM-L6-v2 compiled by this version has fused attention).
"""
from __future__ import annotations

import argparse
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402


def long_inputs(tok, length: int, n: int) -> list[dict]:
    """n inputs of exactly `length` tokens: the held-out sentences concatenated from sentence i on."""
    from examples.models import SENTENCES, minilm_inputs

    out = []
    for i in range(n):
        text = " ".join(SENTENCES[i:] + SENTENCES[:i])
        while len(tok(text)["input_ids"]) < length:
            text += " " + text
        out.append(minilm_inputs(tok, [text], seq_len=length))
    return out


def run_all(sess, inputs) -> tuple[list[np.ndarray], list[float], float]:
    """(pooled embeddings, attention CPU seconds per input, share of key blocks read)."""
    from examples.minilm import mean_pool

    embs, times, shares = [], [], []
    for f in inputs:
        (h,) = sess.run(None, f)
        ea = sess.last_stats["encoder_attention"]
        embs.append(mean_pool(h, f["attention_mask"])[0])
        times.append(ea["attention_cpu_s"])
        shares.append(ea["key_blocks_read_share"])
    return embs, times, float(np.mean(shares))


def main(argv=None) -> None:
    from examples.models import load_minilm
    from nadoo.runtime import Policy, Session

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--bits", default="8")
    ap.add_argument("--lengths", default="128,256,512")
    ap.add_argument("--shares", default="0.25,0.5")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--inputs", type=int, default=4, help="inputs per length")
    args = ap.parse_args(argv)
    tok, _ = load_minilm()
    shares = [float(s) for s in args.shares.split(",")]
    print(f"MiniLM, {args.bits}-bit, NumPy engine, block {args.block}; cosine of the mean-pooled embedding vs dense "
          f"attention; attention CPU ms per input (median of {args.inputs})")
    print("| tokens | key blocks read | cosine mean | cosine min | attention ms | vs dense |")
    print("|---:|---:|---:|---:|---:|---:|")
    for length in (int(x) for x in args.lengths.split(",")):
        inputs = long_inputs(tok, length, args.inputs)
        with Session(args.bundle, Policy(bits=args.bits), engine="numpy") as s:
            run_all(s, inputs[:1])  # warm: weights decoded
            dense, t_dense, _ = run_all(s, inputs)
        ms = float(np.median(t_dense)) * 1e3
        print(f"| {length} | 100% (dense) | 1 | 1 | {ms:.1f} | 1.00x |")
        for share in shares:
            pol = Policy(bits=args.bits, encoder_attention=dict(kind="blocks", share=share, block=args.block))
            with Session(args.bundle, pol, engine="numpy") as s:
                run_all(s, inputs[:1])
                embs, t, read = run_all(s, inputs)
            cos = [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in zip(embs, dense)]
            sms = float(np.median(t)) * 1e3
            print(f"| {length} | {read:.0%} | {np.mean(cos):.4f} | {min(cos):.4f} | {sms:.1f} | {sms / ms:.2f}x |")


if __name__ == "__main__":
    main()
