"""A real mixture-of-experts LM end to end.

Trains a small character-level Mixtral (transformers' MixtralForCausalLM as shipped: 2 layers, hidden 128,
8 experts of 128→256→128 SwiGLU, top-2) on the source of Python's standard library for a few minutes on
CPU, compiles it with nadoo, and compares on held-out text:
  * perplexity: torch (dense source) vs the nadoo bundle at float / 8 / 4 / 2 bits / auto (8 or 4 by routing weight),
  * expert bytes a token needs (its top-2 experts) vs all experts, bytes actually read with an expert cache
    under a budget, cache hit rate, prefetch precision,
  * latency per batch: nadoo vs ONNX Runtime running a dense-equivalent export of the same model.

    .venv/bin/python examples/moe_lm.py [--seconds 150] [--out work_out/moe_lm]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Batch-1 NumPy work is many small products: one BLAS thread (as the nadoo CLI sets); before numpy loads.
for _v in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CTX = 64
VOCAB = 128  # 7-bit ASCII; other bytes map to '?'


def corpus(max_chars: int = 2_000_000) -> np.ndarray:
    """The stdlib's own source, as 7-bit character codes (ships with every Python)."""
    lib = Path(os.__file__).parent
    parts, n = [], 0
    for p in sorted(lib.glob("*.py")):
        t = p.read_text(encoding="utf-8", errors="replace")
        parts.append(t)
        n += len(t)
        if n >= max_chars:
            break
    b = np.frombuffer("\n".join(parts).encode("ascii", errors="replace"), np.uint8).astype(np.int64)
    return np.where(b < VOCAB, b, ord("?"))


class CharMixtral(torch.nn.Module):
    """forward(input_ids [B, T]) -> logits [B, T, 128]; no-argument constructor for --model-class."""

    def __init__(self):
        super().__init__()
        from transformers import MixtralConfig, MixtralForCausalLM

        torch.manual_seed(0)
        cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                            max_position_embeddings=CTX, use_cache=False, tie_word_embeddings=False,
                            router_aux_loss_coef=0.02, output_router_logits=False)
        self.lm = MixtralForCausalLM(cfg)

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids).logits


def train(model, data, seconds: float, batch: int = 32, lr: float = 3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(0)
    model.train()
    t0, step = time.time(), 0
    while time.time() - t0 < seconds:
        i = rng.integers(0, len(data) - CTX - 1, batch)
        x = torch.from_numpy(np.stack([data[j : j + CTX] for j in i]))
        y = torch.from_numpy(np.stack([data[j + 1 : j + CTX + 1] for j in i]))
        out = model.lm(input_ids=x, output_router_logits=True)
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, VOCAB), y.reshape(-1))
        total = loss + (out.aux_loss if out.aux_loss is not None else 0) * 0.02  # load balancing keeps all experts in use
        opt.zero_grad()
        total.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"  step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    return step


def dense_equivalent(model: "CharMixtral") -> "CharMixtral":
    """A copy whose MoE blocks compute every expert on every token and mask by the routing: the same
    function, exportable by torch.onnx for ONNX Runtime (which has no sparse MoE operator)."""
    from nadoo.compiler.moe import patch_moe_blocks

    dense = CharMixtral()
    dense.load_state_dict(model.state_dict())
    dense.eval()
    patch_moe_blocks(dense)
    for mod in dense.modules():
        if type(mod).__name__ == "NadooMoE":
            mod.dense_reference = True
    return dense


def perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1).mean()
    return float(np.exp(nll))


def median_ms(fn, n: int = 7) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=150)
    ap.add_argument("--out", default=str(ROOT / "work_out" / "moe_lm"))
    ap.add_argument("--reuse", action="store_true", help="skip training when OUT/moe_lm.pt exists")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)

    data = corpus()
    split = int(0.9 * len(data))
    train_data, test_data = data[:split], data[split:]
    print(f"corpus: {len(data)} characters of the stdlib source ({len(test_data)} held out)")
    model = CharMixtral()
    if args.reuse and (out / "moe_lm.pt").exists():
        model.load_state_dict(torch.load(out / "moe_lm.pt"))
        model.eval()
        print(f"reusing {out / 'moe_lm.pt'}")
    else:
        steps = train(model, train_data, args.seconds)
        print(f"trained {steps} steps in {args.seconds:.0f} s")
        torch.save(model.state_dict(), out / "moe_lm.pt")

    rng = np.random.default_rng(1)
    starts = rng.integers(0, len(test_data) - CTX - 1, 64)
    X = np.stack([test_data[s : s + CTX] for s in starts])
    Y = np.stack([test_data[s + 1 : s + CTX + 1] for s in starts])
    calib = np.stack([train_data[s : s + CTX] for s in rng.integers(0, len(train_data) - CTX, 64)])
    np.savez(out / "calib.npz", input_ids=calib)

    from nadoo.compiler.pipeline import CompileOptions, compile_model
    from nadoo.runtime import Policy, Session

    t = time.time()
    rep = compile_model(out / "moe_lm.pt", out / "moe_lm.ndc",
                        CompileOptions(calib=str(out / "calib.npz"), model_class="examples.moe_lm:CharMixtral",
                                       keep_float=True), quiet=True)
    print(rep.summary())
    print(f"compiled in {time.time() - t:.1f} s")

    with torch.no_grad():
        ref = model(torch.from_numpy(X)).numpy()
    print(f"\nperplexity on {X.size} held-out characters (64 windows x {CTX}):")
    print(f"  torch dense source          {perplexity(ref, Y):8.4f}")
    results = {}
    for bits in ("float", "8", "4", "2", "auto"):
        with Session(out / "moe_lm.ndc", Policy(bits=bits)) as s:
            (y,) = s.run(None, {"input_ids": X})
            results[bits] = s.last_stats
        cos = float((y * ref).sum() / np.linalg.norm(y) / np.linalg.norm(ref))
        print(f"  nadoo {bits:<5}                 {perplexity(y, Y):8.4f}   (logit cosine vs torch {cos:.6f}, "
              f"max |diff| {np.abs(y - ref).max():.2e})")

    m = results["4"]["moe"]
    print(f"\nexperts (4-bit): a token needs {m['expert_bytes_per_token'] / 1024:.1f} KiB of expert weights "
          f"of {m['all_expert_bytes'] / 1024:.1f} KiB for all experts ({m['expert_fraction_per_token']:.1%})")
    for name, L in m["layers"].items():
        print(f"  {name}: usage {L['usage']}")

    # Streaming windows one by one (batch 1) through an expert cache smaller than all experts.
    with Session(out / "moe_lm.ndc", Policy(bits="4")) as s:
        one = next(iter(s.bundle.moe.values())).expert_bytes("q4")
        decoded = 3 * 128 * 256 * 4
    other = 2 * 2**20  # room for the non-expert layers' decoded weights
    for prefetch in (False, True):
        budget = other + 6 * decoded  # 6 of the 16 experts fit
        with Session(out / "moe_lm.ndc", Policy(bits="4", prefetch=prefetch), memory_budget=budget) as s:
            read = tok = hits = look = pf_hit = pf_tot = 0
            for w in X[:32]:
                s.run(None, {"input_ids": w[None]})
                st = s.last_stats["moe"]
                read += st["expert_bytes_read"]
                tok += st["tokens"]
                look += st["cache_lookups"]
                hits += round((st["cache_hit_rate"] or 0) * st["cache_lookups"])
                pf = st["prefetch_precision"]
                if pf is not None:
                    pf_hit += pf
                    pf_tot += 1
            print(f"\n32 windows one at a time, 4-bit, cache budget {budget / 2**20:.2f} MiB (6 of 16 decoded experts), "
                  f"prefetch {'on' if prefetch else 'off'}:")
            print(f"  expert bytes read {read / 32 / 1024:.1f} KiB per window = {read / tok:.0f} B per token "
                  f"(all experts at 4 bits: {16 * one / 1024:.1f} KiB); cache hit rate {hits / max(look, 1):.1%}"
                  + (f"; prefetch precision {pf_hit / pf_tot:.1%}" if pf_tot else "")
                  + f"; peak cache {s.cache.peak_bytes / 2**20:.2f} MiB <= budget")

    # Speed: nadoo vs ONNX Runtime on a dense-equivalent export (every expert on every token).
    try:
        import onnxruntime as ort

        dense = dense_equivalent(model)
        ids = torch.from_numpy(X[:8])
        prog = torch.onnx.export(dense, (ids,), None, dynamo=True, input_names=["input_ids"],
                                 dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), verbose=False)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        sess = ort.InferenceSession(prog.model_proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        print("\nlatency, median of 7 (ms):   batch 1 x 64    batch 8 x 64")
        row = lambda label, f: print(f"  {label:<26} {median_ms(lambda: f(X[:1])):>8.2f}  {median_ms(lambda: f(X[:8])):>12.2f}")  # noqa: E731
        y_ort = sess.run(None, {name: X[:8]})[0]
        row("ONNX Runtime (dense MoE)", lambda x: sess.run(None, {name: x}))
        for bits in ("float", "8", "4"):
            with Session(out / "moe_lm.ndc", Policy(bits=bits)) as s:
                s.run(None, {"input_ids": X[:8]})  # warm the cache
                row(f"nadoo {bits} (warm cache)", lambda x: s.run(None, {"input_ids": x}))
        print(f"  (ORT dense-equivalent export vs torch: max |diff| {np.abs(y_ort - ref[:8]).max():.2e})")
    except Exception as e:  # ORT is optional
        print(f"\n(speed comparison with ONNX Runtime skipped: {type(e).__name__}: {e})")


if __name__ == "__main__":
    main()
