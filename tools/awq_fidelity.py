#!/usr/bin/env python
"""MiniLM fidelity with and without activation-aware scaling (compiler/awq.py), side by side in one run.

    .venv/bin/python tools/awq_fidelity.py [--out work_out/fidelity] [--bits-per-weight 3.0]

Same data as tools/fidelity.py: calibrated on `calibration_sentences(128)`, measured on the 65
`SENTENCES`, mean-pooled cosine vs torch fp32 (mean / min) per tier, plus each compile's wall and CPU
seconds (CPU = this process, BLAS threads included).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from examples.minilm import cosine, export, mean_pool  # noqa: E402
from examples.models import SENTENCES, calibration_sentences, load_minilm, minilm_inputs  # noqa: E402


def main(argv=None):
    import torch

    from nadoo.compiler.pipeline import CompileOptions, compile_model
    from nadoo.runtime import Policy, Session

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "work_out" / "fidelity"))
    ap.add_argument("--bits-per-weight", type=float, default=None, help="also store and measure an allocation")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    tok, model = load_minilm()
    onnx_path = export(out, tok, model)
    np.savez(out / "minilm_calib.npz", **minilm_inputs(tok, calibration_sentences(128)))
    feeds = minilm_inputs(tok, SENTENCES)
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    ref = mean_pool(ref, feeds["attention_mask"])
    tiers = ["float", "8", "4", "3", "2"] + (["alloc"] if args.bits_per_weight else [])
    rows = {t: [] for t in tiers}
    for awq in (False, True):
        path = out / f"minilm_awq{int(awq)}.ndc"
        t0, c0 = time.perf_counter(), time.process_time()
        compile_model(str(onnx_path), str(path), CompileOptions(calib=str(out / "minilm_calib.npz"), keep_float=True,
                                                                awq=awq, bits_per_weight=args.bits_per_weight), quiet=True)
        print(f"compile awq={awq}: {time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU",
              flush=True)
        for t in tiers:
            with Session(path, Policy(bits=t)) as s:
                c = cosine(mean_pool(s.run(None, feeds)[0], feeds["attention_mask"]), ref)
            rows[t].append(f"{c.mean():.5f} / {c.min():.5f}")
    print("\n| MiniLM tier | cos mean / min without | with scaling |\n|---|---|---|")
    for t, (a, b) in rows.items():
        print(f"| {t} | {a} | {b} |")


if __name__ == "__main__":
    main()
