"""A real ReLU language model end to end: the model FFN activation sparsity and neuron windowing are for.

Trains a small character-level Llama with ReLU MLPs (transformers' LlamaForCausalLM as shipped,
`hidden_act="relu"`: down(relu(gate·x) ⊙ up·x); 4 layers, hidden 128, intermediate 512) on the
license texts in /usr/share/common-licenses except GPL-3, which is held out for perplexity; saves it
as a Hugging Face folder (config.json + model.safetensors + tokenizer.json) and compiles it with
`nadoo compile DIR --keep-float --calib-text` (the training text). Prints the held-out perplexity of
torch and of the float bundle, and the share of exact zeros of every MLP's down-projection input.

Everything is cached under OUT: training is skipped when OUT/hf exists (--retrain to redo it), the
compile when the bundle is newer than the folder.

    nice -n 10 .venv/bin/python examples/relu_lm.py [--steps 750] [--out work_out/relu_lm] [--retrain]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

for _v in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):  # one core, before numpy loads
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LICENSES = Path("/usr/share/common-licenses")
HELD_OUT = LICENSES / "GPL-3"
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
CTX = 128  # training windows; the model has 256 positions
CONFIG = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=256, hidden_act="relu", tie_word_embeddings=True,
              pad_token_id=0, eos_token_id=1, bos_token_id=2, rms_norm_eps=1e-5)


def training_texts() -> list[Path]:
    """Every license text once (GPL, GFDL and LGPL are links to their latest versions), GPL-3 left out."""
    seen, out = {HELD_OUT.resolve()}, []
    for p in sorted(LICENSES.iterdir()):
        r = p.resolve()
        if r.is_file() and r not in seen:
            seen.add(r)
            out.append(p)
    return out


def char_tokenizer_json(text: str) -> str:
    """A sentencepiece-style BPE without merges: one token per character of the training text (spaces
    as "▁"), byte fallback for every other character: ids are characters. (Its Metaspace pre-tokenizer
    is not the layout runtime/bpe.py re-implements, so text in and out needs the tokenizers package.)"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = sorted(set(text.replace(" ", "▁")))
    tok = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=len(SPECIALS) + len(alphabet), special_tokens=SPECIALS,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator([text], trainer)
    j = json.loads(tok.to_str())
    vocab = j["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return json.dumps(j)


def encode(tokenizer_json: str, text: str) -> np.ndarray:
    from tokenizers import Tokenizer

    return np.asarray(Tokenizer.from_str(tokenizer_json).encode(text, add_special_tokens=False).ids, np.int64)


def train(model, data: np.ndarray, steps: int, batch: int = 24, lr: float = 3e-3) -> float:
    """AdamW with a short warm-up and a cosine decay over a fixed number of steps (not a time budget:
    the same steps and seed give the same model on a loaded machine); deterministic batches. Returns
    the seconds it took."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng = np.random.default_rng(0)
    model.train()
    t0 = time.time()
    for step in range(steps):
        el = time.time() - t0
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + np.cos(np.pi * step / steps))
        i = rng.integers(0, len(data) - CTX - 1, batch)
        x = torch.from_numpy(np.stack([data[j:j + CTX] for j in i]))
        y = torch.from_numpy(np.stack([data[j + 1:j + CTX + 1] for j in i]))
        loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.reshape(-1, model.config.vocab_size),
                                                 y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            print(f"  step {step + 1}: loss {loss.item():.3f} ({el:.0f} s)", flush=True)
    model.eval()
    return time.time() - t0


def torch_eval(model, ids: np.ndarray, context: int) -> tuple[float, list[float]]:
    """Perplexity as `nadoo perplexity --context` scores it (consecutive windows, second half of each
    scored, no BOS: the tokenizer adds none), and per layer the share of exact zeros in the input of
    down (relu(gate·x) ⊙ up·x: zero wherever the ReLU is)."""
    import torch

    zeros = [[0, 0] for _ in model.model.layers]

    def hook(i):
        def f(_mod, inp, _out):
            zeros[i][0] += int((inp[0] == 0).sum())
            zeros[i][1] += inp[0].numel()
        return f

    hooks = [layer.mlp.down_proj.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    nll = []
    with torch.no_grad():
        for w in range(len(ids) // context):
            win = torch.from_numpy(ids[w * context:(w + 1) * context][None])
            logp = torch.log_softmax(model(input_ids=win).logits[0].double(), -1)
            first = context // 2
            nll.append(-logp[first:-1].gather(1, win[0, first + 1:, None]).squeeze(1).numpy())
    for h in hooks:
        h.remove()
    return float(np.exp(np.concatenate(nll).mean())), [z / max(n, 1) for z, n in zeros]


def build(out: Path, steps: int, retrain: bool) -> Path:
    """The trained HF folder OUT/hf (trained now unless cached)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = out / "hf"
    if (hf / "model.safetensors").is_file() and not retrain:
        print(f"reusing {hf}")
        return hf
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in training_texts()]
    text = "\n\n".join(texts)
    tok_json = char_tokenizer_json(text)
    data = encode(tok_json, text)
    vocab = len(json.loads(tok_json)["model"]["vocab"])
    print(f"training text: {len(texts)} licenses, {len(data)} characters; vocabulary {vocab}")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, attn_implementation="eager", **CONFIG))
    seconds = train(model, data, steps)
    print(f"trained {steps} steps in {seconds:.0f} s")
    hf.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(hf, safe_serialization=True)
    (hf / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    (out / "calib.txt").write_text(text, encoding="utf-8")
    return hf


def compile_bundle(hf: Path, out: Path) -> Path:
    bundle = out / "relu_lm.ndc"
    if bundle.is_file() and bundle.stat().st_mtime > (hf / "model.safetensors").stat().st_mtime:
        print(f"reusing {bundle}")
        return bundle
    t = time.time()
    cmd = [sys.executable, "-m", "nadoo.runtime.cli", "compile", str(hf), "-o", str(bundle), "--keep-float",
           "--calib-text", str(out / "calib.txt")]
    subprocess.run(cmd, check=True)
    print(f"compiled in {time.time() - t:.0f} s")
    return bundle


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=750, help="training steps of 24 x 128 characters (~6 min on one core)")
    ap.add_argument("--out", default=str(ROOT / "work_out" / "relu_lm"))
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--context", type=int, default=128)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hf = build(out, args.steps, args.retrain)
    bundle = compile_bundle(hf, out)

    import torch
    from transformers import LlamaForCausalLM

    import nadoo.runtime as nd
    from nadoo.runtime.generate import perplexity

    torch.set_num_threads(1)
    model = LlamaForCausalLM.from_pretrained(hf, attn_implementation="eager").eval()
    text = HELD_OUT.read_text(encoding="utf-8")
    ids = encode((hf / "tokenizer.json").read_text(encoding="utf-8"), text)
    ppl, zeros = torch_eval(model, ids, args.context)
    with nd.Session(bundle, nd.Policy(bits="float")) as s:
        ours = perplexity(s, text, context=args.context)
    print(f"held-out GPL-3 ({len(ids)} characters, ctx {args.context}, second halves scored):")
    print(f"  perplexity per character: torch {ppl:.4f}, nadoo float {ours['perplexity']:.4f}")
    print("  exact zeros in each MLP's down input (torch): " + ", ".join(f"{z:.1%}" for z in zeros))


if __name__ == "__main__":
    main()
