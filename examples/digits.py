"""Digits end to end: train an MLP and a CNN on scikit-learn's digits (seconds), compile each into a
bundle with `nadoo compile`, show it with `nadoo info`, then run it with the NumPy runtime under
several policies and print accuracy and bytes read next to the torch fp32 source.

    python examples/digits.py [--out work_out/digits]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.models import TIER_POLICIES, digits_data, export_onnx, train_digits_cnn, train_digits_mlp  # noqa: E402

POLICIES = TIER_POLICIES + [
    ("4-bit top-k 50%", dict(kind="topk", bits="4", topk=0.5)),
    ("4-bit top-k 25%", dict(kind="topk", bits="4", topk=0.25)),
]


def nadoo(*args) -> str:
    r = subprocess.run([sys.executable, "-m", "nadoo.runtime.cli", *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(r.stderr.strip())
    return r.stdout


def evaluate(bundle: Path, name: str, X: np.ndarray, y: np.ndarray, ref_acc: float) -> None:
    from nadoo.runtime import Policy, Session

    print(f"\n{name}: torch fp32 accuracy {ref_acc:.2%}")
    print(f"  {'policy':<18} {'accuracy':>9} {'Δ pp':>6} {'read/sample':>12} {'% fp32 weights':>15} {'% MACs':>7}")
    for label, kw in POLICIES:
        # The NumPy engine: it reads per input what the policy picks. The ORT engine would read every
        # weight it runs once at open, so a fresh run's own bytes would show 0.
        with Session(bundle, Policy(**kw), engine="numpy") as s:
            input_name = s.get_inputs()[0].name
            # Cold per-sample runs with an empty cache would re-read everything; report the bytes of
            # one fresh single-sample run, and accuracy over the whole test set in one batch.
            s.run(None, {input_name: X[:1]})
            st = s.last_stats
            if kw.get("kind") == "topk":  # routing is per input: run sample by sample, as deployed
                pred = np.array([s.run(None, {input_name: X[i : i + 1]})[0].argmax() for i in range(len(X))])
            else:
                pred = s.run(None, {input_name: X})[0].argmax(1)
        acc = float(np.mean(pred == y))
        print(f"  {label:<18} {acc:>9.2%} {100 * (acc - ref_acc):>+6.1f} {st['bytes_read'] / 1024:>9.1f} KiB "
              f"{st['bytes_read'] / st['dense_fp32_weight_bytes']:>15.1%} {st['macs'] / max(st['dense_macs'], 1):>7.1%}")


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "work_out" / "digits"))
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    Xtr, ytr, Xte, yte = digits_data()

    # MLP → TorchScript → bundle
    mlp = train_digits_mlp()
    torch.jit.save(torch.jit.trace(mlp, torch.zeros(1, 64)), out / "mlp.pt")
    np.savez(out / "mlp_calib.npz", input=Xtr[:256])
    print("$ nadoo compile mlp.pt --calib mlp_calib.npz -o mlp.ndc --keep-float")
    print(nadoo("compile", out / "mlp.pt", "--calib", out / "mlp_calib.npz", "-o", out / "mlp.ndc", "--keep-float", "-q"))
    print("$ nadoo info mlp.ndc")
    print(nadoo("info", out / "mlp.ndc"))
    print("$ nadoo run mlp.ndc --bits 4        # no --input: runs the stored sample, checks it against torch")
    print(nadoo("run", out / "mlp.ndc", "--bits", "4"))
    with torch.no_grad():
        acc = float((mlp(torch.from_numpy(Xte)).argmax(1).numpy() == yte).mean())
    evaluate(out / "mlp.ndc", "digits MLP", Xte, yte, acc)

    # CNN → ONNX file → bundle
    cnn = train_digits_cnn()
    img = lambda a: a.reshape(-1, 1, 8, 8)  # noqa: E731
    export_onnx(cnn, (img(Xtr[:2]),), out / "cnn.onnx", ["image"], ["logits"],
                {"image": {0: "batch"}, "logits": {0: "batch"}})
    np.savez(out / "cnn_calib.npz", image=img(Xtr[:256]))
    print("\n$ nadoo compile cnn.onnx --calib cnn_calib.npz -o cnn.ndc --keep-float")
    print(nadoo("compile", out / "cnn.onnx", "--calib", out / "cnn_calib.npz", "-o", out / "cnn.ndc", "--keep-float",
                "--chunks", "8", "-q"))
    with torch.no_grad():
        acc = float((cnn(torch.from_numpy(img(Xte))).argmax(1).numpy() == yte).mean())
    evaluate(out / "cnn.ndc", "digits CNN", img(Xte), yte, acc)


if __name__ == "__main__":
    main()
