#!/usr/bin/env python
"""Fidelity table: every precision configuration of nadoo on MiniLM and the digits MLP / CNN,
with ONNX Runtime's quantizers beside it on the same inputs, as one markdown table.

    .venv/bin/python tools/fidelity.py [--quick] [--out work_out/fidelity]

MiniLM (all-MiniLM-L6-v2, offline): calibrated on `examples.models.calibration_sentences(128)`,
measured on the 65 `SENTENCES` (disjoint): mean-pooled cosine vs torch fp32, mean and min.
Digits: test-set accuracy and Δ pp vs the torch fp32 model. Configurations: float, dense 8 / 4 / 3 / 2
bits, the allocation at 3.0 bits/weight, nested 8 / 4 (one 8-bit quantization, `--nested`; it offers no 2-bit tier) and
the allocation over the nested planes at 6.0 bits/weight, 4-bit + FFN top-k 50 % (digits MLP). bits/weight = bytes a
dense run reads (codes + scales + mins) · 8 / chunked weights; "bundle" = size of the file the row
runs from (the separate-tier bundle holds f32 + q8 + q4 + q3 + q2). `--quick`: 32 calibration / 24
evaluation sentences, no ORT, no CNN.
"""
from __future__ import annotations

import argparse
import datetime
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
from examples.models import (SENTENCES, calibration_sentences, digits_data, export_onnx, load_minilm,  # noqa: E402
                             minilm_inputs, train_digits_cnn, train_digits_mlp)

CONFIGS = [  # label, bundle ("sep" | "nested"), policy kwargs
    ("float", "sep", dict(bits="float")),
    ("8-bit", "sep", dict(bits="8")),
    ("4-bit", "sep", dict(bits="4")),
    ("3-bit", "sep", dict(bits="3")),
    ("2-bit", "sep", dict(bits="2")),
    ("allocation ≤ 3.0 bits/weight", "sep", dict(bits="alloc")),
    ("nested 8-bit", "nested", dict(bits="8")),
    ("nested 4-bit", "nested", dict(bits="4")),
    ("nested allocation ≤ 6.0 bits/weight", "nested", dict(bits="alloc")),
    ("4-bit + FFN top-k 50 %", "sep", dict(kind="topk", bits="4", topk=0.5)),
]


def _compile(src, out, calib, nested, chunks=16, quiet=True):
    from nadoo.compiler.pipeline import CompileOptions, compile_model

    t0 = time.perf_counter()
    # nested planes offer 8 and 4 bits only: their allocation needs a budget above 4.35 bits/weight
    compile_model(str(src), str(out), CompileOptions(calib=str(calib), chunks=chunks, keep_float=not nested,
                                                     nested=nested, bits_per_weight=6.0 if nested else 3.0),
                  quiet=quiet)
    return time.perf_counter() - t0


def _bits_per_weight(path, policy_kw):
    """Bytes a dense run of this policy reads, over the chunked weights (scales and mins included)."""
    from nadoo.runtime import Policy
    from nadoo.runtime.reader import Bundle

    pol = Policy(**{k: v for k, v in policy_kw.items() if k == "bits"})
    with Bundle.open(path) as b:
        nbytes = n_w = 0
        for e in b.tensors.values():
            n_w += e.rows * e.row_len
            for i, t in enumerate(pol.tiers_for(e, set(e.tiers), None)):
                nbytes += sum(int(b.table["stored"][p]) for p in e.chunk_pids(t, i))
    return 8 * nbytes / max(n_w, 1)


def _run(path, policy_kw, feeds, per_sample=False):
    from nadoo.runtime import Policy, Session

    with Session(path, Policy(**policy_kw)) as s:
        if per_sample:  # routing is per input
            n = len(next(iter(feeds.values())))
            return np.concatenate([s.run(None, {k: v[i:i + 1] for k, v in feeds.items()})[0] for i in range(n)])
        return s.run(None, feeds)[0]


def minilm(out: Path, quick: bool, rows: dict, notes: list):
    import torch

    tok, model = load_minilm()
    onnx_path = export(out, tok, model)
    calib = calibration_sentences(32 if quick else 128)
    evals = SENTENCES[:24] if quick else SENTENCES
    np.savez(out / "minilm_calib.npz", **minilm_inputs(tok, calib))
    feeds = minilm_inputs(tok, evals)
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    ref_emb = mean_pool(ref, feeds["attention_mask"])
    bundles = {}
    for kind in ("sep", "nested"):
        bundles[kind] = out / f"minilm_{kind}.ndc"
        dt = _compile(onnx_path, bundles[kind], out / "minilm_calib.npz", kind == "nested")
        notes.append(f"MiniLM compile ({kind}): {dt:.0f} s")
    for label, kind, kw in CONFIGS:
        if kw.get("kind") == "topk":
            continue
        h = _run(bundles[kind], kw, feeds)
        c = cosine(mean_pool(h, feeds["attention_mask"]), ref_emb)
        r = rows.setdefault(label, {})
        r["bpw"] = _bits_per_weight(bundles[kind], kw) if kw["bits"] != "float" else 32.0
        r["size"] = os.path.getsize(bundles[kind])
        r["minilm"] = (float(c.mean()), float(c.min()))
        print(f"  MiniLM {label:<38} cos {c.mean():.5f} / {c.min():.5f}  {r['bpw']:.2f} bits/w", flush=True)
    if quick:
        return
    # ONNX Runtime's own quantizers on the same sentences (MatMul weights only; embeddings stay fp32)
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q4 = out / "minilm_ort_q4.onnx"
    qz = MatMulNBitsQuantizer(onnx.load(str(onnx_path)), block_size=32, is_symmetric=True)
    qz.process()
    qz.model.save_model_to_file(str(q4), False)
    q8 = out / "minilm_ort_q8.onnx"
    quantize_dynamic(str(onnx_path), str(q8), weight_type=QuantType.QInt8)
    for label, path in (("ORT MatMulNBits 4-bit, block 32", q4), ("ORT quantize_dynamic 8-bit", q8)):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        h = sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]
        c = cosine(mean_pool(h, feeds["attention_mask"]), ref_emb)
        rows.setdefault(label, {}).update(minilm=(float(c.mean()), float(c.min())), size=os.path.getsize(path))
        print(f"  MiniLM {label:<38} cos {c.mean():.5f} / {c.min():.5f}", flush=True)


def digits(out: Path, quick: bool, rows: dict, notes: list):
    import torch

    Xtr, ytr, Xte, yte = digits_data()
    mlp = train_digits_mlp()
    torch.jit.save(torch.jit.trace(mlp, torch.zeros(1, 64)), out / "mlp.pt")
    np.savez(out / "mlp_calib.npz", input=Xtr[:256])
    models = [("mlp", out / "mlp.pt", out / "mlp_calib.npz", mlp, lambda a: a, 16)]
    if not quick:
        cnn = train_digits_cnn()
        img = lambda a: a.reshape(-1, 1, 8, 8)  # noqa: E731
        export_onnx(cnn, (img(Xtr[:2]),), out / "cnn.onnx", ["image"], ["logits"],
                    {"image": {0: "batch"}, "logits": {0: "batch"}})
        np.savez(out / "cnn_calib.npz", image=img(Xtr[:256]))
        models.append(("cnn", out / "cnn.onnx", out / "cnn_calib.npz", cnn, img, 8))
    for name, src, calib, net, shape, chunks in models:
        with torch.no_grad():
            ref = float((net(torch.from_numpy(shape(Xte))).argmax(1).numpy() == yte).mean())
        notes.append(f"digits {name.upper()} torch fp32 accuracy {ref:.2%}")
        bundles = {k: out / f"{name}_{k}.ndc" for k in ("sep", "nested")}
        for k, p in bundles.items():
            _compile(src, p, calib, k == "nested", chunks=chunks)
        input_name = "input" if name == "mlp" else "image"
        for label, kind, kw in CONFIGS:
            topk = kw.get("kind") == "topk"
            if topk and name != "mlp":
                continue
            pred = _run(bundles[kind], kw, {input_name: shape(Xte)}, per_sample=topk).argmax(1)
            acc = float(np.mean(pred == yte))
            r = rows.setdefault(label, {})
            r[name] = (acc, 100 * (acc - ref))
            if topk:
                r.setdefault("bpw", _bits_per_weight(bundles[kind], kw))
            print(f"  digits {name} {label:<38} {acc:.2%} ({100 * (acc - ref):+.1f} pp)", flush=True)


def table(rows: dict) -> str:
    def mib(n):
        return f"{n / 2**20:.1f} MiB" if n else "–"

    out = ["| configuration | bits/weight (MiniLM; top-k: MLP) | MiniLM bundle | MiniLM cos mean | MiniLM cos min | digits MLP acc (Δ pp) "
           "| digits CNN acc (Δ pp) |", "|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        cos = r.get("minilm")
        acc = lambda k: f"{r[k][0]:.2%} ({r[k][1]:+.1f})" if k in r else "–"  # noqa: E731
        bpw = f"{r['bpw']:.2f}" if "bpw" in r else "–"
        out.append(f"| {label} | {bpw} | {mib(r.get('size'))} | {f'{cos[0]:.5f}' if cos else '–'} | "
                   f"{f'{cos[1]:.5f}' if cos else '–'} | {acc('mlp')} | {acc('cnn')} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "work_out" / "fidelity"))
    ap.add_argument("--skip-minilm", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    rows: dict = {label: {} for label, _, _ in CONFIGS}
    notes: list = []
    if not args.skip_minilm:
        minilm(out, args.quick, rows, notes)
    digits(out, args.quick, rows, notes)
    rows = {k: v for k, v in rows.items() if v}
    print(f"\nMeasured {datetime.date.today().isoformat()} with `.venv/bin/python tools/fidelity.py"
          f"{' --quick' if args.quick else ''}` ({time.perf_counter() - t0:.0f} s; {'; '.join(notes)}).\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
