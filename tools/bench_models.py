"""Model builders for tools/bench.py: every artifact a benchmark row needs, built once and cached.

Artifacts live under work_out/bench/<model>-<key>/ (gitignored); the key hashes the build parameters
and this file's builder version, so changing a parameter builds a new directory instead of reusing a
stale one. Each builder returns a dict of paths plus facts (weight bytes, input names); it is a
compile-side module (torch, onnx, transformers allowed) and runs only in the parent bench process.

    minilm(root)        all-MiniLM-L6-v2: minilm.onnx, minilm_q4.onnx (MatMulNBits, block 32),
                        minilm.ts (TorchScript for the torch cold-start script), minilm.ndc (--keep-float),
                        inputs b1.npz / b8.npz (sentences *not* in the calibration set), calib.npz
    wide_mlp(root, ...) 2 residual FFN blocks d -> h -> ReLU -> d, weights larger than L3; same files plus
                        weights.bin (raw fp32, one layer after another) + layout for the naive loader

Over 400 lines: three builders (MiniLM, wide MLP, MoE LM), each a whole recipe read top to bottom, on
the cache helpers they share; bench.py imports them from this one module.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILDER_VERSION = 1

# Measured sentences: disjoint from examples.models.SENTENCES (which calibrate the bundle).
MEASURE_SENTENCES = [
    "The lighthouse keeper wrote letters to his daughter every winter.",
    "Our neighbours adopted two kittens from the animal shelter.",
    "The conference on renewable energy was held in Copenhagen.",
    "A thick fog rolled in from the sea before dawn.",
    "He replaced the broken window with a pane of stained glass.",
    "The algorithm sorts a million numbers in under a second.",
    "Tourists crowded the narrow streets of the old town.",
    "She finally finished knitting the blue scarf for her brother.",
]


# Where `nadoo` is imported from: None = the installed package (the work tree); else a folder holding
# nadoo/runtime and nadoo/compiler (see use_source), put first on PYTHONPATH of every child process.
NADOO_PATH: str | None = None


def use_source(root: str, rev: str) -> str:
    """Export runtime/ and compiler/ at git revision `rev` to root/src-<sha>/nadoo/ and use that copy.

    Other engineers edit the work tree while benchmarks run; a pinned revision keeps one run coherent.
    """
    global NADOO_PATH
    sha = subprocess.run(["git", "rev-parse", rev], capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()
    d = os.path.join(os.path.abspath(root), f"src-{sha[:12]}")
    if not os.path.exists(os.path.join(d, "nadoo", "runtime", "__init__.py")):
        os.makedirs(os.path.join(d, "nadoo"), exist_ok=True)
        tar = subprocess.run(["git", "archive", sha, "runtime", "compiler"], capture_output=True, cwd=ROOT, check=True).stdout
        subprocess.run(["tar", "-x", "-C", os.path.join(d, "nadoo")], input=tar, check=True)
    NADOO_PATH = d
    return sha


def nadoo_env(env: dict | None = None) -> dict:
    env = dict(os.environ if env is None else env)
    paths = ([NADOO_PATH] if NADOO_PATH else []) + [ROOT]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def source_hash() -> str:
    """Identity of the compiler + format code a bundle was built with (a change rebuilds the bundle)."""
    base = os.path.join(NADOO_PATH, "nadoo") if NADOO_PATH else ROOT
    h = hashlib.sha256()
    for sub in ("compiler", "runtime"):
        folder = os.path.join(base, sub)
        for fn in sorted(os.listdir(folder)):
            if fn.endswith(".py") and (sub == "compiler" or fn in ("format.py", "qcodec.py", "reader.py")):
                with open(os.path.join(folder, fn), "rb") as f:
                    h.update(fn.encode() + f.read())
    return h.hexdigest()[:12]


def _key(params: dict) -> str:
    blob = json.dumps(dict(params, v=BUILDER_VERSION, src=source_hash()), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def _log(msg: str) -> None:
    print(f"[build] {msg}", file=sys.stderr, flush=True)


def _nadoo_compile(model: str, out: str, calib: str, extra: list[str]) -> float:
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "nadoo.runtime.cli", "compile", model, "-o", out, "--calib", calib, "-q", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=nadoo_env())
    if r.returncode:
        raise RuntimeError(f"nadoo compile failed: {r.stderr.strip()[-2000:]}")
    _log(r.stdout.strip().splitlines()[0] if r.stdout.strip() else "compiled")
    return time.perf_counter() - t


def _quantize_nbits(src: str, dst: str, block: int = 32) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    m = _gemm_to_matmul(onnx.load(src))
    q = MatMulNBitsQuantizer(m, bits=4, block_size=block, is_symmetric=True)
    q.process()
    big = q.model.model.ByteSize() > 1_800_000_000
    onnx.save_model(q.model.model, dst, save_as_external_data=big)


def _gemm_to_matmul(m):
    """Gemm(x, W, b) -> MatMul(x, W') + Add(b): MatMulNBitsQuantizer only rewrites MatMul nodes."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in m.graph.initializer}
    nodes = []
    for n in m.graph.node:
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        if (n.op_type != "Gemm" or n.input[1] not in inits or a.get("transA", 0)
                or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0):
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if a.get("transB", 0):
            w = np.ascontiguousarray(w.T)
        inits[n.input[1]].CopyFrom(numpy_helper.from_array(w, n.input[1]))
        mm_out = n.output[0] + "_mm" if len(n.input) > 2 and n.input[2] else n.output[0]
        nodes.append(onnx.helper.make_node("MatMul", [n.input[0], n.input[1]], [mm_out], name=n.name + "_mm"))
        if mm_out != n.output[0]:
            nodes.append(onnx.helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=n.name + "_bias"))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def _build_dir(root: str, params: dict) -> tuple[str, dict | None]:
    """The build folder of `params` (made if new) and the manifest of a build finished there earlier."""
    d = os.path.join(root, f"{params['model']}-{_key(params)}")
    p = os.path.join(d, "manifest.json")
    if os.path.exists(p):
        with open(p) as f:
            return d, json.load(f)
    os.makedirs(d, exist_ok=True)
    return d, None


def _compile_entry(d, name, model, onnx_path, chunks, params, input_names, output, stem=None, **extra):
    """Compile the model's ONNX file (float tier kept) and describe every artifact of folder `d`."""
    stem = stem or name
    ndc = os.path.join(d, f"{stem}.ndc")
    secs = _nadoo_compile(onnx_path, ndc, os.path.join(d, "calib.npz"), ["--keep-float", "--chunks", str(chunks)])
    return _finish(d, {
        "name": name, "dir": d, "onnx": onnx_path, "onnx_q4": os.path.join(d, f"{stem}_q4.onnx"),
        "torchscript": os.path.join(d, f"{stem}.ts"), "ndc": ndc, "compile_s": secs,
        "inputs": {"b1": os.path.join(d, "b1.npz"), "b8": os.path.join(d, "b8.npz")},
        "input_names": list(input_names), "output": output,
        "fp32_weight_bytes": int(sum(p.numel() * 4 for p in model.parameters())),
        "onnx_bytes": os.path.getsize(onnx_path), "params": params, **extra,
    })


def _finish(d: str, man: dict) -> dict:
    with open(os.path.join(d, "manifest.json.tmp"), "w") as f:
        json.dump(man, f, indent=1)
    os.replace(os.path.join(d, "manifest.json.tmp"), os.path.join(d, "manifest.json"))
    return man


# --------------------------------------------------------------------------------------------- MiniLM
def minilm(root: str, seq: int = 32, chunks: int = 16) -> dict:
    params = {"model": "minilm", "seq": seq, "chunks": chunks}
    d, man = _build_dir(root, params)
    if man:
        return man
    import torch

    from examples import models

    tok, model = models.load_minilm()
    calib = models.minilm_inputs(tok, models.SENTENCES, seq_len=seq)
    b8 = models.minilm_inputs(tok, MEASURE_SENTENCES, seq_len=seq)
    b1 = {k: v[:1].copy() for k, v in b8.items()}
    names = ["input_ids", "attention_mask", "token_type_ids"]
    np.savez(os.path.join(d, "calib.npz"), **calib)
    np.savez(os.path.join(d, "b1.npz"), **b1)
    np.savez(os.path.join(d, "b8.npz"), **b8)
    onnx_path = os.path.join(d, "minilm.onnx")
    _log("exporting MiniLM to ONNX")
    axes = {k: {0: "batch", 1: "seq"} for k in names}
    axes["last_hidden_state"] = {0: "batch", 1: "seq"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models.export_onnx(model, {k: b1[k] for k in names}, onnx_path, names,
                           ["last_hidden_state", "pooler_output"], axes)
    _log("MatMulNBits 4-bit quantization (block 32)")
    _quantize_nbits(onnx_path, os.path.join(d, "minilm_q4.onnx"))

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            o = self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return o.last_hidden_state

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.trace(Wrap(model).eval(), tuple(torch.from_numpy(b1[k]) for k in names), strict=False)
    torch.jit.save(ts, os.path.join(d, "minilm.ts"))
    _log("nadoo compile MiniLM")
    return _compile_entry(d, "minilm", model, onnx_path, chunks, params, names, "last_hidden_state")


def load_minilm_torch():
    from examples import models

    return models.load_minilm()[1]


# ------------------------------------------------------------------------------------------- wide MLP
def make_wide_mlp(d: int, h: int, blocks: int, seed: int = 0, hot: float = 0.2, layout: str = "scattered"):
    """Residual FFN blocks x + W2·relu(W1·x + b1) + b2 with random weights and trained-like sparsity.

    Random Gaussian weights alone give every neuron the same 50 % firing rate. Trained ReLU FFNs are
    different: most neurons fire rarely and a minority ("hot" neurons) fire often (PowerInfer, Deja Vu).
    We imitate that with a per-neuron bias shift: a `hot` share of neurons gets b ≈ 0 (fires ~50 %),
    the rest b ≈ -2.3σ (fires ~1 %). layout="scattered": hot neurons sit at random positions, as in a
    trained model (chunk-level sparsity then needs the compiler to reorder co-active neurons);
    "clustered": hot neurons first (the order a co-activation reordering would produce).
    """
    import torch
    from torch import nn

    class FFN(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(d, h)
            self.down = nn.Linear(h, d)

        def forward(self, x):
            return x + self.down(torch.relu(self.up(x)))

    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(*[FFN() for _ in range(blocks)]).eval()
    with torch.no_grad():
        for blk in model:
            blk.up.weight.copy_(torch.randn(h, d, generator=g) / d ** 0.5)
            is_hot = torch.rand(h, generator=g) < hot
            if layout == "clustered":
                is_hot = torch.arange(h) < int(is_hot.sum())
            bias = torch.where(is_hot, torch.randn(h, generator=g) * 0.3, -2.3 + torch.randn(h, generator=g) * 0.2)
            blk.up.bias.copy_(bias)
            blk.down.weight.copy_(torch.randn(d, h, generator=g) / (h * hot) ** 0.5 * 0.5)
            blk.down.bias.copy_(torch.randn(d, generator=g) * 0.01)
    return model


def mlp_inputs(d: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def wide_mlp(root: str, d: int = 4096, h: int = 8192, blocks: int = 2, calib_n: int = 64, chunks: int = 16,
             layout: str = "scattered") -> dict:
    params = {"model": "wide_mlp", "d": d, "h": h, "blocks": blocks, "calib_n": calib_n, "chunks": chunks, "layout": layout}
    dd, man = _build_dir(root, params)
    if man:
        return man
    import torch

    from examples import models

    model = make_wide_mlp(d, h, blocks, layout=layout)
    np.savez(os.path.join(dd, "calib.npz"), x=mlp_inputs(d, calib_n, seed=1))
    x8 = mlp_inputs(d, 8, seed=2)
    np.savez(os.path.join(dd, "b1.npz"), x=x8[:1])
    np.savez(os.path.join(dd, "b8.npz"), x=x8)
    torch.save(model.state_dict(), os.path.join(dd, "state.pt"))
    # Raw fp32 weights for the naive per-layer loader: [W1ᵀ, b1, W2ᵀ, b2] per block, back to back.
    layout, off = [], 0
    with open(os.path.join(dd, "weights.bin"), "wb") as f:
        for blk in model:
            ent = {}
            for nm, t in (("w1t", blk.up.weight.T), ("b1", blk.up.bias), ("w2t", blk.down.weight.T), ("b2", blk.down.bias)):
                a = np.ascontiguousarray(t.detach().numpy(), np.float32)
                f.write(a.tobytes())
                ent[nm] = {"offset": off, "shape": list(a.shape)}
                off += a.nbytes
            layout.append(ent)
    onnx_path = os.path.join(dd, "mlp.onnx")
    _log(f"exporting wide MLP ({d}->{h}->{d} x{blocks}) to ONNX")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models.export_onnx(model, (torch.from_numpy(x8[:1]),), onnx_path, ["x"], ["y"], {"x": {0: "batch"}, "y": {0: "batch"}})
    _log("MatMulNBits 4-bit quantization (block 32)")
    _quantize_nbits(onnx_path, os.path.join(dd, "mlp_q4.onnx"))
    with torch.no_grad():
        ts = torch.jit.trace(model, (torch.from_numpy(x8[:1]),))
    torch.jit.save(ts, os.path.join(dd, "mlp.ts"))
    _log("nadoo compile wide MLP (slow: quantizes 3 tiers + float)")
    return _compile_entry(dd, "wide_mlp", model, onnx_path, chunks, params, ["x"], "y", stem="mlp",
                          raw_weights=os.path.join(dd, "weights.bin"), layout=layout,
                          state=os.path.join(dd, "state.pt"))


def load_wide_mlp_torch(man: dict):
    import torch

    p = man["params"]
    model = make_wide_mlp(p["d"], p["h"], p["blocks"], layout=p.get("layout", "scattered"))
    model.load_state_dict(torch.load(man["state"], weights_only=True))
    return model.eval()


# -------------------------------------------------------------------------------------- MoE language model
def _import_moe_example():
    """examples/moe_lm.py (its model, corpus and training loop), without its import-time env changes."""
    saved = {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    if NADOO_PATH and NADOO_PATH not in sys.path:  # --rev: patch_moe_blocks from the pinned compiler
        sys.path.insert(0, NADOO_PATH)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from examples import moe_lm as ex

    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return ex


def moe_heldout(ex, data: np.ndarray, n: int = 64, seed: int = 1):
    """The example's split and windows: 90 % train / 10 % held out; n held-out windows + n calibration ones."""
    split = int(0.9 * len(data))
    train, test = data[:split], data[split:]
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(test) - ex.CTX - 1, n)
    X = np.stack([test[s: s + ex.CTX] for s in starts])
    Y = np.stack([test[s + 1: s + ex.CTX + 1] for s in starts])
    calib = np.stack([train[s: s + ex.CTX] for s in rng.integers(0, len(train) - ex.CTX, n)])
    return train, X, Y, calib


def moe_lm(root: str, seconds: float = 150, budget_experts: int = 6) -> dict:
    """The char-level Mixtral of examples/moe_lm.py (2 MoE layers x 8 experts, top-2), trained `seconds` on the
    stdlib source. moe_lm.pt (state_dict), moe_lm.ndc (--keep-float, --model-class examples.moe_lm:CharMixtral),
    moe_lm.onnx (dense-equivalent export: every expert on every token, as the example's ORT comparison),
    inputs b1 / b8 (held-out windows of 64 characters), heldout.npz (64 windows + next characters), and
    budget_bytes: the decoded non-expert weights + `budget_experts` decoded experts (of 2 x 8)."""
    params = {"model": "moe_lm", "seconds": seconds, "budget_experts": budget_experts}
    d, man = _build_dir(root, params)
    if man:
        return man
    import contextlib

    import torch

    ex = _import_moe_example()
    data = ex.corpus()
    train, X, Y, calib = moe_heldout(ex, data)
    model = ex.CharMixtral()
    _log(f"training the char-level Mixtral of examples/moe_lm.py for {seconds:.0f} s")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    t = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        steps = ex.train(model, train, seconds)
    train_s = time.perf_counter() - t
    torch.set_num_threads(threads)
    state = os.path.join(d, "moe_lm.pt")
    torch.save(model.state_dict(), state)
    np.savez(os.path.join(d, "calib.npz"), input_ids=calib)
    np.savez(os.path.join(d, "heldout.npz"), input_ids=X, targets=Y)
    np.savez(os.path.join(d, "b1.npz"), input_ids=X[:1])
    np.savez(os.path.join(d, "b8.npz"), input_ids=X[:8])

    _log("exporting the dense-equivalent MoE LM to ONNX (every expert on every token)")
    dense = ex.dense_equivalent(model)
    onnx_path = os.path.join(d, "moe_lm.onnx")
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(dense, (torch.from_numpy(X[:8]),), None, dynamo=True, input_names=["input_ids"],
                                 output_names=["logits"], dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), verbose=False)
    with open(onnx_path, "wb") as f:
        f.write(prog.model_proto.SerializeToString())
    import onnxruntime as ort

    with torch.no_grad():
        ref8 = model(torch.from_numpy(X[:8])).numpy()
    y8 = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"]).run(None, {"input_ids": X[:8]})[0]
    ort_diff = float(np.abs(y8 - ref8).max())

    ndc = os.path.join(d, "moe_lm.ndc")
    _log("nadoo compile MoE LM (--keep-float)")
    secs = _nadoo_compile(state, ndc, os.path.join(d, "calib.npz"),
                          ["--keep-float", "--model-class", "examples.moe_lm:CharMixtral"])

    # Budget: what the non-expert layers' decoded weights take in the cache, plus `budget_experts` decoded experts.
    r = subprocess.run([sys.executable, "-c", _MOE_SIZES, ndc, os.path.join(d, "b8.npz")], capture_output=True,
                       text=True, cwd=ROOT, env=nadoo_env())
    if r.returncode:
        raise RuntimeError(f"measuring the MoE bundle failed: {r.stderr.strip()[-2000:]}")
    sizes = json.loads(r.stdout)
    budget = sizes["other_decoded"] + budget_experts * sizes["expert_decoded"]
    n_params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return _finish(d, {
        "name": "moe_lm", "dir": d, "onnx": onnx_path, "state": state, "ndc": ndc, "compile_s": secs,
        "train_s": train_s, "train_steps": steps, "ort_max_abs_diff": ort_diff,
        "inputs": {"b1": os.path.join(d, "b1.npz"), "b8": os.path.join(d, "b8.npz")},
        "heldout": os.path.join(d, "heldout.npz"), "input_names": ["input_ids"], "output": "logits",
        "fp32_weight_bytes": int(n_params * 4), "expert_fp32_bytes": int(expert_params * 4),
        "onnx_bytes": os.path.getsize(onnx_path), "budget_bytes": int(budget), "moe": sizes, "params": params,
    })


_MOE_SIZES = """import json, sys, numpy as np
from nadoo.runtime import Policy, Session
with Session(sys.argv[1], Policy(bits="4")) as s:
    with np.load(sys.argv[2]) as z:
        s.run(None, {"input_ids": z["input_ids"]})
    other = sum(a.nbytes for k, a in s.cache._items.items() if not (isinstance(k, tuple) and k and k[0] == "moe"))
    e = next(iter(s.bundle.moe.values()))
    print(json.dumps({"other_decoded": int(other), "expert_decoded": len(e.mats) * e.intermediate * e.hidden * 4,
                      "layers": len(s.bundle.moe), "n_experts": e.n_experts, "top_k": e.top_k,
                      "expert_bytes": {t: e.expert_bytes(t) for t in e.tiers}}))
"""


def load_moe_torch(man: dict):
    import torch

    ex = _import_moe_example()
    model = ex.CharMixtral()
    model.load_state_dict(torch.load(man["state"], weights_only=True))
    return model.eval()
