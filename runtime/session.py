"""The Python API, in the habits of ONNX Runtime's InferenceSession:

    import nadoo.runtime as nd
    sess = nd.Session("model.ndc", policy=nd.Policy("topk", bits="4", topk=0.5), memory_budget="16MB")
    (y,) = sess.run(None, {"x": x})
    print(sess.last_stats["bytes_read"])
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .cache import ChunkCache
from .chunked_ops import ChunkedOps
from .engine import Plan
from .errors import InputError
from .policy import Policy, parse_size
from .reader import Bundle


@dataclass(frozen=True)
class NodeArg:
    name: str
    shape: list
    type: str


def peak_rss_bytes() -> int:
    """Peak resident set of this process. On Linux VmHWM of /proc/self/status: getrusage's ru_maxrss
    survives exec, so a nadoo process started from a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)  # Linux reports KiB, macOS bytes


class Session:
    def __init__(self, path, policy: Policy | None = None, memory_budget=None, use_mmap: bool = False, moe=None,
                 pin_fraction: float = 0.5):
        self.bundle = Bundle.open(path, use_mmap=use_mmap)
        try:
            self.policy = policy or Policy()
            self.cache = ChunkCache(parse_size(memory_budget))
            self.moe = None  # [nadoo#7 MoE] experts: frequency-aware cache (same budget) + the MoE op; moe = MoEOptions
            if self.bundle.moe:
                from .moe_op import ExpertCache, MoEOps

                self.cache = ExpertCache(parse_size(memory_budget))
                self.moe = MoEOps(self.bundle, self.policy, self.cache, moe)
            graph = self.bundle.read_graph()
            constants = self.bundle.read_constants()
            profile = self.bundle.read_profile() if self.policy.kind == "topk" or self.policy.bits == "auto" else None
            self.ops = ChunkedOps(self.bundle, self.policy, self.cache, profile)
            self.plan = Plan(graph, constants, custom_ops={**self.ops.builders(), **(self.moe.builders() if self.moe else {})},
                             model_bytes=self.bundle.payload_bytes, weight_shapes=self.bundle.weight_shapes)
            # Under a budget, a top-k run pins the profile's hottest chunks (most inputs need them) in up to
            # `pin_fraction` of the budget; the rest of the budget is LRU.
            self.pinned_bytes = 0
            if self.cache.budget is not None and self.policy.kind == "topk" and pin_fraction > 0:
                self.pinned_bytes = self.ops.pin_hot(int(self.cache.budget * pin_fraction))
            self.open_bytes = self.bundle.index_bytes + self.bundle.bytes_read  # index + graph/constants/profile + pins
            self.bundle.reset_counters()
        except BaseException:
            self.bundle.close()  # a failed construction must not leak the file descriptor
            raise
        self.last_stats: dict = {}

    def get_inputs(self) -> list[NodeArg]:
        return [NodeArg(i["name"], i.get("shape"), i["dtype"]) for i in self.plan.inputs]

    def get_outputs(self) -> list[NodeArg]:
        return [NodeArg(o["name"], o.get("shape"), o["dtype"]) for o in self.plan.outputs]

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        names = self.plan.output_names
        if output_names:
            unknown = [n for n in output_names if n not in names]
            if unknown:
                raise InputError(f"unknown output {unknown[0]!r}; the model's outputs are {names}")
        for c in self.ops.layers.values():
            for f in ("chunks_read", "bytes_read", "macs", "dense_macs", "calls"):
                setattr(c, f, 0)
        b = self.bundle
        b.reset_counters()
        hits, misses = self.cache.hits, self.cache.misses
        if self.moe:  # [nadoo#7 MoE]
            self.moe.reset()
        t0 = time.perf_counter()
        outs = self.plan.run(feeds)
        dt = time.perf_counter() - t0
        layers = {n: c.as_dict() for n, c in self.ops.layers.items()}
        self.last_stats = {
            "bytes_read": b.bytes_read,
            "disk_bytes_read": b.disk_bytes_read,
            "payloads_read": b.payloads_read,
            "bundle_bytes": b.file_size,
            "dense_fp32_weight_bytes": int(b.index.get("stats", {}).get("dense_fp32_weight_bytes", 0)),
            "chunks_read": sum(v["chunks_read"] for v in layers.values()),
            "chunks_total": sum(v["chunks_total"] for v in layers.values()),
            "macs": sum(v["macs"] for v in layers.values()),
            "dense_macs": sum(v["dense_macs"] for v in layers.values()),
            "latency_s": dt,
            "peak_rss_bytes": peak_rss_bytes(),
            "cache_hits": self.cache.hits - hits,
            "cache_misses": self.cache.misses - misses,
            "cache_hit_rate": (self.cache.hits - hits) / max(self.cache.hits - hits + self.cache.misses - misses, 1),
            "cache_bytes": self.cache.bytes,
            "cache_pinned_bytes": self.cache.pinned_bytes,
            "cache_budget_bytes": self.cache.budget,
            "policy": {"kind": self.policy.kind, "bits": self.policy.bits, "topk": self.policy.topk,
                       "predictor": self.policy.predictor, "tau": self.policy.tau},
            "layers": layers,
        }
        if self.moe:  # [nadoo#7 MoE] expert usage, bytes, cache hit rate, prefetch accuracy
            self.last_stats["moe"] = self.moe.stats()
        if output_names:
            return [outs[names.index(n)] for n in output_names]
        return outs

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
