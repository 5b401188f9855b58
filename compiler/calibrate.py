"""Calibration: run the rewritten graph on the calibration set with dense float weights and record,
per weight-bearing op, what the compiler and the run-time policies need:

- per input channel: importance = mean x² (activation-aware quantization weights its error by it);
- per output unit (row): mean |y|, fraction of positions where it is active, peak |y|;
- per chunk and per sample: the share of output energy, from which `routable` is decided — a layer
  is routable when, sample by sample, a few chunks carry nearly all of its output energy.

Outputs consumed only by a Relu are measured after the Relu: that is what the next layer sees.
"""

from __future__ import annotations

import numpy as np

from nadoo.runtime.engine import Plan

from .conv_moment import ConvMoment
from .rewrite import Weight, consumers

# Weights stored [Cout, Cin/groups, *kernel] whose op's input has channels on axis 1.
CONV_KINDS = ("conv", "conv_transpose")
# Weights whose quantization error is weighted by their input's importance (the others: gather rows,
# a fused FFN's down projection, which its up projection's statistics cover).
IMPORTANCE_KINDS = ("linear", "ffn_up", "recurrent_input", "recurrent") + CONV_KINDS


class OutputActivity:
    """Per output unit (row / neuron): mean |y|, how often it is active, peak |y|, and per sample the
    energy Σ y² of every unit — the evidence behind chunk activity, routability and hot-chunk pinning."""

    def __init__(self, rows: int):
        self.sum_abs = np.zeros(rows, np.float64)
        self.n_active = np.zeros(rows, np.float64)
        self.peak = np.zeros(rows, np.float64)
        self.n_pos = 0
        self.sample_energy: list[np.ndarray] = []  # per sample: energy per row
        self.threshold = None

    def add(self, yb: np.ndarray) -> None:
        """yb: [samples, positions, rows] outputs (after the activation that follows, if known)."""
        a = np.abs(yb).reshape(-1, yb.shape[-1])
        if self.threshold is None:
            # "active" = above a tenth of the layer's RMS output, fixed from the first batch.
            self.threshold = 0.1 * float(np.sqrt(np.mean(a.astype(np.float64) ** 2)) + 1e-30)
        self.sum_abs += a.sum(0, dtype=np.float64)
        self.n_active += (a > self.threshold).sum(0)
        self.peak = np.maximum(self.peak, a.max(0))
        self.n_pos += a.shape[0]
        self.sample_energy.extend(np.einsum("bpr,bpr->br", yb, yb, dtype=np.float64))

    def permute(self, perm: np.ndarray) -> None:
        self.sum_abs, self.n_active, self.peak = self.sum_abs[perm], self.n_active[perm], self.peak[perm]
        self.sample_energy = [e[perm] for e in self.sample_energy]

    def mean_abs(self) -> np.ndarray:
        return self.sum_abs / max(self.n_pos, 1)

    def active_frac(self) -> np.ndarray:
        return self.n_active / max(self.n_pos, 1)


def concentration(energy: np.ndarray, bounds: np.ndarray, share: float) -> float:
    """Mean over samples of the share of a layer's output energy in its top `share` chunks:
    the evidence that skipping the other chunks per input is (near) exact."""
    n = len(bounds) - 1
    if len(energy) == 0:
        return 0.0
    chunk_e = np.add.reduceat(energy, bounds[:-1], axis=1)
    k = max(1, int(np.ceil(share * n)))
    tot = chunk_e.sum(1)
    top = -np.sort(-chunk_e, axis=1)[:, :k].sum(1)
    return float(np.mean(top[tot > 0] / tot[tot > 0])) if np.any(tot > 0) else 0.0


class LayerStats:
    def __init__(self, w: Weight, relu_after: bool, activation: str | None = None, attrs: dict | None = None):
        self.w = w
        self.relu_after = relu_after
        self.activation = activation
        # conv (and conv_transpose, stored in conv layout): one entry per input channel of the op
        # (all groups: Cin = Cin/groups · groups)
        n_in = w.row_len if w.kind not in CONV_KINDS else w.array.shape[1] * w.meta.get("groups", 1)
        self.sum_x2 = np.zeros(n_in, np.float64)
        self.n_x = 0
        self.out = OutputActivity(w.rows)
        self.lookups = np.zeros(w.rows, np.float64) if w.kind == "gather" else None
        # Input second moment H = sum x^T x (K x K, float64) for GPTQ-style error feedback; linear only
        # (conv would need the im2col columns, gather has no input activation).
        self.sum_xxt = np.zeros((w.row_len, w.row_len), np.float64) if w.kind == "linear" else None
        # a conv's: over its im2col patches, from the op's attributes (compiler/conv_moment.py)
        self.moment = ConvMoment(w, attrs) if attrs is not None and ConvMoment.fits(w) else None

    def record(self, x: np.ndarray, y: np.ndarray) -> None:
        """x: the op's input activation (indices for gather); y: its output."""
        kind = self.w.kind
        if kind == "gather":
            idx = np.asarray(x).reshape(len(x), -1) if np.ndim(x) > 1 else np.asarray(x).reshape(1, -1)
            for row in idx:
                touched = np.unique(row % self.w.rows)
                self.lookups[touched] += 1
                e = np.zeros(self.w.rows)
                e[touched] = 1.0
                self.out.sample_energy.append(e)
            return
        if self.relu_after:
            y = np.maximum(y, 0)
        if kind in CONV_KINDS:
            # rows = output channels (axis 1); importance per input channel (axis 1 of x)
            xc = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
            yb = np.moveaxis(y, 1, -1).reshape(y.shape[0], -1, y.shape[1])
        else:
            xc = x.reshape(-1, x.shape[-1])
            yb = y.reshape(y.shape[0], -1, y.shape[-1]) if y.ndim > 1 else y.reshape(1, 1, -1)
        self.sum_x2 += np.einsum("ij,ij->j", xc, xc, dtype=np.float64)
        self.n_x += xc.shape[0]
        if self.sum_xxt is not None:
            # float32 product per batch (fast BLAS), accumulated in float64 across batches
            x32 = np.ascontiguousarray(xc, np.float32)
            self.sum_xxt += x32.T @ x32
        if self.moment is not None:
            self.moment.add(x)
        self.out.add(yb)

    def importance(self) -> np.ndarray:
        """Mean x² per weight column: [K] (every row reads the same inputs), or [rows, K] for a grouped
        conv, whose output channels of group g read only input channels g·Cin/g … (g+1)·Cin/g - 1."""
        imp = (self.sum_x2 / max(self.n_x, 1)).astype(np.float32)
        if self.w.kind in CONV_KINDS:
            kk = int(np.prod(self.w.array.shape[2:]))
            groups = self.w.meta.get("groups", 1)
            # column order of the [Cout, Cin/g·kh·kw] rows: input channel major, kernel position minor
            imp = np.repeat(imp.reshape(groups, -1), kk, axis=1)  # [groups, K]
            imp = imp[0] if groups == 1 else np.repeat(imp, self.w.rows // groups, axis=0)
        return imp

    def hessian(self) -> np.ndarray | None:
        """H = mean x^T x over calibration positions (K x K float64), or None (not a linear layer or conv).
        Its diagonal equals importance(); GPTQ propagates quantization error through its inverse.
        The same array is returned on every call, so its GPTQ factor is computed once for all tiers.
        An ungrouped conv: the moment of its patches (compiler/conv_moment.py)."""
        if self.moment is not None:
            return self.moment.hessian()
        if self.sum_xxt is None or self.n_x == 0:
            return None
        if getattr(self, "_H", (None, -1))[1] != self.n_x:
            self._H = (self.sum_xxt / self.n_x, self.n_x)
        return self._H[0]

    def gptq_factor(self, damp: float | None = None) -> np.ndarray | None:
        """Upper Cholesky factor of the dampened H^-1 (cached: every tier of this weight reuses it)."""
        H = self.hessian()
        if H is None:
            return None
        from .quantize import GPTQ_DAMP, gptq_factor

        key = GPTQ_DAMP if damp is None else damp
        if getattr(self, "_gptq_u", (None, None))[0] != key:
            self._gptq_u = (key, gptq_factor(H, key))
        return self._gptq_u[1]

    def summary(self, bounds: np.ndarray, route_share: float = 0.5, route_threshold: float = 0.9) -> dict:
        n = len(bounds) - 1
        seg = lambda v: np.add.reduceat(v, bounds[:-1])  # noqa: E731 - per-chunk sums
        rows_per = np.diff(bounds)
        E = np.array(self.out.sample_energy) if self.out.sample_energy else np.zeros((0, self.w.rows))
        conc = concentration(E, bounds, route_share)
        if self.w.kind == "gather":
            act = seg(self.lookups) / max(len(E), 1)
            out = {"chunk_activity": act.tolist(), "chunk_active_frac": (seg((self.lookups > 0).astype(float)) / rows_per).tolist(),
                   "chunk_peak": act.tolist()}
        else:
            out = {
                "chunk_activity": (seg(self.out.mean_abs()) / rows_per).tolist(),
                "chunk_active_frac": (seg(self.out.active_frac()) / rows_per).tolist(),
                "chunk_peak": np.maximum.reduceat(self.out.peak, bounds[:-1]).tolist(),
                "input_importance_mean": float(self.importance().mean()),
            }
        # Exact-on-skip evidence: the share of per-sample output energy in the top `route_share` chunks.
        out["concentration"] = conc
        # Skipping a chunk zeroes its outputs; that is near-exact only in front of an activation that
        # maps small/negative inputs to ~0 (ReLU, GELU). Heads, projections and residual paths are not.
        out["routable"] = bool(self.w.kind == "linear" and self.activation is not None and n >= 4 and conc >= route_threshold)
        out["activation_after"] = self.activation
        out["kind"] = self.w.kind
        return out


class FFNStats:
    """Calibration of a fused FFN: the up-projection's input importance, per-neuron activity of the
    post-activation h, per-sample contribution energy Σ h² (weighted by |down row|² at summary time),
    and a subsample of (x, |h|) rows for co-activation reordering and fitting the predictor sketch."""

    MAX_ROWS = 4096

    def __init__(self, up: Weight, down: Weight, activation: str):
        self.w, self.down, self.activation = up, down, activation
        R, K = up.rows, up.row_len
        self.sum_x2 = np.zeros(K, np.float64)
        self.n_x = 0
        self.out = OutputActivity(R)
        self.x_rows: list[np.ndarray] = []
        self.h_rows: list[np.ndarray] = []
        self.n_rows = 0
        # GPTQ second moments: of the up-projection input x [K, K] and of the down-projection input h [R, R]
        self.sum_xxt = np.zeros((K, K), np.float64)
        self.sum_hht = np.zeros((R, R), np.float64)

    def record(self, x: np.ndarray, h: np.ndarray) -> None:
        xf = x.reshape(-1, x.shape[-1])
        hf = h.reshape(-1, h.shape[-1])
        self.sum_x2 += np.einsum("ij,ij->j", xf, xf, dtype=np.float64)
        self.n_x += xf.shape[0]
        x32, h32 = np.ascontiguousarray(xf, np.float32), np.ascontiguousarray(hf, np.float32)
        self.sum_xxt += x32.T @ x32
        self.sum_hht += h32.T @ h32
        self.out.add(h.reshape(h.shape[0], -1, h.shape[-1]))
        a = np.abs(hf)
        if self.n_rows < self.MAX_ROWS:
            step = max(1, xf.shape[0] // 256)  # spread the subsample over the calibration set
            self.x_rows.append(xf[::step][: self.MAX_ROWS - self.n_rows].copy())
            self.h_rows.append(a[::step][: self.MAX_ROWS - self.n_rows].copy())
            self.n_rows += len(self.x_rows[-1])

    def importance(self) -> np.ndarray:
        return (self.sum_x2 / max(self.n_x, 1)).astype(np.float32)

    def hessian(self) -> np.ndarray | None:
        if not self.n_x:
            return None
        if getattr(self, "_H", (None, -1))[1] != self.n_x:  # one array per state: GPTQ factors are memoised on it
            self._H = (self.sum_xxt / self.n_x, self.n_x)
        return self._H[0]

    def down_hessian(self) -> np.ndarray | None:
        """mean h^T h of the down-projection input (in the current neuron order)."""
        if not self.n_x:
            return None
        if getattr(self, "_Hd", (None, -1))[1] != self.n_x:
            self._Hd = (self.sum_hht / self.n_x, self.n_x)
        return self._Hd[0]

    def permute(self, perm: np.ndarray) -> None:
        self.sum_hht = self.sum_hht[np.ix_(perm, perm)]
        self._Hd = (None, -1)
        self.out.permute(perm)
        self.h_rows = [h[:, perm] for h in self.h_rows]

    def summary(self, bounds: np.ndarray, route_share: float = 0.5, route_threshold: float = 0.9) -> dict:
        n = len(bounds) - 1
        rows_per = np.diff(bounds)
        contrib = np.einsum("rn,rn->r", self.down.array, self.down.array)  # |down row|² per neuron
        conc = concentration(np.array(self.out.sample_energy) * contrib, bounds, route_share)
        return {
            "kind": "ffn", "activation_after": self.activation,
            "chunk_activity": (np.add.reduceat(self.out.mean_abs() * contrib, bounds[:-1]) / rows_per).tolist(),
            "chunk_active_frac": (np.add.reduceat(self.out.active_frac(), bounds[:-1]) / rows_per).tolist(),
            "chunk_peak": np.maximum.reduceat(self.out.peak, bounds[:-1]).tolist(),
            "concentration": conc,
            "routable": bool(n >= 4 and conc >= route_threshold),
        }


_ACTIVATIONS = {"Relu", "Gelu", "FastGelu", "BiasGelu", "QuickGelu"}


def activation_after(node: dict, cons: dict) -> str | None:
    """The activation this op's output feeds, if any: a Relu/Gelu node, or the Erf form of GELU
    (x * 0.5 * (1 + erf(x / sqrt 2))) that exporters write, possibly after a bias Add."""
    out = node["outputs"][0]
    after = cons.get(out, [])
    if len(after) == 1 and after[0]["op"] == "Add" and after[0].get("domain", "") in ("", "ai.onnx"):
        out, after = after[0]["outputs"][0], cons.get(after[0]["outputs"][0], [])
    ops = sorted(a["op"] for a in after)
    if len(after) == 1 and ops[0] in _ACTIVATIONS:
        return "Relu" if ops[0] == "Relu" else "Gelu"
    if any(o in ("Div", "Mul") for o in ops):
        for a in after:
            for nxt in cons.get(a["outputs"][0], []):
                if nxt["op"] == "Erf":
                    return "Gelu"
    return None


def calibrate(graph: dict, constants: dict, weights: list[Weight], calib: dict[str, np.ndarray],
              batch_size: int = 16, progress=None, extra_ops: dict | None = None) -> dict[str, LayerStats]:
    """Run the rewritten graph on every calibration sample (in batches) and collect LayerStats.
    extra_ops: builders for further nadoo ops that record their own statistics (MoE, issue #7)."""
    cons = consumers(graph)
    by_name = {w.name: w for w in weights}
    stats = {}
    for n in graph["nodes"]:
        if n.get("domain") == "nadoo" and n["op"] == "ChunkedFFN":
            a = n["attrs"]
            stats[a["up"]] = FFNStats(by_name[a["up"]], by_name[a["down"]], a["activation"])
        elif n.get("domain") == "nadoo" and n["op"] == "ChunkedRecurrent":
            # what the node outputs is a state, not W's or R's product: no activation applies to those
            for key in ("weight", "recurrence"):
                stats[n["attrs"][key]] = LayerStats(by_name[n["attrs"][key]], False)
        elif n.get("domain") == "nadoo" and "weight" in n.get("attrs", {}):  # not MoE
            w = by_name[n["attrs"]["weight"]]
            act = activation_after(n, cons)
            stats[w.name] = LayerStats(w, act == "Relu", act, n["attrs"] if w.kind == "conv" else None)
    plan = Plan(graph, constants, custom_ops={**dense_builders(by_name, stats), **(extra_ops or {})})
    n = len(next(iter(calib.values())))
    starts = range(0, n, batch_size)
    for s in (progress(starts) if progress else starts):
        plan.run({k: v[s : s + batch_size] for k, v in calib.items()})
    return stats


def dense_builders(weights: dict[str, Weight], stats: dict[str, LayerStats] | None = None) -> dict:
    """Float, full-weight implementations of the nadoo ops (calibration and reference runs)."""
    from nadoo.runtime.activations import activation
    from nadoo.runtime.chunked.conv import conv_fn
    from nadoo.runtime.chunked.conv_transpose import conv_transpose_fn
    from nadoo.runtime.chunked.gather import gather_rows
    from nadoo.runtime.chunked.linear import linear
    from nadoo.runtime.chunked.recurrent import GATES, cell_fn, stacked

    def rec(name, x, y):
        if stats is not None:
            stats[name].record(x, y)
        return y

    def b_linear(node, ctx):
        w = weights[node["attrs"]["weight"]]
        wt = np.ascontiguousarray(w.array.T)

        def run(x, bias=None):
            return rec(w.name, x, linear(x, wt, bias))
        return run

    def b_gather(node, ctx):
        w = weights[node["attrs"]["weight"]]

        def run(idx):
            return rec(w.name, idx, gather_rows(w.array, idx))
        return run

    def b_conv(fn):
        def build(node, ctx):
            w = weights[node["attrs"]["weight"]]
            conv = fn(node["attrs"])

            def run(x, bias=None):
                return rec(w.name, x, conv(x, w.array, bias))
            return run
        return build

    def b_recurrent(node, ctx):
        a = node["attrs"]
        W, R = weights[a["weight"]], weights[a["recurrence"]]
        G, H = GATES[a["cell"]], R.row_len
        w3, r3 = stacked(W.array, G, H), stacked(R.array, G, H)
        cell = cell_fn(a, ["Y"] + node["outputs"][1:])  # Y (every step's state) is what R reads

        def run(x, *rest):
            out = cell(x, w3, r3, *rest)
            if stats is not None:
                Y = out[0] if isinstance(out, tuple) else out
                xb = x if a.get("layout", 0) else np.swapaxes(x, 0, 1)  # [batch, seq, I]
                yb = Y if a.get("layout", 0) else Y.transpose(2, 0, 1, 3)  # [batch, seq, D, H]
                stats[W.name].record(xb, xb @ W.array.T)
                # R multiplies the previous state; the states a run passes through stand for it (pooled
                # over directions for the importance, each direction against its own rows for the outputs)
                stats[R.name].record(yb.reshape(len(yb), -1, H),
                                     np.einsum("btdh,dgh->btdg", yb, r3).reshape(len(yb), yb.shape[1], -1))
            return out
        return run

    def b_ffn(node, ctx):
        a = node["attrs"]
        up, down, act = weights[a["up"]], weights[a["down"]], activation(a["activation"])
        upt = np.ascontiguousarray(up.array.T)

        def run(x, b1=None, b2=None, *_predictor):  # after _prepare_ffn: its predictor inputs, unused densely
            h = act(linear(x, upt, b1))
            if stats is not None:
                stats[up.name].record(x, h)
            return linear(h, down.array, b2)
        return run

    from .gated_ffn import gated_builder

    return {("nadoo", "ChunkedLinear"): b_linear, ("nadoo", "ChunkedGather"): b_gather, ("nadoo", "ChunkedConv"): b_conv(conv_fn),
            ("nadoo", "ChunkedConvTranspose"): b_conv(conv_transpose_fn), ("nadoo", "ChunkedFFN"): b_ffn,
            ("nadoo", "ChunkedRecurrent"): b_recurrent, ("nadoo", "GatedFFN"): gated_builder(weights, stats)}
