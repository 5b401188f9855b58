"""One Session run from many threads at once (as ONNX Runtime allows): outputs bit-identical to serial
runs, per-call statistics that do not mix, and a cache whose byte count stays exact and in budget."""

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nadoo.compiler.pipeline import CompileOptions, compile_model  # noqa: E402
from nadoo.runtime import BundleError, Policy, Session  # noqa: E402
from nadoo.runtime.reader import Bundle  # noqa: E402

THREADS, RUNS = 8, 50
# statistics that depend only on the input, not on what the shared cache held at the time
LAYER_KEYS = ("chunks_read", "chunks_total", "macs", "dense_macs", "tiers", "dense_fallback")
CALL_KEYS = ("chunks_read", "chunks_total", "macs", "dense_macs")


class _FFN(torch.nn.Module):
    """A ReLU FFN wide enough that its decoded weights (4 MiB), nor its 4-bit payloads, fit a 300 KB budget."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.up = torch.nn.Linear(256, 2048)
        self.down = torch.nn.Linear(2048, 256)
        self.head = torch.nn.Linear(256, 10)
        with torch.no_grad():
            for m in (self.down, self.head):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight.shape[1] ** 0.5)
            # low rank: which neurons fire depends on the input, and the stored sketch can predict it
            self.up.weight.copy_(torch.randn(2048, 8, generator=g) @ torch.randn(8, 256, generator=g) / 45)
            self.up.bias.fill_(-1.0)  # most neurons off per input: routable

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))))


@pytest.fixture(scope="module")
def ffn(tmp_path_factory):
    d = tmp_path_factory.mktemp("ffn")
    torch.jit.save(torch.jit.trace(_FFN().eval(), torch.zeros(1, 256)), d / "m.pt")
    np.savez(d / "calib.npz", x=np.random.default_rng(1).standard_normal((48, 256)).astype(np.float32))
    compile_model(d / "m.pt", d / "m.ndc", CompileOptions(calib=str(d / "calib.npz"), chunks=16, route_threshold=0.0,
                  quant_method="rtn"), quiet=True)
    return d / "m.ndc"


def _inputs(n=32):
    rng = np.random.default_rng(7)
    return [{"x": rng.standard_normal((1, 256)).astype(np.float32)} for _ in range(n)]


def _hammer(sess, feeds: list, check=None, runs=RUNS) -> list:
    """THREADS threads × `runs` calls on one session, started together; returns (input index, outputs,
    stats) of every call. `check(sess)` runs between calls in every thread (invariants under load)."""
    barrier = threading.Barrier(THREADS)

    def work(t):
        barrier.wait()
        got = []
        for i in range(runs):
            k = (t * 5 + i) % len(feeds)
            outs, st = sess.run_with_stats(None, feeds[k])
            assert sess.last_stats is st  # this thread's own last call, whatever the others did
            got.append((k, outs, st))
            if check:
                check(sess)
        return got

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: races show up in a few hundred calls
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            return [r for f in [pool.submit(work, t) for t in range(THREADS)] for r in f.result()]
    finally:
        sys.setswitchinterval(old)


def _serial(path, feeds, **kw):
    with Session(path, **kw) as s:
        return [s.run_with_stats(None, f) for f in feeds]


def _cache_ok(sess):
    c = sess.cache
    with c.lock:
        assert c.bytes == c.held_bytes()
        assert c.budget is None or c.bytes <= c.budget


def _same_work(st, ref):
    assert {k: st[k] for k in CALL_KEYS} == {k: ref[k] for k in CALL_KEYS}
    assert st["cache_hits"] + st["cache_misses"] == ref["cache_hits"] + ref["cache_misses"]
    for name, layer in ref["layers"].items():
        assert {k: st["layers"][name][k] for k in LAYER_KEYS} == {k: layer[k] for k in LAYER_KEYS}, name
    expert_bytes = st["moe"]["expert_bytes_read"] if "moe" in st else 0
    assert sum(layer["bytes_read"] for layer in st["layers"].values()) + expert_bytes == st["bytes_read"]


def test_topk_under_budget_from_many_threads(ffn):
    feeds = _inputs()
    kw = dict(policy=Policy("topk", bits="4", topk=0.25), memory_budget="300KB")
    ref = _serial(ffn, feeds, **kw)
    with Session(ffn, **kw) as s:
        assert s.cache.pinned_bytes > 0 and s.cache.budget == 300_000
        s.bundle.reset_counters()
        calls = _hammer(s, feeds, check=_cache_ok)
        _cache_ok(s)
        assert s.cache.peak_bytes <= s.cache.budget and s.cache.evictions > 0  # the budget was under pressure
        # every byte read was counted by exactly one call
        assert sum(st["bytes_read"] for _, _, st in calls) == s.bundle.bytes_read
        assert sum(st["payloads_read"] for _, _, st in calls) == s.bundle.payloads_read
    assert len(calls) == THREADS * RUNS
    for k, outs, st in calls:
        ref_outs, ref_st = ref[k]
        assert all(np.array_equal(a, b) for a, b in zip(outs, ref_outs))  # bit-identical
        _same_work(st, ref_st)


def test_bytes_per_call_are_exact_when_nothing_is_cached(ffn):
    """With a budget no chunk fits in, every call reads all it needs itself: its byte counts must equal
    a serial run's exactly, so any mixing between concurrent calls would show."""
    feeds = _inputs(6)
    kw = dict(policy=Policy("topk", bits="8", topk=0.5), memory_budget=64)
    ref = _serial(ffn, feeds, **kw)
    with Session(ffn, **kw) as s:
        calls = _hammer(s, feeds)
        assert s.cache.bytes == 0
    for k, outs, st in calls:
        ref_outs, ref_st = ref[k]
        assert all(np.array_equal(a, b) for a, b in zip(outs, ref_outs))
        _same_work(st, ref_st)
        for key in ("bytes_read", "disk_bytes_read", "payloads_read", "cache_misses"):
            assert st[key] == ref_st[key], key
        assert {n: v["bytes_read"] for n, v in st["layers"].items()} == \
            {n: v["bytes_read"] for n, v in ref_st["layers"].items()}


def test_moe_bundle_from_many_threads(tmp_path):
    pytest.importorskip("transformers")
    from examples.moe_models import TinyMixtralLM

    torch.save(TinyMixtralLM().state_dict(), tmp_path / "m.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", input_ids=rng.integers(0, 128, (16, 12)).astype(np.int64))
    compile_model(tmp_path / "m.pt", tmp_path / "m.ndc", CompileOptions(
        calib=str(tmp_path / "calib.npz"), model_class="examples.moe_models:TinyMixtralLM", quant_method="rtn"),
        quiet=True)
    feeds = [{"input_ids": rng.integers(0, 128, (1, 6)).astype(np.int64)} for _ in range(8)]
    with Bundle.open(tmp_path / "m.ndc") as b:  # five experts' 4-bit payloads: evictions on every few calls
        budget = 5 * next(iter(b.moe.values())).expert_bytes("q4")
    kw = dict(policy=Policy(bits="4", prefetch=True), memory_budget=budget)
    ref = _serial(tmp_path / "m.ndc", feeds, **kw)
    with Session(tmp_path / "m.ndc", **kw) as s:
        calls = _hammer(s, feeds, check=_cache_ok, runs=20)  # concurrent too: routing stats and prefetch are per call
        _cache_ok(s)
        assert s.cache.evictions > 0
    for k, outs, st in calls:
        ref_outs, ref_st = ref[k]
        assert all(np.array_equal(a, b) for a, b in zip(outs, ref_outs))
        _same_work(st, ref_st)
        for name, layer in ref_st["moe"]["layers"].items():
            got = st["moe"]["layers"][name]
            assert (got["usage"], got["tokens"], got["calls"]) == (layer["usage"], layer["tokens"], layer["calls"])


@pytest.mark.parametrize("kind", ["lru", "frequency"])
def test_cache_stays_exact_under_concurrent_get_put_pin(kind):
    from nadoo.runtime.cache import ChunkCache, FrequencyAware

    budget = 40 * 400
    c = ChunkCache(budget) if kind == "lru" else ChunkCache(budget, victim=FrequencyAware(window=6, decay=50))
    assert c.pin("pinned", np.zeros(400, np.float32)) and not c.pin("too big", np.zeros(budget, np.float32))

    def work(t):
        rng = np.random.default_rng(t)
        for _ in range(3000):
            key = int(rng.integers(0, 60))
            if c.get(key) is None:
                c.put(key, np.zeros(int(rng.integers(1, 300)), np.float32))
            if rng.random() < 0.01:
                _cache_ok_cache(c)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            for f in [pool.submit(work, t) for t in range(THREADS)]:
                f.result()  # re-raises what a thread hit (OrderedDict mutated during iteration, KeyError)
    finally:
        sys.setswitchinterval(old)
    _cache_ok_cache(c)
    assert c.hits + c.misses == THREADS * 3000 and c.evictions > 0 and "pinned" in c


def _cache_ok_cache(c):
    with c.lock:
        assert c.bytes == c.held_bytes() <= c.budget
        assert c.pinned_bytes == sum(a.nbytes for a in c._pinned.values())


def test_mmap_read_of_a_truncated_file_is_an_error_not_sigbus(ffn, tmp_path):
    """use_mmap=True: a bundle truncated while open must give BundleError, never kill the process."""
    victim = tmp_path / "v.ndc"
    victim.write_bytes(ffn.read_bytes())
    code = f"""
import os, sys
from nadoo.runtime import BundleError
from nadoo.runtime.reader import Bundle
b = Bundle.open({str(victim)!r}, use_mmap=True)
name = next(iter(b.tensors))
b.read_weight(name, "q8")  # readable while whole
os.truncate({str(victim)!r}, 4096)
try:
    b.read_weight(name, "q8")
except BundleError as e:
    print("BundleError:", e)
    sys.exit(0)
sys.exit(3)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr)  # -7 would be SIGBUS
    assert "shrank" in r.stdout
    with pytest.raises(BundleError):  # and the positioned-read default refuses it too
        Session(victim)
