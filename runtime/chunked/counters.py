"""Per-layer run counters: the `layers` entries of a run's statistics."""

from __future__ import annotations


class LayerCounters:
    """One layer's counters. The op's own record (`WeightOp.record`) holds what is fixed when the
    session opens (kind, tiers, dense fallback) and zero counts; each call counts in a copy of its own
    (callstats.state_for), so concurrent calls never mix."""

    __slots__ = ("kind", "chunks_total", "chunks_read", "bytes_read", "macs", "dense_macs", "tiers",
                 "dense_fallback", "selected")

    def __init__(self, kind: str, chunks_total: int):
        self.kind = kind
        self.chunks_total = chunks_total  # the chunks the layer holds
        self.chunks_read = 0
        self.bytes_read = 0
        self.macs = 0
        self.dense_macs = 0
        self.tiers: set = set()
        self.dense_fallback = False
        self.selected = None  # chunk ids this call chose (routed layers)

    def for_call(self) -> "LayerCounters":
        c = LayerCounters(self.kind, self.chunks_total)
        c.tiers, c.dense_fallback = self.tiers, self.dense_fallback
        return c

    def as_dict(self) -> dict:
        return {"kind": self.kind, "chunks_read": self.chunks_read, "chunks_total": self.chunks_total,
                "bytes_read": self.bytes_read, "macs": self.macs, "dense_macs": self.dense_macs,
                "tiers": sorted(self.tiers), "dense_fallback": self.dense_fallback}
