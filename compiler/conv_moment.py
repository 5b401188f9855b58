"""The input second moment of a convolution for GPTQ: H = E[p pᵀ] over the im2col patches p of its input
(the K = Cin · kernel columns a row of the [Cout, K] weight multiplies). Ungrouped convs only: a grouped
conv's rows read different inputs (one H per group), and GPTQ per group of a depthwise conv took 25× the
compile time of the rest for a 10 % lower local error (random-init MobileNet v1).

Why: a conv after a ReLU sees inputs of large mean, so its output error (W − Ŵ)p is dominated by the
*sum* of each row's weight errors, which the diagonal importance (mean x² per column) cannot see; with
the integer zero points of the zp codec that sum no longer cancels (random-init MobileNet v1 at 8 bits:
cosine 0.987, against 0.996 with the float-min codec whose least-squares min absorbs it). GPTQ with the
full H feeds each column's error forward, which removes it.

The patches come from the conv itself: the same attributes (strides, pads, dilations) with one-hot
kernels, one output channel per patch element, so padding and striding are exactly the op's.
"""
from __future__ import annotations

import numpy as np

from .rewrite import Weight

MAX_K = 2304  # patch length up to which H is kept (256 channels · 3×3, 42 MiB); larger: diagonal importance


class ConvMoment:
    """Accumulates Σ p pᵀ over the calibration positions of one conv."""

    def __init__(self, w: Weight, attrs: dict):
        from nadoo.runtime.chunked.conv import conv_fn

        self.K = K = w.row_len
        # output channel k of the patch conv copies element k of the patch (input channel major)
        self.onehot = np.eye(K, dtype=np.float32).reshape(K, *w.array.shape[1:])
        self.conv = conv_fn(attrs)
        self.sum = np.zeros((K, K), np.float64)
        self.n = 0
        self._H = (None, -1)

    @staticmethod
    def fits(w: Weight) -> bool:
        return w.kind == "conv" and int(w.meta.get("groups", 1)) == 1 and w.row_len <= MAX_K

    def add(self, x: np.ndarray) -> None:
        p = self.conv(np.ascontiguousarray(x, np.float32), self.onehot)  # [N, K, *out]
        p = np.moveaxis(p, 1, -1).reshape(-1, self.K)
        self.sum += p.T @ p  # float32 products per batch (BLAS), float64 across batches
        self.n += len(p)

    def hessian(self) -> np.ndarray | None:
        """mean p pᵀ [K, K]; the same array while no batch is added, so its GPTQ factor is made once."""
        if not self.n:
            return None
        if self._H[1] != self.n:
            self._H = (self.sum / self.n, self.n)
        return self._H[0]
