"""One interface for the weight-bearing ops of the `nadoo` domain (ChunkedLinear, ChunkedFFN, MoE, ...).

A `ChunkedOp` subclass is the whole run-time half of an operator: `register` it under its op type
and the session builds one instance per graph node (the engine calls it like any kernel), collects
its statistics, and `nadoo info` / `nadoo export` ask the class to describe and export it. Session,
CLI, reader, cache, info and export name no op.

What an op must not decide itself: which chunks it reads and at which tier (ask `env.policy`), and
how a block is fetched and cached (`env.store`). What it counts goes to the current call
(callstats.state_for), never to shared fields, so one session runs from many threads at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np

from .. import callstats
from ..errors import InputError, UnsupportedError
from ..policy import LayerPlan, Policy
from ..reader import Bundle, TensorEntry
from .counters import LayerCounters
from .store import WeightStore


@dataclass
class OpEnv:
    """What every op of one session shares."""

    bundle: Bundle
    store: WeightStore
    policy: Policy
    profile: dict  # the bundle's calibration profile ({} when the policy needs none)
    ops: list = field(default_factory=list)  # the ops built so far, in graph order
    records: dict = field(default_factory=dict)  # tensor name -> its LayerCounters (shared by nodes reading it)
    shared: dict = field(default_factory=dict)  # what one op family decides once per session (e.g. an allocation)

    def layer_profile(self, name: str) -> dict:
        return self.profile.get("layers", {}).get(name, {})


class ChunkedOp:
    """One graph node of a registered op type, bound to a session."""

    op_type: ClassVar[str]
    domain: ClassVar[str] = "nadoo"
    # a victim strategy factory (cache.FrequencyAware, ...) when this family's blocks want one; None = LRU
    cache_victim: ClassVar[Callable | None] = None
    selected = None  # chunk ids the last call chose, any thread (routed layers; for recall measurements)

    def __init__(self, node: dict, ctx, env: OpEnv):
        self.node = node
        self.env = env
        self.bind(node, ctx, env)

    def bind(self, node: dict, ctx, env: OpEnv) -> None:
        """The op's set-up, once per graph node when the session opens: read the node's attributes, its
        tensors (`WeightOp.tensor`) and inline constants (`ctx.const(i)`), ask `env.policy` for a plan; a
        node the op cannot compute raises here (ModelError / InputError), not mid-run."""

    def __call__(self, *inputs) -> np.ndarray:
        raise NotImplementedError

    def layer_stats(self, call: callstats.CallStats) -> dict[str, dict]:
        """This op's entries of the run's `layers` statistics (per chunked tensor), for one call."""
        return {}

    def pin_candidates(self) -> list:
        """(share of calibration activity, chunk, [(tensor, tiers)]) worth keeping in the cache for good."""
        return []

    def whole_tiers(self) -> dict[str, str] | None:
        """{tensor name: tier} when another engine may compute this node from one stored weight per tensor
        (`WeightOp`); None: it selects per input or holds state, so it runs here."""
        return None

    def ort_types_ok(self, types: dict) -> bool:
        """Whether another engine's form of this node takes its inputs' dtypes (`types`: value name ->
        numpy dtype, as far as known)."""
        return True

    def output_dim(self) -> int | None:
        """The size of the output's last axis when the output is the first input with that axis replaced
        (linear layers, FFNs, an LM head). None: no such rule."""
        return None

    def output_shapes(self, x_shape: tuple) -> list[tuple] | None:
        """The shape of each output for a first input of shape `x_shape`: how a segment's shapes are
        settled without onnx (runtime/segment_shapes.py). None: no rule (default: `output_dim`'s)."""
        d = self.output_dim()
        return None if d is None else [tuple(x_shape[:-1]) + (d,)]

    def has_output_shapes(self) -> bool:
        """Whether `output_shapes` has a rule for this op."""
        return type(self).output_shapes is not ChunkedOp.output_shapes or self.output_dim() is not None

    def macs_for(self, x_shape: tuple, y_shape: tuple | None) -> int:
        """Multiply-adds of one dense execution on these shapes, counted in the layer statistics (an op
        without chunked weights has no layer entry: 0)."""
        return 0

    # count_whole needs the value of the node's first input (x), not only its shape
    counts_values: ClassVar[bool] = False

    def count_whole(self, x_shape: tuple, y_shape: tuple | None, macs: int | None = None, x=None) -> None:
        """Account one execution another engine computed whole (`whole_tiers` not None); `x`: the first
        input's value when `counts_values`."""

    @classmethod
    def check_policy(cls, policy: Policy, bundle: Bundle) -> None:
        """Refuse, when the session opens, policy options of this family the bundle cannot honour."""

    @classmethod
    def extra_stats(cls, ops: list, call: callstats.CallStats) -> dict | None:
        """Run statistics of the whole family (keys beside `layers`), for one call; None for none."""
        return None

    @classmethod
    def summary(cls, stats: dict) -> str | None:
        """A line for `nadoo run` about this family's part of a run's statistics."""
        return None

    @classmethod
    def export(cls, node: dict, ex) -> None:
        """Add the plain-ONNX nodes computing `node` to `ex` (export_onnx.Exporter)."""
        raise UnsupportedError(f"nadoo.{node['op']} has no plain-ONNX equivalent yet; export is not possible for this bundle")

    @classmethod
    def describe(cls, bundle: Bundle, profile: dict | None) -> dict | None:
        """`nadoo info` facts of this family (keys of the facts object); None when the bundle has none."""
        return None

    @classmethod
    def format_description(cls, facts: dict) -> str | None:
        """The text `nadoo info` prints for what `describe` gathered."""
        return None


REGISTRY: dict[str, type[ChunkedOp]] = {}


def unique_ids(a) -> np.ndarray:
    """The sorted distinct values of an integer array (np.unique's result). Why not np.unique: NumPy 2
    imports numpy.ma on its first call (6–7 ms and 1.3 MiB of a cold process) to ask whether the
    array is masked."""
    a = np.sort(np.asarray(a).reshape(-1))
    return a[np.r_[True, a[1:] != a[:-1]]] if a.size else a


def register(cls: type[ChunkedOp]) -> type[ChunkedOp]:
    """Class decorator: the session builds nodes of `cls.op_type` (domain `cls.domain`) with `cls`."""
    REGISTRY[cls.op_type] = cls
    return cls


def builders(env: OpEnv) -> dict:
    """Engine custom ops for every registered class, each node becoming an instance in `env.ops`."""
    def builder(cls):
        def build(node, ctx):
            op = cls(node, ctx, env)
            env.ops.append(op)
            return op
        return build

    return {(cls.domain, cls.op_type): builder(cls) for cls in REGISTRY.values()}


def classes_in(graph: dict) -> list[type[ChunkedOp]]:
    """The registered classes a graph uses, in registration order."""
    used = {(n.get("domain", ""), n["op"]) for n in graph.get("nodes", [])}
    return [cls for cls in REGISTRY.values() if (cls.domain, cls.op_type) in used]


def cache_victim(classes: list[type[ChunkedOp]]):
    """The victim strategy the first class asking for one wants (None: the cache's default, LRU)."""
    factory = next((cls.cache_victim for cls in classes if cls.cache_victim is not None), None)
    return factory() if factory is not None else None


def pin_hot(ops: list[ChunkedOp], store: WeightStore, budget_bytes: int) -> int:
    """Load the calibration profile's hottest chunks (needed by most inputs) into the cache for good,
    hottest first, until `budget_bytes` are pinned; returns the bytes pinned."""
    cands, seen = [], set()
    for op in ops:
        for share, i, group in op.pin_candidates():
            if (group[0][0].name, i) not in seen:  # two nodes reading one tensor name its chunks twice
                seen.add((group[0][0].name, i))
                cands.append((share, i, group))
    pinned = 0
    for _, i, group in sorted(cands, key=lambda t: -t[0]):
        for e, tiers in group:
            n = store.pin(e, i, tiers, budget_bytes - pinned)
            if not n:
                return pinned
            pinned += n
    return pinned


class WeightOp(ChunkedOp):
    """A chunked op over stored tensors whose work is counted per layer (the `layers` statistics)."""

    entry: TensorEntry  # the tensor the layer's statistics are named after
    plan: LayerPlan
    record: LayerCounters
    # `export` computes the whole layer from one stored weight per tensor, so another engine (ONNX
    # Runtime) may take the node over when `whole_tiers` allows it
    exports_whole: ClassVar[bool] = False

    def tensor(self, attr: str = "weight") -> TensorEntry:
        name = self.node.get("attrs", {}).get(attr)
        e = self.env.bundle.tensors.get(name)
        if e is None:
            raise InputError(f"graph names weight {name!r}, which the bundle does not hold")
        return e

    def start(self, entry: TensorEntry, plan: LayerPlan, group: list | None = None) -> None:
        """Bind the layer: its main tensor, its plan, and the tensors read together with it (tensor,
        tiers) (default: the main one alone)."""
        self.entry, self.plan = entry, plan
        self.group = group or [(entry, plan.tiers)]
        # A layer is a tensor: nodes reading the same one count together, against its chunks once.
        self.record = self.env.records.setdefault(entry.name, LayerCounters(entry.kind, entry.n_chunks))
        self.record.tiers |= {t for _, tiers in self.group for t in tiers}
        self.record.dense_fallback |= plan.dense_fallback

    def counters(self) -> LayerCounters:
        """The current call's counters of this layer (a throwaway copy outside a call)."""
        return callstats.state_for(self.record, self.record.for_call)

    def count(self, before: int, n_chunks: int, macs: int, dense_macs: int) -> None:
        """Account one execution that started when the call had read `before` bytes."""
        lc = self.counters()
        lc.chunks_read += n_chunks
        lc.bytes_read += callstats.bytes_read() - before
        lc.macs += macs
        lc.dense_macs += dense_macs

    def whole_tiers(self) -> dict[str, str] | None:
        """{tensor name: tier} when this node reads every chunk of its tensors, each tensor at one tier,
        unpruned: then the layer is one stored weight per tensor and may run elsewhere as a whole. None
        when the policy selects, mixes tiers or prunes, or under a memory budget (weights held elsewhere
        would escape the budget's bound; here they stream through the cache)."""
        if (not self.exports_whole or self.plan.mode != "dense" or self.env.policy.tau > 0
                or self.env.store.cache.budget is not None):
            return None
        out = {}
        for e, tiers in self.group:
            if len(set(tiers)) != 1:
                return None
            out[e.name] = tiers[0]
        return out

    def macs_for(self, x_shape: tuple, y_shape: tuple | None) -> int:
        """Multiply-adds of one dense execution with input x (first input) and first output y of these
        shapes (y None when the node omits it)."""
        raise NotImplementedError

    def count_whole(self, x_shape: tuple, y_shape: tuple | None, macs: int | None = None, x=None) -> None:
        """Account one dense execution computed elsewhere (weights held there: nothing read now).
        `macs`: macs_for(x_shape, y_shape) when the caller has it already (it runs per call)."""
        macs = self.macs_for(x_shape, y_shape) if macs is None else macs
        lc = self.counters()
        lc.chunks_read += self.entry.n_chunks
        lc.macs += macs
        lc.dense_macs += macs

    def chose(self, ids: np.ndarray) -> None:
        self.selected = self.counters().selected = ids

    def layer_stats(self, call: callstats.CallStats) -> dict[str, dict]:
        return {self.entry.name: call.states.get(self.record, self.record).as_dict()}

    def pin_candidates(self) -> list:
        prof = self.env.layer_profile(self.entry.name)
        if not prof.get("routable") or "chunk_activity" not in prof:
            return []
        act = np.asarray(prof["chunk_activity"], dtype=float)
        share = act / max(act.sum(), 1e-30)
        return [(share[i], i, self.group) for i in range(self.entry.n_chunks)]


class WholeWeightOp(WeightOp):
    """A layer that multiplies by all of its stored tensors on every call (a convolution, a recurrent
    cell): every chunk is read, one cached block per tensor, and the policy chooses tiers only.

    A subclass names the attributes of its tensors in `tensors` (the first is the layer the statistics
    are named after; the others are read with it, each at its own tiers), may refuse them in `check`,
    and builds in `kernel` the computation taking the input, the stored weights, then the node's other
    inputs."""

    exports_whole = True
    tensors: ClassVar[tuple[str, ...]] = ("weight",)

    def bind(self, node, ctx, env):
        entries = [self.tensor(attr) for attr in self.tensors]
        self.check(*entries)
        main = entries[0]
        plan = env.policy.plan(main, env.layer_profile(main.name), can_route=False)
        self.start(main, plan, [(main, plan.tiers)] + [(e, self._own_tiers(e)) for e in entries[1:]])
        self.run = self.kernel(node)

    def _own_tiers(self, e: TensorEntry) -> list:
        act = self.env.layer_profile(e.name).get("chunk_activity")
        return self.env.policy.tiers_for(e, set(e.tiers), None if act is None else np.asarray(act))

    def check(self, *entries: TensorEntry) -> None:
        """Raise ModelError for tensors this op cannot compute (shapes, attributes)."""

    def kernel(self, node: dict) -> Callable:
        """f(x, *weights, *other inputs) for this node, built once (weights as `store.full` decodes them)."""
        raise NotImplementedError

    def __call__(self, x, *rest):
        before = callstats.bytes_read()
        y = self.run(x, *(self.env.store.full(e, tiers) for e, tiers in self.group), *rest)
        macs = self.macs_for(x.shape, y.shape if isinstance(y, np.ndarray) else None)
        self.count(before, self.entry.n_chunks, macs, macs)  # a chunk: the same rows of every tensor
        return y
