"""`nadoo info --plot FILE.png`: the calibration profile as pictures (matplotlib, imported lazily).

Top: one row per chunked layer, one cell per chunk, colour = the chunk's mean |activity| relative to
that layer's most active chunk. Below (bundles with experts): one row per MoE layer, one cell per
expert, colour = share of calibration tokens routed to it.
"""

from __future__ import annotations

import numpy as np

from .errors import NadooError


def plot_profile(facts: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NadooError("--plot needs matplotlib (pip install 'nadoo[plot]')") from None
    layers = (facts.get("profile") or {}).get("layers", {})
    rows = [(n, np.asarray(l["chunk_activity"], float)) for n, l in layers.items() if l.get("chunk_activity")]
    moe = [m for m in facts.get("moe") or [] if m.get("expert_frequency")]
    if not rows and not moe:
        raise NadooError("the bundle has no calibration profile to plot")
    panels = [p for p in (rows and "chunks", moe and "experts") if p]
    heights = [max(2, 0.3 * len(rows) + 1)] * bool(rows) + [max(1.5, 0.4 * len(moe) + 1)] * bool(moe)
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    ax_i = 0
    if rows:
        width = max(len(a) for _, a in rows)
        grid = np.full((len(rows), width), np.nan)
        for i, (_, a) in enumerate(rows):
            grid[i, : len(a)] = a / (a.max() if a.max() > 0 else 1)
        ax = axes[ax_i][0]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(rows)), [n if len(n) <= 40 else "…" + n[-39:] for n, _ in rows], fontsize=7)
        ax.set_xlabel("chunk")
        ax.set_title("calibration activity per chunk (relative to the layer's most active chunk)")
        fig.colorbar(im, ax=ax)
        ax_i += 1
    if moe:
        width = max(m["n_experts"] for m in moe)
        grid = np.full((len(moe), width), np.nan)
        for i, m in enumerate(moe):
            grid[i, : m["n_experts"]] = m["expert_frequency"]
        ax = axes[ax_i][0]
        im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, interpolation="nearest")
        for i, m in enumerate(moe):
            for e, f in enumerate(m["expert_frequency"]):
                ax.text(e, i, f"{f:.0%}", ha="center", va="center", fontsize=7, color="white" if f < grid[np.isfinite(grid)].max() / 2 else "black")
        ax.set_yticks(range(len(moe)), [f"[{m['index']}] {m['name'][-30:]}" for m in moe], fontsize=7)
        ax.set_xticks(range(width))
        ax.set_xlabel("expert")
        ax.set_title("expert usage: share of calibration tokens routed to each expert")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
