#!/usr/bin/env python
"""FFN activation sparsity and neuron windowing on a trained ReLU LM (examples/relu_lm.py): curves and a plot.

Per target sparsity S (0 is the dense product; a ReLU's exact zeros have threshold 0, so targets below
a layer's own share of zeros cost nothing): perplexity on the held-out GPL-3 (context 128, second
halves scored, no budget), top-1 agreement with the dense run on the first 8 of those windows (every
position), greedy agreement on three prompts (share of the 64 new tokens equal position by position,
and the first differing one; a char-level model's greedy continuation of license text soon falls
into runs of spaces, so this is a weak measure), the measured share of skipped neurons and of exact
zeros, and, decoding a passage of GPL-3 one character at a time under --memory-budget (teacher-forced,
so every point reads the same real text, not a greedy loop), per decode token: MLP bytes read (gate + up + down, and down alone), MLP MACs, down's groups needed,
for each neuron window W (--window) with the window's held bytes. At S = 0 also the share of
neuron groups a decode token needs at group sizes 1..32, in the bundle's (calibration-reordered)
neuron order and in the source's order (transformers' activations; the compiler writes groups of 32),
and for each W the same decode without a window but with the budget raised by the window's peak
bytes (does the window beat giving the cache as much memory?).

    nice -n 10 .venv/bin/python examples/relu_lm.py          # train + compile (cached in work_out/relu_lm)
    nice -n 10 .venv/bin/python tools/relu_sparsity.py [--bits 8] [--sparsity 0,0.25,0.4,0.5,0.7,0.8,0.85,0.9]
        [--window 0,1,2,4,8,16] [--memory-budget 256KB]

Writes work_out/relu_sparsity.json and .png. About 1 min per sparsity on one core.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

for _v in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):  # one core, before numpy loads
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEXT = "/usr/share/common-licenses/GPL-3"
PROMPTS = ("This License applies to", "You may convey a work based on the Program",
           "THERE IS NO WARRANTY FOR THE PROGRAM")
NEW_TOKENS = 64
CTX = 128
TOP1_WINDOWS = 8
PASSAGE = (2000, 16)  # the decoded passage: its start in GPL-3's ids and the prefilled characters
GROUP_SIZES = (1, 2, 4, 8, 16, 32)


def session(bundle, bits, sparsity, budget=None, window=0):
    import nadoo.runtime as nd

    # one engine throughout: a dense MLP may otherwise run in ONNX Runtime, equal only to float tolerance
    return nd.Session(bundle, policy=nd.Policy(bits=bits, ffn_sparsity=sparsity, neuron_window=window),
                      memory_budget=budget, engine="numpy")


def quality(bundle: str, bits: str, s: float) -> dict:
    from nadoo.runtime.files import read_text
    from nadoo.runtime.generate import perplexity

    from nadoo.runtime.generate import LanguageModel

    with session(bundle, bits, s) as sess:
        text = read_text(TEXT, "text")
        ppl = perplexity(sess, text, context=CTX)
        gens = [sess.generate(p, max_new_tokens=NEW_TOKENS, stop_at_eos=False) for p in PROMPTS]
        lm = LanguageModel(sess)
        ids = lm.encode(text)
        top1 = np.concatenate([lm.forward(ids[w * CTX:(w + 1) * CTX], 0, keep=0)[0].argmax(-1)
                               for w in range(TOP1_WINDOWS)])
    return {"perplexity": ppl["perplexity"], "tokens_scored": ppl["tokens_scored"], "top1": top1.tolist(),
            "ffn_sparsity": ppl["ffn_sparsity"], "ffn_zero_share": ppl["ffn_zero_share"],
            "ffn_dense_fallback_rate": ppl["ffn_dense_fallback_rate"],
            "prompts": [{"prompt": p, "token_ids": g.token_ids, "text": g.text} for p, g in zip(PROMPTS, gens)]}


def budget_decode(bundle: str, bits: str, s: float, budget: str, window: int) -> dict:
    """A GPL-3 passage decoded one character at a time under the budget (the true next character fed,
    not the model's), counted per decode token (prefill excluded)."""
    from nadoo.runtime.files import read_text
    from nadoo.runtime.generate import LanguageModel

    with session(bundle, bits, s, budget, window) as sess:
        lm = LanguageModel(sess)
        start, pre = PASSAGE
        passage = lm.encode(read_text(TEXT, "text"))[start:start + pre + NEW_TOKENS - 1]
        ids = passage[:pre]
        lm.forward(ids, 0)
        keys = ("bytes_read", "down_bytes_read", "groups_needed")
        tot = dict.fromkeys([*keys, "mlp_macs", "mlp_dense_macs", "bytes_read_all"], 0)
        held, t0 = [], time.process_time()
        for step in range(NEW_TOKENS - 1):
            _, st = lm.forward([passage[pre + step]], pre + step)
            for k in keys:
                tot[k] += st["ffn_counts"][k]
            tot["bytes_read_all"] += st["bytes_read"]
            for name, layer in st["layers"].items():
                if layer["kind"] == "ffn_down":
                    tot["mlp_macs"] += layer["macs"]
                    tot["mlp_dense_macs"] += layer["dense_macs"]
            held.append(st["ffn_window_bytes"])
        cpu = time.process_time() - t0
        downs = [e for e in sess.bundle.tensors.values() if e.kind == "ffn_down"]
        groups = sum(e.n_chunks for e in downs)
        stored = sess.bundle.table["stored"]

        def all_bytes(group):  # every chunk of these (tensor, tiers) as stored: what a dense token reads
            return sum(int(stored[p]) for e, tiers in group for i in range(e.n_chunks) for p in e.chunk_pids(tiers[i], i))
        mlps = [o for o in sess.ops if type(o).__name__ == "GatedFFN"]
        dense_bytes = {"mlp_dense_bytes": sum(all_bytes(o.group) for o in mlps),
                       "down_dense_bytes": sum(all_bytes(o.group[2:]) for o in mlps)}
    n = NEW_TOKENS - 1
    return {"window": window, "budget": budget, **{f"{k}_per_token": v / n for k, v in tot.items()},
            "groups_needed_share": tot["groups_needed"] / (n * groups), **dense_bytes, "window_bytes_max": max(held),
            "window_bytes_mean": float(np.mean(held)), "decode_cpu_s_per_token": cpu / n}


def group_need_by_size(bundle: str, hf: Path) -> dict:
    """At S = 0, the share of neuron groups of each size a decode position needs (some neuron in it is
    nonzero), over the decoded passage: in the bundle's neuron order and in the source's. From
    transformers' own activations; the bundle's order from matching its float gate rows."""
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    model = LlamaForCausalLM.from_pretrained(hf, attn_implementation="eager").eval()
    from nadoo.runtime.files import read_text
    from nadoo.runtime.generate import LanguageModel

    with session(bundle, "float", 0.0) as sess:
        start, pre = PASSAGE
        passage = LanguageModel(sess).encode(read_text(TEXT, "text"))[start:start + pre + NEW_TOKENS - 1]
        ops = [o for o in sess.ops if type(o).__name__ == "GatedFFN"]
        perms = []
        for i, op in enumerate(ops):
            ours = op.env.store.full(op.gate, op.tiers_g)
            src = model.model.layers[i].mlp.gate_proj.weight.detach().numpy()
            index = {row.tobytes(): j for j, row in enumerate(src)}
            perms.append(np.array([index[row.tobytes()] for row in ours]))
    acts = {}
    hooks = [layer.mlp.down_proj.register_forward_hook(lambda m, inp, out, i=i: acts.__setitem__(i, inp[0][0].numpy()))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(torch.tensor([passage]))
    for h in hooks:
        h.remove()
    out = {"bundle_order": {}, "source_order": {}}
    for size in GROUP_SIZES:
        for key, order in (("bundle_order", perms), ("source_order", [None] * len(perms))):
            need = []
            for i, perm in enumerate(order):
                a = acts[i][pre:]  # decode positions
                a = a[:, perm] if perm is not None else a
                nz = np.logical_or.reduceat(a != 0, np.arange(0, a.shape[1], size), axis=1)
                need.append(nz.mean())
            out[key][str(size)] = float(np.mean(need))
    out["zero_share"] = float(np.mean([(acts[i][pre:] == 0).mean() for i in acts]))
    return out


def first_difference(a: list, b: list) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(out["points"], key=lambda p: p["ffn_sparsity_target"])
    xs = [100 * p["ffn_sparsity_target"] for p in pts]
    base = pts[0]["perplexity"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))
    axes[0].plot(xs, [100 * (p["perplexity"] / base - 1) for p in pts], "o-", label="perplexity vs dense")
    axes[0].plot(xs, [100 * p["top1_agreement"] for p in pts], "s--", label="top-1 = dense (%)")
    axes[0].plot(xs, [100 * p["ffn_sparsity"] for p in pts], "^:", label="neurons skipped (%)")
    axes[0].set(xlabel="FFN sparsity target (%)", ylabel="%", title=f"GPL-3 (held out), ctx {CTX}")
    axes[0].plot(xs, [100 * p["ffn_zero_share"] for p in pts], "x:", label="exact zeros (%)")
    w0 = [next(d for d in p["decode"] if d["window"] == 0) for p in pts]
    axes[1].plot(xs, [100 * d["down_bytes_read_per_token"] / d["down_dense_bytes"] for d in w0], "o-", label="down bytes read")
    axes[1].plot(xs, [100 * d["bytes_read_per_token"] / d["mlp_dense_bytes"] for d in w0], "s-",
                 label="MLP bytes read (gate+up+down)")
    axes[1].plot(xs, [100 * d["mlp_macs_per_token"] / d["mlp_dense_macs_per_token"] for d in w0], "^:", label="MLP MACs")
    axes[1].set(xlabel="FFN sparsity target (%)", ylabel="% of dense per decode token", title="no window, under the budget",
                ylim=(0, 105))
    for p in pts:
        ws = sorted(p["decode"], key=lambda d: d["window"])
        axes[2].plot([d["window"] for d in ws], [d["down_bytes_read_per_token"] / 1024 for d in ws], "o-",
                     label=f"S={p['ffn_sparsity_target']:.2f}")
    axes[2].set(xlabel="neuron window W (tokens)", ylabel="KiB per decode token", title="down bytes read vs W (GPL-3 passage)",
                xscale="symlog")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"ReLU char-level Llama (examples/relu_lm.py), {out['bits']}-bit, budget {out['budget']} "
                 f"(load {out['loadavg_start'][0]:.1f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(ROOT / "work_out" / "relu_lm" / "relu_lm.ndc"))
    ap.add_argument("--hf", default=str(ROOT / "work_out" / "relu_lm" / "hf"), help="the source folder (group sizes)")
    ap.add_argument("--bits", default="8")
    ap.add_argument("--sparsity", default="0,0.25,0.4,0.5,0.7,0.8,0.85,0.9")
    ap.add_argument("--window", default="0,1,2,4,8,16")
    ap.add_argument("--memory-budget", default="256KB", help="cache budget for the bytes-read runs")
    ap.add_argument("--out", default=str(ROOT / "work_out" / "relu_sparsity.json"))
    args = ap.parse_args()
    if not Path(args.bundle).is_file():
        sys.exit(f"no bundle at {args.bundle}: run examples/relu_lm.py first")
    out = {"bundle": args.bundle, "bits": args.bits, "budget": args.memory_budget, "loadavg_start": os.getloadavg(),
           "points": []}
    out["group_need_by_size"] = group_need_by_size(args.bundle, Path(args.hf))
    print("group-need share at S=0 by group size:", json.dumps(out["group_need_by_size"]), flush=True)
    dense = None
    for s in (float(x) for x in args.sparsity.split(",")):
        p = {"ffn_sparsity_target": s, **quality(args.bundle, args.bits, s)}
        dense = dense or p  # the first point is the reference (run sparsity 0 first)
        same = [sum(x == y for x, y in zip(q["token_ids"], d["token_ids"])) for q, d in zip(p["prompts"], dense["prompts"])]
        p["greedy_agreement"] = sum(same) / (NEW_TOKENS * len(PROMPTS))
        p["top1_agreement"] = float(np.mean(np.equal(p["top1"], dense["top1"])))
        p["first_difference"] = [first_difference(q["token_ids"], d["token_ids"])
                                 for q, d in zip(p["prompts"], dense["prompts"])]
        p["decode"] = [budget_decode(args.bundle, args.bits, s, args.memory_budget, int(w))
                       for w in args.window.split(",")]
        out["points"].append(p)
        if s == 0:
            from nadoo.runtime.policy import parse_size

            out["same_memory_no_window"] = [
                {"window_equivalent": d["window"], **budget_decode(
                    args.bundle, args.bits, s, str(parse_size(args.memory_budget) + d["window_bytes_max"]), 0)}
                for d in p["decode"] if d["window"] > 0]
            print("S=0, no window, budget + the window's bytes: " + ", ".join(
                f"W{d['window_equivalent']}-equivalent {d['down_bytes_read_per_token'] / 1024:.1f} KiB"
                for d in out["same_memory_no_window"]), flush=True)
        out["loadavg_end"] = os.getloadavg()
        Path(args.out).write_text(json.dumps(out, indent=1))
        d0 = p["decode"][0]
        print(f"S={s:.2f}: ppl {p['perplexity']:.4f}, skipped {p['ffn_sparsity']:.3f} (zeros {p['ffn_zero_share']:.3f}), "
              f"top-1 = dense {p['top1_agreement']:.3f}, greedy = dense {p['greedy_agreement']:.3f} first diff {p['first_difference']}, groups needed "
              f"{d0['groups_needed_share']:.3f}, MLP {d0['bytes_read_per_token'] / 1024:.1f} KiB/token (down "
              + ", ".join(f"W{d['window']} {d['down_bytes_read_per_token'] / 1024:.1f}" for d in p["decode"])
              + f"), MACs {d0['mlp_macs_per_token'] / d0['mlp_dense_macs_per_token']:.3f} of dense, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    plot(out, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
