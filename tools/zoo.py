"""Model zoo: real architectures, each exported the three ways a user has them, compiled and run.

    python tools/zoo.py                       # every model; prints a Markdown table
    python tools/zoo.py --models resnet,gpt2  # a subset
    python tools/zoo.py --json zoo.json       # also dump every measurement

The model code is transformers' (pure PyTorch, tiny configs, random init: no weights are
downloaded) plus a few plain nn.Modules (bi-LSTM / bi-GRU text classifiers, an M5-style audio CNN,
a conv autoencoder). Models with BatchNorm get running statistics from a few random batches first,
otherwise a random-init CNN's activations shrink layer by layer to ~1e-25.

Per model: export as TorchScript (torch.jit.trace), a torch.export program (.pt2) and ONNX
(torch.onnx dynamo exporter), `nadoo compile --keep-float` each form on a calibration set, then on
held-out inputs: the float run's max error relative to the source's output scale, the 8-bit run's
cosine to the source, the warm latency of an 8-bit run of the ONNX-form bundle on each engine
(`--engines numpy,ort`) divided by ONNX Runtime's fp32 on the same ONNX file (1 thread each, and
default threads each; medians of interleaved repeated runs), and the nodes that ran through the
NumPy engine's onnx.reference fallback with their share of a call's time. Compile-side tool: torch, onnx, onnxruntime, transformers.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tools.zoo_models import MODELS, VOCAB, ZooModel, build  # noqa: E402,F401  (the architectures)

FORMS = ("torchscript", "pt2", "onnx")
CALIB_N = 16
TEST_N = 16  # held-out samples: the 8-bit cosine of 2 (20 logits) moved ±0.006 between quantizers that 32 put within 0.0005


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warn a lot; the zoo reports its own one-line results."""
    for n in ("torch.onnx", "torch.export", "torch._export", "torch.fx", "torch._dynamo", "onnxscript"):
        logging.getLogger(n).setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _dynamic_axes(z: ZooModel) -> dict[str, dict[int, str]]:
    """Batch axis of every input; the sequence axis of token inputs (as nadoo's own exports)."""
    return {k: ({0: "batch", 1: "seq"} if kind != "float" else {0: "batch"}) for k, (kind, _, _) in z.inputs.items()}


def export(z: ZooModel, form: str, d: str, notes: list | None = None) -> str:
    """Write the model in `form` ("torchscript" | "pt2" | "onnx") under folder d; returns the path.
    An ONNX file the dynamo exporter cannot write comes from the legacy exporter (noted in `notes`)."""
    import torch

    from examples.models import export_onnx

    ex = z.draw(2, 7)
    args = tuple(torch.from_numpy(a) for a in ex.values())
    path = os.path.join(d, f"{z.name}.{ {'torchscript': 'pt', 'pt2': 'pt2', 'onnx': 'onnx'}[form] }")
    with _quiet(), torch.no_grad():
        if form == "torchscript":
            torch.jit.save(torch.jit.trace(z.module, args, check_trace=False, strict=False), path)
        elif form == "pt2":
            A = torch.export.Dim.AUTO
            dyn = {k: {ax: A for ax in axes} for k, axes in _dynamic_axes(z).items()}
            torch.export.save(torch.export.export(z.module, args, dynamic_shapes=dyn), path)
        else:
            axes = dict(_dynamic_axes(z), output={0: "batch"})
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                export_onnx(z.module, args, path, list(ex), ["output"], axes)
            if notes is not None:
                notes += [str(w.message)[:200] for w in caught if "dynamo ONNX export failed" in str(w.message)]
    return path


# ------------------------------------------------------------------------------------------- measure
def _one_line(e: BaseException | str, limit: int = 160) -> str:
    from nadoo.runtime.errors import one_line

    s = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    return one_line(re.sub(r"\S*/zoo-[^/\s]*/", "", s), limit)  # the temporary folder says nothing


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    """max |y - ref| relative to the output's scale max |ref|."""
    return float(np.max(np.abs(y.astype(np.float64) - ref))) / max(float(np.max(np.abs(ref))), 1e-30)


def cosine(y: np.ndarray, ref: np.ndarray) -> float:
    a, b = y.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


def reference(z: ZooModel, feeds: dict) -> np.ndarray:
    import torch

    with torch.no_grad():
        return z.module(*[torch.from_numpy(a) for a in feeds.values()]).numpy()


def rtn_cosine(z: ZooModel, feeds: dict, bits: int = 8, group: int = 64, min_elements: int = 1024) -> float:
    """Cosine to the source of the same model with the weights nadoo chunks (Linear, Conv,
    Embedding of >= min_elements) rounded to nearest in torch at `bits`, min/max per row and group of
    `group` columns: how much the model itself amplifies b-bit weight noise (random-init CNNs a lot)."""
    import copy

    import torch

    m = copy.deepcopy(z.module)
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)
    with torch.no_grad():
        for mod in m.modules():
            conv1d = type(mod).__name__ == "Conv1D"  # transformers' GPT-2 layer: weight [in, out]
            if not (isinstance(mod, kinds) or conv1d) or mod.weight.numel() < min_elements:
                continue
            w = mod.weight.T if conv1d else mod.weight
            rows = w.reshape(w.shape[0], -1)
            q = torch.empty_like(rows)
            for g0 in range(0, rows.shape[1], group):
                blk = rows[:, g0:g0 + group]
                lo, hi = blk.min(1, keepdim=True).values, blk.max(1, keepdim=True).values
                step = (hi - lo).clamp_min(1e-30) / (2 ** bits - 1)
                q[:, g0:g0 + group] = torch.round((blk - lo) / step) * step + lo
            q = q.reshape(w.shape)
            mod.weight.copy_(q.T if conv1d else q)
        y = m(*[torch.from_numpy(a) for a in feeds.values()]).numpy()
    return cosine(y, reference(z, feeds))


def fallback_share(ndc: str, feeds: dict, runs: int = 3) -> tuple[dict[str, int], float]:
    """Operators that run through the onnx.reference fallback ({op: nodes}) and their share of the
    time of a warm 8-bit call (per-node timing, median over `runs`)."""
    from nadoo.runtime import Policy, Session

    with Session(ndc, Policy(bits="8"), engine="numpy") as s:  # the ORT engine runs such nodes in ORT
        names = set(s.plan.fallback_nodes)
        op_of = {n.get("name"): n["op"] for n in s.bundle.read_graph()["nodes"]}
        s.run(None, feeds)
        shares = []
        for _ in range(runs):
            _, prof = s.plan.run_profile(feeds, by="node")
            shares.append(sum(t for n, t in prof.items() if n in names) / max(sum(prof.values()), 1e-12))
    ops: dict[str, int] = {}
    for n in names:
        ops[op_of.get(n, n)] = ops.get(op_of.get(n, n), 0) + 1
    return ops, float(np.median(shares))


ENGINES = ("numpy", "ort")
PAUSE_S = 0.01  # before each timed call of the latency comparison


def latency_vs_ort(ndc: str, onnx_path: str, feeds: dict, engines=ENGINES, budget_s: float = 3.0) -> dict:
    """Warm latency of an 8-bit nadoo run on each engine over ONNX Runtime's on the same ONNX file, with
    one thread each and with default threads each: medians of interleaved repeated runs.
    {engine: {"ratio_1", "ratio_default"}, "median_s": {run: seconds}, "rounds": n}."""
    import onnxruntime as ort
    from threadpoolctl import threadpool_limits

    from nadoo.runtime import Policy, Session

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    o1 = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    od = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    with contextlib.ExitStack() as stack:
        def timed(f):
            t = time.perf_counter()
            f()
            return time.perf_counter() - t

        runs = {"onnxruntime_1": (lambda: o1.run(None, feeds), 1),
                "onnxruntime_d": (lambda: od.run(None, feeds), None)}
        for e in engines:
            # the ORT engine's intra-op threads are set when the session opens: one session per setting
            for tag, threads in (("1", 1), ("d", None)):
                s = stack.enter_context(Session(ndc, Policy(bits="8"), engine=e, threads=threads))
                runs[f"{e}_{tag}"] = ((lambda s=s: s.run(None, feeds)), threads)
        for f, _ in runs.values():  # warm: weights decoded and cached, sessions initialised
            f()
            f()
        times = {k: [] for k in runs}
        t_end = time.perf_counter() + budget_s
        rounds = lambda: len(times["onnxruntime_d"])  # noqa: E731
        while rounds() < 5 or (time.perf_counter() < t_end and rounds() < 50):
            for k, (f, threads) in runs.items():
                with threadpool_limits(threads):
                    # ORT's and BLAS's idle workers spin for a while after a call: measured right after
                    # ORT's default-threads session, a call was ~3x slower. Each call starts after a pause.
                    time.sleep(PAUSE_S)
                    times[k].append(timed(f))
    med = {k: float(np.median(v)) for k, v in times.items()}
    out: dict = {e: {"ratio_1": med[f"{e}_1"] / med["onnxruntime_1"],
                     "ratio_default": med[f"{e}_d"] / med["onnxruntime_d"]} for e in engines}
    out.update(median_s=med, rounds=rounds())
    return out


def evaluate(name: str, forms=FORMS, workdir: str | None = None, latency: bool = True, engines=ENGINES) -> dict:
    """Export, compile and run one zoo model; returns every measurement (see the module docstring)."""
    from nadoo.compiler.pipeline import CompileOptions, compile_model
    from nadoo.runtime import Policy, Session

    t0 = time.perf_counter()
    z = build(name)
    res: dict = {"model": name, "family": z.family, "forms": {}}
    with contextlib.ExitStack() as stack:
        d = workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix=f"zoo-{name}-"))
        os.makedirs(d, exist_ok=True)
        calib = os.path.join(d, "calib.npz")
        np.savez(calib, **z.draw(CALIB_N, 0))
        test = z.draw(TEST_N, 99)
        ref = reference(z, test)
        res["rtn8_cosine"] = rtn_cosine(z, test)
        one = z.draw(1, 5)
        for form in forms:
            r = res["forms"][form] = {"ok": False}
            t = time.perf_counter()
            export_notes: list = []
            try:
                src = export(z, form, d, export_notes)
                if export_notes:
                    r["export_note"] = "ONNX file written by the legacy exporter: " + export_notes[0]
            except Exception as e:
                r.update(stage="export", error=_one_line(e))
                continue
            r["export_s"] = time.perf_counter() - t
            ndc = os.path.join(d, f"{name}.{form}.ndc")
            t = time.perf_counter()
            try:
                with _quiet():
                    rep = compile_model(src, ndc, CompileOptions(calib=calib, keep_float=True), quiet=True)
            except Exception as e:
                r.update(stage="compile", error=_one_line(e))
                continue
            r.update(ok=True, compile_s=time.perf_counter() - t, notes=[n for n in rep.notes if "exporter" in n])
            try:
                with Session(ndc, Policy(bits="float")) as s:
                    r["float_rel_err"] = rel_err(s.run(None, test)[0], ref)
                with Session(ndc, Policy(bits="8")) as s:
                    r["q8_cosine"] = cosine(s.run(None, test)[0], ref)
                r["fallback_ops"], r["fallback_share"] = fallback_share(ndc, one)
                if latency and form == "onnx":
                    res["latency"] = latency_vs_ort(ndc, src, one, engines)
            except Exception as e:
                r.update(ok=False, stage="run", error=_one_line(e))
    res["seconds"] = time.perf_counter() - t0
    return res


# ------------------------------------------------------------------------------------------- report
def _fmt_form(r: dict) -> str:
    if not r:
        return "–"  # not run (--forms)
    if not r.get("ok"):
        return f"✗ {r.get('stage', '')}"
    return "✓ legacy" if r.get("notes") else "✓"


ENGINE_TITLES = {"numpy": "NumPy engine", "ort": "ORT engine"}


def _engines_in(results: list[dict]) -> list[str]:
    return [e for e in ENGINES if any(e in (r.get("latency") or {}) for r in results)]


def table(results: list[dict]) -> str:
    engines = _engines_in(results) or list(ENGINES)
    lat_head = "".join(f"| {ENGINE_TITLES[e]} ×ORT 1 thread | {ENGINE_TITLES[e]} ×ORT default " for e in engines)
    head = ("| model | TorchScript | .pt2 | ONNX | float rel. err (max) | 8-bit cosine (min) | torch RTN 8-bit cosine "
            + lat_head + "| onnx.reference fallback (share of call) |")
    lines = [head, "|" + "---|" * (8 + 2 * len(engines))]
    for res in results:
        fr = [res["forms"].get(f, {}) for f in FORMS]
        ok = [r for r in fr if r.get("ok")]
        err = max((r["float_rel_err"] for r in ok if "float_rel_err" in r), default=None)
        cos = min((r["q8_cosine"] for r in ok if "q8_cosine" in r), default=None)
        lat = res.get("latency") or {}
        ops: dict[str, int] = {}
        for r in ok:
            for op, n in r.get("fallback_ops", {}).items():
                ops[op] = max(ops.get(op, 0), n)
        share = max((r.get("fallback_share", 0.0) for r in ok), default=0.0)
        fb = ", ".join(f"{op}×{n}" for op, n in sorted(ops.items())) + f" ({share:.0%})" if ops else "–"
        lines.append(f"| {res['model']} | " + " | ".join(_fmt_form(r) for r in fr) + " | "
                     + (f"{err:.1e}" if err is not None else "–") + " | " + (f"{cos:.5f}" if cos is not None else "–")
                     + (f" | {res['rtn8_cosine']:.5f}" if "rtn8_cosine" in res else " | –")
                     + "".join(f" | {lat[e]['ratio_1']:.2f} | {lat[e]['ratio_default']:.2f}" if e in lat else " | – | –"
                               for e in engines) + f" | {fb} |")
    lines.append("")
    for res in results:
        for f, r in res["forms"].items():
            if not r.get("ok"):
                lines.append(f"- {res['model']} {f} ({r.get('stage')}): {r.get('error')}")
            for note in r.get("notes", []) + ([r["export_note"]] if "export_note" in r else []):
                lines.append(f"- {res['model']} {f}: {_one_line(note, 300)}")
    return "\n".join(lines).rstrip()


def summary(results: list[dict]) -> str:
    """One line: the median and the worst warm latency × ORT per engine and thread setting."""
    parts = []
    for e in _engines_in(results):
        per = []
        for key, what in (("ratio_1", "1 thread"), ("ratio_default", "default threads")):
            v = [r["latency"][e][key] for r in results if e in (r.get("latency") or {})]
            per.append(f"{what} median {np.median(v):.2f}× / worst {max(v):.2f}×")
        parts.append(f"{ENGINE_TITLES[e]}: " + ", ".join(per))
    return ("warm latency × ORT fp32 — " + "; ".join(parts)) if parts else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help=f"comma-separated subset of: {', '.join(MODELS)}")
    ap.add_argument("--forms", default=",".join(FORMS), help="comma-separated subset of: " + ", ".join(FORMS))
    ap.add_argument("--json", help="also write every measurement to this file")
    ap.add_argument("--workdir", help="keep exported models and bundles under this folder")
    ap.add_argument("--no-latency", action="store_true", help="skip the ONNX Runtime latency comparison")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help="engines whose latency is compared with ONNX Runtime's: comma-separated subset of "
                         + ", ".join(ENGINES))
    a = ap.parse_args(argv)
    names = a.models.split(",") if a.models else list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model {unknown[0]!r}; known: {', '.join(MODELS)}")
    forms = a.forms.split(",")
    engines = a.engines.split(",")
    if any(e not in ENGINES for e in engines):
        ap.error(f"--engines takes {', '.join(ENGINES)}")
    if any(f not in FORMS for f in forms):
        ap.error(f"--forms takes {', '.join(FORMS)}")
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; load before the run: {load}", file=sys.stderr)
    t0 = time.perf_counter()
    results = []
    for n in names:
        res = evaluate(n, forms, os.path.join(a.workdir, n) if a.workdir else None, latency=not a.no_latency,
                       engines=engines)
        results.append(res)
        print(f"{n}: {res['seconds']:.0f} s", file=sys.stderr)
        if a.json:  # after every model: an interrupted run keeps what it measured
            with open(a.json, "w") as f:
                json.dump({"load_before": load, "seconds": time.perf_counter() - t0, "results": results}, f, indent=1)
    total = time.perf_counter() - t0
    print(table(results))
    if summary(results):
        print("\n" + summary(results))
    print(f"\n{len(names)} models in {total:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
