"""Calibration of a language model's gated MLP (`nadoo.GatedFFN`): what its down projection needs.

The down projection is stored transposed ([neurons, outputs], kind `ffn_down`) and chunked by groups
of input neurons, so activation sparsity reads only the groups a token uses; its quantized tiers are
grouped along the same axis (down's input), one group of GROUP_ROWS neurons per output per chunk. Its calibration records
the second moment of its input a = act(gate·x) ⊙ up·x (for GPTQ of the transposed weight), per-neuron
activity, and a subsample of a-rows from which the layer's sparsity curve (runtime/ffn_sparsity.py)
is measured at summary time.
"""

from __future__ import annotations

import numpy as np

from nadoo.runtime.ffn_sparsity import PROFILE_KEY, calibration_curve
from nadoo.runtime.tiers import ZERO_POINT_T, TierLayout, ZeroPointTier

from .calibrate import OutputActivity
from .ffn import coactivation_order
from .quant_grid import source_grids
from .rewrite import Weight

GROUP_ROWS = 32  # neurons per chunk of down: small enough that whole groups fall below the threshold


def down_bounds(rows: int) -> list[int]:
    """Chunk bounds of a down projection: GROUP_ROWS neurons each (the last may be shorter), so with the
    quantization groups of the same width along its input axis every chunk holds whole groups."""
    return list(range(0, rows, GROUP_ROWS)) + [rows]


def down_layout(layout: TierLayout) -> TierLayout:
    """The layout down is written in where a compile writes `layout`: zp tiers over chunk transposes
    (NDC 1.3, groups of GROUP_ROWS neurons along down's input axis, as GPTQ and MatMulNBits take them);
    float32, scale+min and nested tiers as for every tensor."""
    return ZERO_POINT_T[layout.key] if type(layout) is ZeroPointTier else layout


def down_group(layouts: list[TierLayout], group_size: int) -> int:
    """The index group_size of a down projection under a compile's layouts."""
    return GROUP_ROWS if any(down_layout(layout) is not layout for layout in layouts) else group_size


class DownStats:
    """Calibration of one gated MLP's down projection (`w` is the transposed down weight)."""

    MAX_ROWS = 512  # subsampled positions for the sparsity curve (an exact error per grid point)

    def __init__(self, w: Weight):
        self.w = w
        R = w.rows
        self.sum_hht = np.zeros((R, R), np.float64)
        self.n_x = 0
        self.out = OutputActivity(R)
        self.rows: list[np.ndarray] = []
        self.n_rows = 0

    def record(self, h: np.ndarray) -> None:
        """h: [batch, positions, neurons] the inputs of down."""
        hf = np.ascontiguousarray(h.reshape(-1, h.shape[-1]), np.float32)
        self.sum_hht += hf.T @ hf
        self.n_x += hf.shape[0]
        self.out.add(h.reshape(h.shape[0], -1, h.shape[-1]))
        if self.n_rows < self.MAX_ROWS:
            step = max(1, hf.shape[0] // 64)  # spread the subsample over the calibration windows
            take = hf[::step][: self.MAX_ROWS - self.n_rows].copy()
            self.rows.append(take)
            self.n_rows += len(take)

    def neuron_order(self, n_groups: int) -> np.ndarray:
        """A permutation of the neurons that puts those often below the layer's median |a| together
        (and, inside bands of groups, those active together), so whole groups fall below a threshold."""
        acts = np.abs(np.concatenate(self.rows)) if self.rows else np.zeros((1, self.w.rows), np.float32)
        above = acts * (acts >= np.quantile(acts, 0.5))
        return coactivation_order(above, n_groups)

    def permute(self, perm: np.ndarray) -> None:
        """Apply a neuron permutation to everything recorded (and to the calibration copy of down)."""
        self.sum_hht = self.sum_hht[np.ix_(perm, perm)]
        self._Hd = (None, -1)
        self.out.permute(perm)
        self.rows = [r[:, perm] for r in self.rows]
        self.w.array = np.ascontiguousarray(self.w.array[perm])

    def importance(self):
        return None  # the transposed weight's error is weighted through down_hessian instead

    def down_hessian(self) -> np.ndarray | None:
        """mean aᵀa of the down projection's input [neurons, neurons]."""
        if not self.n_x:
            return None
        if getattr(self, "_Hd", (None, -1))[1] != self.n_x:  # one array per state: GPTQ memoises on it
            self._Hd = (self.sum_hht / self.n_x, self.n_x)
        return self._Hd[0]

    def summary(self, bounds: np.ndarray) -> dict:
        rows_per = np.diff(bounds)
        contrib = np.einsum("rn,rn->r", self.w.array, self.w.array)  # |down column|² per neuron
        acts = np.concatenate(self.rows) if self.rows else np.zeros((1, self.w.rows), np.float32)
        return {
            "kind": "ffn_down", "activation_after": None, "routable": False, "concentration": 0.0,
            "chunk_activity": (np.add.reduceat(self.out.mean_abs() * contrib, bounds[:-1]) / rows_per).tolist(),
            "chunk_active_frac": (np.add.reduceat(self.out.active_frac(), bounds[:-1]) / rows_per).tolist(),
            "chunk_peak": np.maximum.reduceat(self.out.peak, bounds[:-1]).tolist(),
            PROFILE_KEY: calibration_curve(acts, self.w.array),
        }


def gated_builder(weights: dict, stats: dict | None):
    """Float, full-weight GatedFFN for calibration: records gate's and up's input/output statistics
    (LayerStats) and down's input (DownStats)."""
    from nadoo.runtime.activations import activation
    from nadoo.runtime.chunked.linear import linear

    def build(node, ctx):
        a = node["attrs"]
        gate, up, down = weights[a["gate"]], weights[a["up"]], weights[a["down"]]
        gt, ut = np.ascontiguousarray(gate.array.T), np.ascontiguousarray(up.array.T)
        act = activation(a["activation"])

        def run(x, b_gate=None, b_up=None, b_down=None):
            g = linear(x, gt, b_gate)
            u = linear(x, ut, b_up)
            if stats is not None:
                stats[gate.name].record(x, g)
                stats[up.name].record(x, u)
            h = act(g.copy()) * u
            if stats is not None:
                stats[down.name].record(h.reshape(h.shape[0] if h.ndim > 2 else 1, -1, h.shape[-1]))
            return linear(h, down.array, b_down)
        return run
    return build


def whole_blocks(perm: np.ndarray, block: int) -> np.ndarray:
    """The permutation nearest `perm` that moves only whole blocks of `block` consecutive neurons: blocks
    ordered by their neurons' mean position in `perm`."""
    rank = np.empty(len(perm), np.float64)
    rank[perm] = np.arange(len(perm))
    order = np.argsort(rank.reshape(-1, block).mean(1), kind="stable")
    return (order[:, None] * block + np.arange(block)).reshape(-1)


def reorder_neurons(weights: list[Weight], stats: dict, consts: dict, bounds: dict, block: int | None = None) -> None:
    """Permute every gated MLP's neurons (gate and up rows and biases, down's stored rows) by its
    down projection's calibration (DownStats.neuron_order): exact for the dense output, and it turns
    scattered small activations into whole groups of down that a token can skip. Where down's weights
    lie on a source's quantization grid along its inputs in blocks of `block` (a GGUF file's Q8_0/Q5_0,
    compiler/quant_grid.py:source_grids), only whole blocks move, so a tier can still take them exactly."""
    by_name = {w.name: w for w in weights}
    for d in [w for w in weights if w.kind == "ffn_down"]:
        prefix = d.name[: -len("down")]
        perm = stats[d.name].neuron_order(len(bounds[d.name]) - 1)
        if block and d.rows % block == 0 and source_grids(d.array.T.reshape(d.array.shape[1], -1, block), 255):
            perm = whole_blocks(perm, block)
        stats[d.name].permute(perm)
        d.array = np.ascontiguousarray(d.array[perm])
        for t in ("gate", "up"):
            w = by_name[prefix + t]
            w.array = np.ascontiguousarray(w.array[perm])
            stats[w.name].out.permute(perm)
            if prefix + t + "_bias" in consts:
                consts[prefix + t + "_bias"] = np.ascontiguousarray(consts[prefix + t + "_bias"][perm])
