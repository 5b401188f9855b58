"""The LM head's routed layout: the vocabulary reordered so that tokens scored alike share chunks, and
the basis the run-time bound is built on (runtime/chunked/lm_head.py, format_spec/NDC-v1.md §4.6).

The basis is the top-r eigenvectors of E[h hᵀ], h the head's input over the calibration text: the
directions the final hidden states live in, so the part of h outside it is small and the bound on
it, ‖h⊥‖·‖t_i‖, is tight. Rows are ordered by recursive balanced bisection along the principal
direction of their sketch coordinates (the head's rows minus their mean, in that basis): a chunk
then holds rows with similar sketches, whose bounds rise and fall together, so the few rows that
can beat the best exact logit sit in few chunks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nadoo.runtime.chunked.lm_head import stages

# Basis columns stored, as a share of the hidden size (CompileOptions.lm_head_sketch): on Gemma 3 270M (640) the bound at 192 dims
# leaves 0.03 % of the rows able to beat the best logit, at 128 dims 1.2 %, at 64 about half. The
# bound is refined in thirds (64, 128, 192 there: runtime/chunked/lm_head.py `stages`).
POWER_ITERS = 6


@dataclass
class HeadLayout:
    order: np.ndarray  # stored row p holds token order[p]
    row_of: np.ndarray  # token t is stored at row row_of[t] (int64 [V])
    basis: np.ndarray  # [K, r] float32
    mean: np.ndarray  # [K] float32, the mean head row


def sketch_basis(moment: np.ndarray, rank: int) -> np.ndarray:
    """The top `rank` eigenvectors of a [K, K] second moment, as float32 columns."""
    ev, vec = np.linalg.eigh(np.asarray(moment, np.float64))
    return np.ascontiguousarray(vec[:, ::-1][:, :rank], np.float32)


def bisection_order(points: np.ndarray, leaf: int, seed: int = 0) -> np.ndarray:
    """Row indices ordered so that every run of `leaf` rows (a chunk) is a cell of a balanced binary
    partition along successive principal directions. Cuts fall on multiples of `leaf`."""
    rng = np.random.default_rng(seed)
    out, stack = [], [np.arange(len(points))]
    while stack:
        idx = stack.pop()
        if len(idx) <= leaf:
            out.append(idx)
            continue
        p = points[idx]
        p = p - p.mean(axis=0)
        v = rng.standard_normal(p.shape[1]).astype(np.float32)
        for _ in range(POWER_ITERS):
            v = p.T @ (p @ v)
            v /= max(float(np.linalg.norm(v)), 1e-30)
        srt = idx[np.argsort(p @ v, kind="stable")]
        cut = max(leaf, int(round(len(idx) / 2 / leaf)) * leaf)
        stack += [srt[cut:], srt[:cut]]  # the lower half is popped (and emitted) first
    return np.concatenate(out)


def head_layout(head: np.ndarray, moment: np.ndarray, rows_per_chunk: int, share: float = 0.3) -> HeadLayout:
    """The routed layout of a [V, K] head whose input has second moment `moment` [K, K]."""
    w = np.asarray(head, np.float32)
    rank = max(1, min(round(share * w.shape[1]), w.shape[1]))
    basis = sketch_basis(moment, rank)
    mean = w.mean(axis=0, dtype=np.float64).astype(np.float32)
    order = bisection_order((w - mean) @ basis[:, :stages(rank)[0]], rows_per_chunk)
    row_of = np.empty(len(order), np.int64)
    row_of[order] = np.arange(len(order))
    return HeadLayout(order, row_of, basis, mean)
