#!/usr/bin/env python
"""Where a `generate` process's memory goes, phase by phase: the peak RSS (VmHWM) reached in each
phase and the RSS left after it (imports, open, tokenizer, prefill, each decode step), reset between
phases through /proc/self/clear_refs so each phase's own peak shows, with glibc's heap (bytes in use,
free bytes it keeps, mmapped blocks) and the CPU seconds of the phase.

    .venv/bin/python tools/lm_memory.py --bundle work_out/gemma.ndc --bits 4 --memory-budget 64MB [--tokens 8]
        [--engine ort --ort-int8 --threads 1] [--tracemalloc] [--where] [--profile-open]

--tracemalloc adds the traced Python/NumPy bytes (now and the phase's traced peak) and the largest live
allocation sites after each phase (tracing itself adds RSS and time); --where samples RSS in a thread and
prints the main thread's stack at each phase's highest sample (a hint: the GIL makes sampling coarse);
--profile-open prints a cProfile of the open (Session construction). Linux (glibc) only.
"""
from __future__ import annotations

import argparse
import ctypes
import sys
import time

PROMPT = "The capital of France is"
MiB = 1 << 20


def _status() -> dict:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap() -> str:
    """glibc's view: bytes in use from the heap, free bytes it keeps there, bytes in mmapped blocks."""
    try:
        f = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return ""
    f.restype = _Mallinfo2
    m = f()
    return f"  heap used {m.uordblks / MiB:6.1f}, free {m.fordblks / MiB:5.1f}, mmapped {m.hblkhd / MiB:5.1f} MiB"


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


class Phases:
    def __init__(self, trace: bool):
        self.trace = trace
        self.t = time.process_time()
        self.rows = []

    def mark(self, name: str) -> None:
        s = _status()
        cpu = time.process_time() - self.t
        top = []
        if self.trace:
            import tracemalloc

            cur, peak = tracemalloc.get_traced_memory()
            top = [(st.size, str(st.traceback[0])) for st in tracemalloc.take_snapshot().statistics("lineno")[:6]]
            tracemalloc.reset_peak()
            self.rows.append((name, s, cpu, (cur, peak), top))
        else:
            self.rows.append((name, s, cpu, None, top))
        print(f"{name:<16} peak {s['VmHWM'] / MiB:7.1f} MiB  after {s['VmRSS'] / MiB:7.1f} MiB "
              f"(anon {s['RssAnon'] / MiB:6.1f}, file {s['RssFile'] / MiB:5.1f})  cpu {cpu:6.3f} s" + _heap()
              + (f"  traced {cur / MiB:6.1f} MiB, peak {peak / MiB:6.1f} MiB" if self.trace else ""), flush=True)
        for size, where in top:
            print(f"      {size / MiB:7.2f} MiB live  {where}")
        if self.watch is not None:
            self.watch.report(name)
        _reset_peak()
        self.t = time.process_time()


class PeakWatch:
    """A thread reading VmRSS every millisecond that keeps the main thread's stack at the highest RSS seen
    (where a phase's peak is set; the GIL makes the sampling coarse, so treat it as a hint)."""

    def __init__(self):
        import threading

        self.main = threading.main_thread().ident
        self.best, self.stack, self.stop = 0, [], False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        import traceback

        while not self.stop:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * 4096
            if rss > self.best:
                frame = sys._current_frames().get(self.main)
                self.best = rss
                self.stack = traceback.format_stack(frame)[-6:] if frame is not None else []
            time.sleep(0.001)

    def report(self, name):
        print(f"   highest RSS sampled in {name}: {self.best / MiB:.1f} MiB at")
        for line in self.stack:
            print("     " + line.strip().replace("\n", " | "))
        self.best, self.stack = 0, []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--bits", default="4")
    ap.add_argument("--memory-budget", default=None)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ort-int8", action="store_true")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--tracemalloc", action="store_true")
    ap.add_argument("--profile-open", action="store_true")
    ap.add_argument("--where", action="store_true", help="sample RSS in a thread: the stack at each phase's peak")
    a = ap.parse_args()
    if a.tracemalloc:
        import tracemalloc

        tracemalloc.start(1)
    ph = Phases(a.tracemalloc)
    ph.watch = PeakWatch() if a.where else None
    ph.mark("start")
    import numpy  # noqa: F401

    from nadoo.runtime import Policy, Session
    ph.mark("imports")
    prof = None
    if a.profile_open:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    sess = Session(a.bundle, policy=Policy(bits=a.bits), memory_budget=a.memory_budget, engine=a.engine,
                   threads=a.threads, ort_int8=a.ort_int8)
    if prof is not None:
        prof.disable()
    ph.mark("open")
    if prof is not None:
        import pstats

        pstats.Stats(prof).sort_stats("cumulative").print_stats(45)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    s = sess.stream(a.prompt, max_new_tokens=a.tokens)  # opens the tokenizer and encodes the prompt
    ph.mark("tokenizer")
    toks = []
    for i, t in enumerate(s):
        toks.append(t.id)
        ph.mark("prefill" if i == 0 else f"decode {i}")
    print("tokens", toks, "engine", sess.engine, "cache", sess.cache.bytes, "kv", sess.state.nbytes)
    print("process peak", max(r[1]["VmHWM"] for r in ph.rows) / MiB, "MiB")


if __name__ == "__main__":
    sys.exit(main())
