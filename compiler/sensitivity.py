"""Measured sensitivity for the mixed-precision allocator: the end-to-end output error of quantizing
one tensor alone at one tier, every other weight float, on a few calibration samples.

Why: the quantizer's own error (`out_err`, the relative output-error energy of a layer under a
diagonal input model) says how well a layer is quantized, not how much its error matters at the
model's output. Layers differ there by orders of magnitude (in MiniLM the word embedding holds half
the weights but a 4-bit embedding costs a tenth of what a 4-bit last layer does), and an allocator
that counts every layer equally spends its bits in the wrong places. To first order the errors of
independently quantized tensors add up, so the summed per-tensor measurement is what the allocator
minimises (compiler/allocate.py).

Cost: one float forward pass of the samples per tensor: each tensor is measured at one tier
(REFERENCE_TIER); its measured error over its own proxy error there is the tensor's gain, which
the allocator applies to its other tiers' proxies (measuring every tier cost 4x as many passes,
~10 min of CPU for MiniLM). The compiler runs it only when an allocation is asked for
(`--bits-per-weight`).
"""
from __future__ import annotations

import warnings

import numpy as np

from nadoo.runtime.engine import Plan

from .calibrate import dense_builders
from .rewrite import Weight

SAMPLES = 8  # calibration samples per measurement: enough to rank tensors
REFERENCE_TIER = "q4"  # the tier each tensor is measured at (others scale by the quantizer's own error ratio)


class Sensitivity:
    """Measures, for (weight, tier, decoded array), the relative output error
    Σ‖y_q − y‖² / Σ‖y‖² over the float outputs of the graph on the first SAMPLES calibration samples,
    with only that weight replaced by its decoded array. Results: `errors[name][tier]`."""

    def __init__(self, graph: dict, consts: dict, weights: list[Weight], calib: dict[str, np.ndarray]):
        self.graph, self.consts = graph, consts
        self.by_name = {w.name: w for w in weights}
        self.feeds = {k: np.ascontiguousarray(v[:SAMPLES]) for k, v in calib.items()}
        self.ref = self._outputs()
        self.norm = sum(float(np.sum(np.square(r, dtype=np.float64))) for r in self.ref)
        self.errors: dict[str, dict[str, float]] = {}

    def _outputs(self) -> list[np.ndarray]:
        # dense float builders read the weights' arrays when the plan is built: a fresh plan per swap
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs = Plan(self.graph, self.consts, custom_ops=dense_builders(self.by_name)).run(self.feeds)
        return [np.asarray(o, np.float64) for o in outs if np.asarray(o).dtype.kind == "f"]

    def measure(self, w: Weight, tier: str, decoded: np.ndarray) -> float:
        """The output error of `w` at `tier` (decoded: its dequantized [rows, row_len] matrix)."""
        orig = w.array
        w.array = np.ascontiguousarray(decoded, np.float32).reshape(orig.shape)
        try:
            outs = self._outputs()
        finally:
            w.array = orig
        num = sum(float(np.sum(np.square(o - r))) for o, r in zip(outs, self.ref))
        err = num / self.norm if self.norm > 0 else (0.0 if num == 0 else float("inf"))
        self.errors.setdefault(w.name, {})[tier] = err
        return err

    def probe(self, w: Weight, layout, encoded, bounds: list[int], group_size: int) -> None:
        """Measure the reference tier (if `layout` serves it) from one tensor's encoded chunks
        (chunk c -> ([payloads], errors), as the compiler writes them)."""
        if REFERENCE_TIER not in layout.serves:
            return
        chunks = [encoded(c)[0] for c in range(len(bounds) - 1)]
        for tier in (REFERENCE_TIER,):
            n = layout.read_count(tier)
            decoded = np.concatenate([layout.decode(tier, p[:n], hi - lo, w.row_len, group_size)
                                      for p, lo, hi in zip(chunks, bounds, bounds[1:])])
            self.measure(w, tier, decoded)
