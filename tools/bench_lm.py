#!/usr/bin/env python
"""The language-model benchmark: Gemma 3 270M in nadoo (each tier, each engine) beside llama.cpp on the
same GGUF, side by side in one run, one process at a time, medians of repeated runs.

For every row: decode tok/s and prefill tok/s (128-token prompt) at 1 and 2 threads, a cold process
(start, open, prompt, 32 greedy tokens) in wall seconds, its peak RSS, and for nadoo the bytes read
per decoded token. transformers' fp32 figures come from tools/lm_reference.py's record (it takes
15 minutes; not rerun here). llama.cpp is built by tools/llama_cpp.py (cached).

    .venv/bin/python tools/bench_lm.py --bundle work_out/gemma.ndc --gguf work_out/gemma-3-270m-q4_k_m.gguf
        [--bits 8,4,4+embed8] [--engines numpy,ort,ort-int8] [--threads 1,2] [--repeat 3] [--perplexity]

A weights entry B+embed8 is `--bits B --bits-for embed=8` (the embedding and the head tied to it at 8 bits,
as the GGUF's Q4_K_M keeps them); the engine ort-int8 is `--engine ort --ort-int8` (int8 activations).

nadoo's sources are byte-compiled first (`byte_compile`), as an installed package is.
Writes work_out/bench_lm.json and prints the README table. Two threads on a shared machine: llama.cpp
runs with OMP_WAIT_POLICY=PASSIVE so its spinning threads do not steal the other jobs' core.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
PROMPT = "The capital of France is"
TEXT = "/usr/share/common-licenses/GPL-3"


def _env(threads: int) -> dict:
    t = str(threads)
    return {**os.environ, "OMP_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t, "MKL_NUM_THREADS": t,
            "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}


def _timed(cmd: list, env: dict) -> tuple[float, int, str]:
    """Wall seconds, the process's peak RSS in bytes (GNU time's %M) and its stdout."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as f:
        t0 = time.perf_counter()
        r = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", f.name, *map(str, cmd)], capture_output=True,
                           text=True, env=env)
        wall = time.perf_counter() - t0
        if r.returncode:
            raise SystemExit(f"{' '.join(map(str, cmd[:3]))} failed: {r.stderr.strip()[-400:]}")
        return wall, int(f.read().split()[-1]) * 1024, r.stdout

# ------------------------------------------------------------------------------------------ llama.cpp
def llama_rows(gguf: str, threads: list[int], repeat: int, with_ppl: bool) -> list[dict]:
    import llama_cpp

    bin_dir = llama_cpp.build()
    rows = []
    for t in threads:
        wall, rss, out = _timed([str(bin_dir / "llama-bench"), "-m", gguf, "-p", "128", "-n", "64", "-t", str(t),
                                 "-r", str(repeat), "-o", "json"], _env(t))
        res = json.loads(out)
        pp = next(r for r in res if r["n_prompt"] > 0)["avg_ts"]
        tg = next(r for r in res if r["n_gen"] > 0)["avg_ts"]
        colds, rss_cold = [], 0
        for _ in range(repeat):
            w, rss_cold, _ = _timed([str(bin_dir / "llama-completion"), "-m", gguf, "-p", PROMPT, "-n", "32",
                                     "-t", str(t), "--temp", "0", "-no-cnv", "--no-warmup"], _env(t))
            colds.append(w)
        rows.append({"engine": "llama.cpp", "weights": "Q4_K_M (the file)", "threads": t, "prefill_tok_s": pp,
                     "decode_tok_s": tg, "cold_s": statistics.median(colds), "peak_rss_bytes": rss_cold})
    if with_ppl:
        _, _, out = _timed([str(bin_dir / "llama-perplexity"), "-m", gguf, "-f", TEXT, "-c", "512",
                            "-t", str(max(threads))], _env(max(threads)))
        rows[0]["perplexity_log"] = out[-300:]
    return rows


# ------------------------------------------------------------------------------------------ nadoo
def _nadoo(args: list, threads: int) -> dict:
    cmd = [sys.executable, "-m", "nadoo.runtime.cli", *args, "--json"]
    wall, rss, out = _timed(cmd, _env(threads))
    rec = json.loads(out)
    rec["wall_s"], rec["process_rss_bytes"] = wall, rss
    return rec


def byte_compile() -> None:
    """nadoo's sources compiled into __pycache__, as `pip install` leaves a package: where
    PYTHONDONTWRITEBYTECODE is set (as on this machine) and nothing was compiled, every cold process
    compiled its ~75 modules again (0.2 s more CPU for the generate path's imports at load 5), which no
    installed nadoo does."""
    import compileall

    for d in ("runtime", "compiler"):
        compileall.compile_dir(str(ROOT / d), quiet=1)


def nadoo_rows(bundle: str, bits: list[str], engines: list[str], threads: list[int], repeat: int,
               with_ppl: bool) -> list[dict]:
    byte_compile()
    long_prompt = ",".join(str(2 + (i * 7919) % 250000) for i in range(128))  # 128 ids: prefill speed only
    rows = []
    for b in bits:
        for e in engines:
            extra = _weights_args(b) + _engine_args(e)
            for t in threads:
                extra_t = extra + ["--threads", str(t)]  # ORT's intra-op threads (OMP_* set NumPy's BLAS)
                colds = [_nadoo(["generate", bundle, "--prompt", PROMPT, "--max-new-tokens", "32", "--no-eos",
                                 *extra_t], t) for _ in range(repeat)]
                pre = [_nadoo(["generate", bundle, "--prompt-ids", long_prompt, "--max-new-tokens", "1", *extra_t], t)
                       for _ in range(repeat)]
                last = colds[-1]
                row = {"engine": f"nadoo ({last.get('engine', e)}{', int8' if e == 'ort-int8' else ''})", "weights": b, "threads": t,
                       "prefill_tok_s": statistics.median(128 / r["ttft_s"] for r in pre),
                       "decode_tok_s": statistics.median(r["decode_tokens_per_s"] for r in colds),
                       "cold_s": statistics.median(r["wall_s"] for r in colds),
                       "peak_rss_bytes": max(r["process_rss_bytes"] for r in colds),
                       "bytes_read_per_token": last["bytes_read_per_token"],
                       "resident_weight_bytes": last.get("resident_weight_bytes"), "text": last["text"]}
                if with_ppl and t == threads[0]:
                    row["perplexity"] = _nadoo(["perplexity", bundle, "--text-file", TEXT, "--context", "512",
                                                *extra_t], t)["perplexity"]
                rows.append(row)
                print(_line(row), flush=True)
    return rows


def _weights_args(b: str) -> list[str]:
    bits, _, mix = b.partition("+")
    return ["--bits", bits] + (["--bits-for", "embed=8"] if mix == "embed8" else [])


def _engine_args(e: str) -> list[str]:
    if e == "default":
        return []
    return ["--engine", "ort", "--ort-int8"] if e == "ort-int8" else ["--engine", e]


def _line(r: dict) -> str:
    mib = lambda v: "–" if v is None else f"{v / 2**20:.0f} MiB"  # noqa: E731
    ppl = f"{r['perplexity']:.4f}" if "perplexity" in r else "–"
    per_tok = "–" if r.get("bytes_read_per_token") is None else f"{r['bytes_read_per_token'] / 2**10:.1f} KiB"
    return (f"| {r['engine']} | {r['weights']} | {r['threads']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
            f"{r['cold_s']:.2f} s | {mib(r['peak_rss_bytes'])} | {per_tok} | {ppl} |")


def gemma_parser(doc: str, bits: str) -> argparse.ArgumentParser:
    """The arguments of every Gemma figures tool (this one, gemma_figures.py): the bundle and its tiers."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(ROOT / "work_out" / "gemma.ndc"))
    ap.add_argument("--bits", default=bits)
    return ap


def main():
    ap = gemma_parser(__doc__, "8,4")
    ap.add_argument("--gguf", default=str(ROOT / "work_out" / "gemma-3-270m-q4_k_m.gguf"))
    ap.add_argument("--engines", default="default", help="comma list of --engine values or ort-int8 (default: the CLI's)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--perplexity", action="store_true", help="also score GPL-3 at context 512 (slow)")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "work_out" / "bench_lm.json"))
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    rec = {"loadavg_start": os.getloadavg(), "rows": []}
    print("| engine | weights | threads | prefill tok/s | decode tok/s | cold process (32 tokens) | peak RSS | "
          "read per token | perplexity |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    if not a.skip_llama:
        for r in llama_rows(a.gguf, threads, a.repeat, a.perplexity):
            rec["rows"].append(r)
            print(_line(r), flush=True)
    rec["rows"] += nadoo_rows(a.bundle, a.bits.split(","), a.engines.split(","), threads, a.repeat, a.perplexity)
    rec["loadavg_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rec, indent=1))
    print(f"load average {rec['loadavg_start']} -> {rec['loadavg_end']}")


if __name__ == "__main__":
    main()
