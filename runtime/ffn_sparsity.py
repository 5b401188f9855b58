"""FFN activation sparsity (TEAL/CATS style, training-free): which neurons of a down projection a token skips.

A gated MLP computes a = act(gate·x) ⊙ (up·x), then down·a. Neuron j is skipped when |a_j| <= its layer's
threshold t_l: its column of down is neither read nor multiplied. The compiler stores, per layer,
a curve over a grid of sparsities s: the threshold t_l(s) (the s-quantile of |a| on the calibration
text) and the relative error ‖Δy‖²/‖y‖² of the layer's output when every |a_j| < t_l(s) is dropped
(measured on calibration positions). A ReLU layer's exact zeros make t_l(s) = 0 for small s:
skipping them is exact, so such a layer skips at least its zeros. At run time `allocate` spreads a model-wide target sparsity over
the layers greedily: each step raises the layer whose error grows least for the next step of
sparsity, so tolerant layers carry more of the target and intolerant ones stay (near) dense.
"""

from __future__ import annotations

import numpy as np

from .errors import BundleError, InputError

MAX_SPARSITY = 0.9  # beyond this even the most tolerant layer's output is mostly lost
PROFILE_KEY = "ffn_sparsity"  # a layer profile's curve: {"grid", "thresholds", "errors", "neurons"}


def check_target(s) -> float:
    """The model-wide target as a float in [0, MAX_SPARSITY], else one clear error."""
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not np.isfinite(s) or not 0 <= s <= MAX_SPARSITY:
        raise InputError(f"--ffn-sparsity must be a number in 0..{MAX_SPARSITY}, got {s!r}")
    return float(s)


def check_fallback(x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not np.isfinite(x) or not 0 <= x <= 1:
        raise InputError(f"--ffn-fallback must be a number in 0..1, got {x!r}")
    return float(x)


def curves_of(profile: dict) -> dict[str, dict]:
    """The layers' stored curves {tensor name: curve}, validated (a damaged profile is one clear error)."""
    out = {}
    for name, layer in (profile or {}).get("layers", {}).items():
        c = layer.get(PROFILE_KEY) if isinstance(layer, dict) else None
        if c is None:
            continue
        try:
            grid, thr, err = (np.asarray(c[k], np.float64) for k in ("grid", "thresholds", "errors"))
            neurons = int(c["neurons"])
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"profile of {name}: malformed {PROFILE_KEY} curve") from None
        ok = (grid.ndim == 1 and np.all(thr >= 0) and len(grid) >= 2 and grid.shape == thr.shape == err.shape and grid[0] == 0
              and np.all(np.diff(grid) > 0) and np.all(np.isfinite(thr)) and np.all(np.isfinite(err))
              and neurons > 0)
        if not ok:
            raise BundleError(f"profile of {name}: malformed {PROFILE_KEY} curve")
        out[name] = {"grid": grid, "thresholds": thr, "errors": err, "neurons": neurons}
    return out


def allocate(curves: dict[str, dict], target: float) -> dict[str, tuple[float, float]]:
    """Per layer (sparsity, threshold) whose neuron-weighted mean sparsity is `target`, chosen greedily
    by the least error increase per grid step; the last step is taken in part (its threshold
    interpolated) so the mean hits the target. target 0 → every layer (0, 0): dense."""
    alloc = {name: (0.0, 0.0) for name in curves}
    if target <= 0 or not curves:
        return alloc
    names = list(curves)
    step = {n: 0 for n in names}
    total = sum(curves[n]["neurons"] for n in names)
    need = target * total  # neurons to skip, summed over layers
    done = 0.0
    while done < need - 1e-9:
        best, best_cost = None, np.inf
        for n in names:
            c, k = curves[n], step[n]
            if k + 1 >= len(c["grid"]):
                continue
            cost = (c["errors"][k + 1] - c["errors"][k]) / (c["grid"][k + 1] - c["grid"][k])
            if cost < best_cost:
                best, best_cost = n, cost
        if best is None:  # every layer at the grid's end
            break
        c, k = curves[best], step[best]
        gain = (c["grid"][k + 1] - c["grid"][k]) * c["neurons"]
        if done + gain <= need + 1e-9:
            step[best] = k + 1
            done += gain
            continue
        frac = (need - done) / gain  # a part of the step: interpolate the threshold
        s = c["grid"][k] + frac * (c["grid"][k + 1] - c["grid"][k])
        t = c["thresholds"][k] + frac * (c["thresholds"][k + 1] - c["thresholds"][k])
        alloc[best] = (float(s), float(t))
        done = need
        step[best] = -1  # settled by the partial step
    for n in names:
        k = step[n]
        if k > 0:
            alloc[n] = (float(curves[n]["grid"][k]), float(curves[n]["thresholds"][k]))
    return alloc


def calibration_curve(acts: np.ndarray, down_t: np.ndarray, grid=None) -> dict:
    """The stored curve of one layer from calibration inputs of its down projection.

    acts: [positions, neurons] the down projection's inputs a; down_t: [neurons, outputs] (down
    stored transposed). Thresholds are quantiles of |a| over all positions (so a token's own share
    varies with how spread its activity is); errors are measured exactly on these positions."""
    grid = np.round(np.arange(0.0, MAX_SPARSITY + 1e-9, 0.05), 4) if grid is None else np.asarray(grid)
    a = np.asarray(acts, np.float32)
    mag = np.abs(a)
    y = a @ down_t
    ref = float(np.einsum("ij,ij->", y, y, dtype=np.float64)) + 1e-30
    thresholds, errors = [], []
    for s in grid:
        if s <= 0:
            thresholds.append(0.0)
            errors.append(0.0)
            continue
        t = float(np.quantile(mag, s))
        thresholds.append(t)
        dropped = np.where(mag <= np.float32(t), a, np.float32(0))
        d = dropped @ down_t
        errors.append(float(np.einsum("ij,ij->", d, d, dtype=np.float64)) / ref)
    return {"grid": [float(g) for g in grid], "thresholds": thresholds, "errors": errors, "neurons": int(a.shape[1])}
