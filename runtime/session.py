"""The Python API, in the habits of ONNX Runtime's InferenceSession:

    import nadoo.runtime as nd
    sess = nd.Session("model.ndc", policy=nd.Policy("topk", bits="4", topk=0.5), memory_budget="16MB")
    (y,) = sess.run(None, {"x": x})
    print(sess.last_stats["bytes_read"])

Like ONNX Runtime's, `run` may be called from several threads at once on one Session: the chunk cache
is locked, reads are positioned (no shared file offset), and every call counts its statistics in a
context of its own (callstats). `last_stats` is per thread (the stats of that thread's last call),
made when first read (a caller who never reads them does not pay for them; `peak_rss_bytes` is then
the process's peak at that read); `run_with_stats` returns them with the outputs, made at once.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from . import callstats, chunked
from .cache import ChunkCache
from .engine import Plan
from .errors import InputError
from .kv_cache import SequenceState
from .policy import Policy, parse_size
from .reader import Bundle


@dataclass(frozen=True)
class NodeArg:
    name: str
    shape: list
    type: str


def _status_peak() -> int | None:
    """VmHWM of /proc/self/status (Linux), None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rusage_peak() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)  # Linux reports KiB, macOS bytes


# getrusage's ru_maxrss is max(the peak of the image exec replaced, this process's own peak): a nadoo
# process started from a big parent may report the parent's. Once it exceeds what it was when this module
# loaded, it is this process's own peak (VmHWM, also after /proc/self/clear_refs resets that); until then
# /proc/self/status says. A system call is all most runs' statistics then need (reading /proc costs more).
_RUSAGE_AT_IMPORT = _rusage_peak()


def peak_rss_bytes() -> int:
    """Peak resident set of this process: VmHWM on Linux (see _RUSAGE_AT_IMPORT), else ru_maxrss."""
    r = _rusage_peak()
    if r > _RUSAGE_AT_IMPORT:
        return r
    s = _status_peak()
    return r if s is None else s


class Session:
    """An open bundle ready to run. `use_mmap=True` maps the file instead of reading it with positioned
    reads; a read past the end of a file truncated while open raises BundleError, but a truncation racing
    with the copy of a mapped range can still kill the process with SIGBUS (positioned reads cannot).
    `engine`: "numpy", "ort" (the plan's dense part in ONNX Runtime, `threads` its intra-op threads,
    `ort_int8` int8 activations in its quantized products; runtime/ort_engine.py) or "auto" (ort where
    onnxruntime and onnx import, numpy under a `memory_budget`); `engine` after opening says which one runs."""

    def __init__(self, path, policy: Policy | None = None, memory_budget=None, use_mmap: bool = False,
                 pin_fraction: float = 0.5, engine: str = "auto", threads: int | None = None, ort_int8: bool = False):
        # `auto` under a memory budget runs NumPy: the budget bounds what the session holds, ORT's sessions
        # (and the onnx/onnxruntime imports: ~70 MiB of a MiniLM process here) are outside that bound, and
        # under a budget the chunked layers stream through the cache in NumPy anyway (only small ops would
        # reach ORT). MiniLM, 16 MB budget: 64 MiB peak and 1.1 s a process on NumPy, 134 MiB and 3.1 s on ORT.
        if engine == "auto" and parse_size(memory_budget) is not None:
            engine = "numpy"
        if engine != "numpy":  # the ORT engine's modules are not even imported for a NumPy session
            from .ort_engine import resolve

            engine = resolve(engine)
        self.bundle = Bundle.open(path, use_mmap=use_mmap)
        try:
            self.policy = policy or Policy()
            self.policy.check_overrides([*self.bundle.tensors, *self.bundle.moe])
            for cls in chunked.REGISTRY.values():
                cls.check_policy(self.policy, self.bundle)
            graph = self.bundle.read_graph()
            constants = self.bundle.read_constants()
            classes = chunked.classes_in(graph)
            self.cache = ChunkCache(parse_size(memory_budget), victim=chunked.cache_victim(classes))
            need_profile = self.policy.kind == "topk" or self.policy.bits == "auto" or self.policy.ffn_sparsity > 0
            profile = (self.bundle.read_profile() if need_profile else None) or {}
            env = chunked.OpEnv(self.bundle, chunked.WeightStore(self.bundle, self.cache, self.policy.tau),
                                self.policy, profile)
            # a language model's KV caches (runtime/generate.py), read as the attention policy says
            self.state = SequenceState(attention=self.policy.attention)
            self.plan = Plan(graph, constants, custom_ops=chunked.builders(env),
                             model_bytes=self.bundle.payload_bytes, weight_shapes=self.bundle.weight_shapes,
                             state=self.state)
            self.ops = env.ops  # one ChunkedOp per nadoo node, graph order
            # --engine ort: the dense runs of the plan become ONNX Runtime sessions (runtime/ort_engine.py)
            self.segments = []
            if engine == "ort":
                from .ort_engine import OrtOptions, hybridize

                self.segments = hybridize(self.plan, self, OrtOptions(threads, ort_int8))
            self.engine = "ort" if self.segments else "numpy"
            self._families = {cls: [op for op in self.ops if type(op) is cls] for cls in classes}
            # Under a budget, a top-k run pins the profile's hottest chunks (most inputs need them) in up to
            # `pin_fraction` of the budget; the rest of the budget is evicted by the victim strategy.
            self.pinned_bytes = 0
            if self.cache.budget is not None and self.policy.kind == "topk" and pin_fraction > 0:
                self.pinned_bytes = chunked.pin_hot(self.ops, env.store, int(self.cache.budget * pin_fraction))
            self.open_bytes = self.bundle.index_bytes + self.bundle.bytes_read  # index + graph/constants/profile + pins
            self.bundle.reset_counters()
        except BaseException:
            self.bundle.close()  # a failed construction must not leak the file descriptor
            raise
        self._local = threading.local()

    @property
    def resident_weight_bytes(self) -> int:
        """Bytes of weights the session holds: ONNX Runtime's initializers and the NumPy chunk cache."""
        return sum(s.resident_bytes for s in self.segments) + self.cache.bytes

    @property
    def ort_nodes(self) -> int:
        """Graph nodes that run in ONNX Runtime."""
        return sum(len(s.nodes) for s in self.segments)

    @property
    def last_stats(self) -> dict:
        """Statistics of this thread's last `run` (empty before its first); made when first read."""
        pending = getattr(self._local, "pending", None)
        if pending is not None:
            self._local.stats, self._local.pending = self._stats(*pending), None
        return getattr(self._local, "stats", {})

    def get_inputs(self) -> list[NodeArg]:
        return [NodeArg(i["name"], i.get("shape"), i["dtype"]) for i in self.plan.inputs]

    def get_outputs(self) -> list[NodeArg]:
        return [NodeArg(o["name"], o.get("shape"), o["dtype"]) for o in self.plan.outputs]

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        # the statistics wait until `last_stats` is read: a caller who never reads them does not pay for them
        outs, self._local.pending = self._run(output_names, feeds)
        return outs

    def run_with_stats(self, output_names: Sequence[str] | None,
                       feeds: Mapping[str, np.ndarray]) -> tuple[list[np.ndarray], dict]:
        """`run`, also returning the statistics of this call (the same dict `last_stats` then holds)."""
        outs, pending = self._run(output_names, feeds)
        st = self._local.stats = self._stats(*pending)
        self._local.pending = None
        return outs, st

    def _run(self, output_names, feeds) -> tuple[list[np.ndarray], tuple]:
        """The outputs, and what `_stats` makes this call's statistics of."""
        names = self.plan.output_names
        if output_names:
            unknown = [n for n in output_names if n not in names]
            if unknown:
                raise InputError(f"unknown output {unknown[0]!r}; the model's outputs are {names}")
        # Overflow/invalid-value warnings are ordinary float32 numerics here (exp of a large logit, a
        # masked softmax); the values they flag (inf, nan) still reach the outputs unchanged. Only the
        # default "warn" is silenced: a caller who asked NumPy to raise still gets the exception.
        quiet = {k: "ignore" for k, v in np.geterr().items() if v == "warn"}
        with callstats.collecting() as cs, np.errstate(**quiet):
            t0 = time.perf_counter()
            outs = self.plan.run(feeds)
            dt = time.perf_counter() - t0
        if output_names:
            outs = [outs[names.index(n)] for n in output_names]
        # what may change by the next call is taken now; the rest is the call's own (cs). The process's
        # peak RSS is read when the statistics are made (getrusage measured 0.3 ms a call here, with ORT's
        # threads): the peak so far then, which includes this call's.
        cache = self.cache
        return outs, (cs, dt, cache.bytes, cache.pinned_bytes, self.resident_weight_bytes)

    def _stats(self, cs, dt, cache_bytes, cache_pinned, resident) -> dict:
        b = self.bundle
        peak_rss = peak_rss_bytes()
        cs.settle()
        layers = {name: d for op in self.ops for name, d in op.layer_stats(cs).items()}  # one entry per tensor
        lookups = cs.cache_hits + cs.cache_misses
        st = {
            "bytes_read": cs.bytes_read,
            "disk_bytes_read": cs.disk_bytes_read,
            "payloads_read": cs.payloads_read,
            "bundle_bytes": b.file_size,
            "dense_fp32_weight_bytes": int(b.index.get("stats", {}).get("dense_fp32_weight_bytes", 0)),
            "chunks_read": sum(v["chunks_read"] for v in layers.values()),
            "chunks_total": sum(v["chunks_total"] for v in layers.values()),
            "macs": sum(v["macs"] for v in layers.values()),
            "dense_macs": sum(v["dense_macs"] for v in layers.values()),
            "latency_s": dt,
            "peak_rss_bytes": peak_rss,
            "cache_hits": cs.cache_hits,
            "cache_misses": cs.cache_misses,
            "cache_hit_rate": cs.cache_hits / max(lookups, 1),
            "cache_bytes": cache_bytes,
            "cache_pinned_bytes": cache_pinned,
            "cache_budget_bytes": self.cache.budget,
            "engine": self.engine,
            "ort_nodes": self.ort_nodes,
            "resident_weight_bytes": resident,
            "policy": {"kind": self.policy.kind, "bits": self.policy.bits, "topk": self.policy.topk,
                       "predictor": self.policy.predictor, "tau": self.policy.tau,
                       "bits_for": dict(self.policy.bits_for)},
            "layers": layers,
        }
        for cls, ops in self._families.items():
            st.update(cls.extra_stats(ops, cs) or {})  # e.g. `moe`: expert usage, bytes, prefetch accuracy
        return st

    def generate(self, prompt=None, **kw):
        """Language models: text (or prompt_ids=[...]) -> GenerationResult; see runtime/generate.py."""
        from .generate import generate

        return generate(self, prompt, **kw)

    def stream(self, prompt=None, **kw):
        """Language models: an iterator of generated tokens (id and text delta); see runtime/generate.py."""
        from .generate import stream

        return stream(self, prompt, **kw)

    def sample(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
        """The calibration sample stored at compile time and the source model's fp32 output for it."""
        s = self.bundle.index.get("sample")
        if not s:
            return None
        ins = {d["name"]: self.bundle.read_tensor(d) for d in s["inputs"]}
        outs = {d["name"]: self.bundle.read_tensor(d) for d in s["outputs"]}
        return ins, outs

    def close(self) -> None:
        self.bundle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
