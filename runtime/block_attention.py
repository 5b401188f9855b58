"""Block-sparse attention for encoders (nadoo.EncoderAttention): which key blocks each query block reads.

    dense   every key
    blocks  keys and queries cut in blocks of `block` positions; each key block is summarised by its
            element-wise min and max key, and a query scores it by the Quest bound
            sum_i max(q_i*min_i, q_i*max_i) (an upper bound of q.k over the block) plus the largest
            mask value it may meet there; a query block scores a key block by the best of its
            queries. Each query block reads its own (local) block, the first (sink) block and the
            best-scored others, `share` of the key blocks in all (at least one).

`share` counts the key blocks one query block reads, the local and sink blocks included; when it
covers every block the result is dense attention. The selection is per batch row and head.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .ops.encoder_attention import dense_attention, merge_heads, softmax_rows, split_heads

__all__ = ["BLOCK_KINDS", "BlockAttentionPolicy", "block_sparse_attention"]

BLOCK_KINDS = ("dense", "blocks")
DEFAULT_BLOCK = 32


@dataclass(frozen=True)
class BlockAttentionPolicy:
    kind: str = "dense"
    share: float | None = None  # key blocks read per query block, as a share of all key blocks
    block: int | None = None  # positions per block (default 32)

    def __post_init__(self):
        if self.kind not in BLOCK_KINDS:
            raise InputError(f"unknown encoder --attention {self.kind!r} ({' or '.join(BLOCK_KINDS)})")
        share, block = self.share, self.block
        if self.kind == "dense":
            if share is not None or block is not None:
                raise InputError(f"--{'attention-blocks' if share is not None else 'block'} needs --attention blocks")
            return
        if share is None:
            raise InputError("--attention blocks needs --attention-blocks SHARE (of key blocks read, 0..1]")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise InputError(f"--attention-blocks must be a share in (0, 1], got {share!r}")
        block = DEFAULT_BLOCK if block is None else block
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
            raise InputError(f"--block must be an integer >= 1, got {block!r}")
        object.__setattr__(self, "share", float(share))
        object.__setattr__(self, "block", int(block))

    @property
    def active(self) -> bool:
        return self.kind != "dense"

    def keep(self, n_blocks: int) -> int:
        """Key blocks one query block reads out of `n_blocks`."""
        return max(1, min(n_blocks, math.ceil(self.share * n_blocks - 1e-9)))

    def describe(self) -> dict:
        return {"kind": self.kind, "share": self.share, "block": self.block}


def _blocks(x: np.ndarray, n: int, size: int, fill: float = 0.0) -> np.ndarray:
    """[..., S, D] -> [..., n, size, D], padded with `fill` to n·size positions."""
    pad = n * size - x.shape[-2]
    if pad:
        x = np.concatenate([x, np.full(x.shape[:-2] + (pad, x.shape[-1]), fill, x.dtype)], axis=-2)
    return x.reshape(x.shape[:-2] + (n, size, x.shape[-1]))


def _row_uniform(mask: np.ndarray) -> np.ndarray | None:
    """The mask as [.., 1, Sk] when every query row of it is the same (key padding, the usual case)."""
    if mask.shape[-2] == 1:
        return mask
    first = mask[..., :1, :]
    return first if np.array_equal(np.broadcast_to(first, mask.shape), mask) else None


def block_scores(qh: np.ndarray, kb: np.ndarray, sk: int, mask_max: np.ndarray, nq: int) -> np.ndarray:
    """[b, h, nq, nk]: how much each query block may attend to each key block. qh [b, h, Sq, D]
    (scaled queries), kb [b, h, nk, size, D] (keys in blocks, zero padded past sk), mask_max
    [.., Sq|1, nk] the largest mask value per query and key block."""
    nk, size = kb.shape[2], kb.shape[3]
    if sk == nk * size:
        lo, hi = kb.min(axis=-2), kb.max(axis=-2)
    else:  # padding keys excluded
        valid = _blocks(np.ones((sk, 1), bool), nk, size, False)[..., 0]  # [nk, size]
        lo = np.where(valid[..., None], kb, np.inf).min(axis=-2)
        hi = np.where(valid[..., None], kb, -np.inf).max(axis=-2)
    bound = np.matmul(np.maximum(qh, 0), hi.transpose(0, 1, 3, 2)) + np.matmul(np.minimum(qh, 0), lo.transpose(0, 1, 3, 2))
    return _blocks(bound + mask_max, nq, size, -np.inf).max(axis=-2)  # the best query of each block


def block_sparse_attention(q, k, v, mask, heads: int, scale: float, zero_masked_rows: bool,
                           policy: BlockAttentionPolicy) -> tuple[np.ndarray, int, int]:
    """(output [B, Sq, heads·D], key blocks read, key blocks in all) over the query blocks and heads."""
    b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    # a block longer than the input is the input: padding never outgrows the sequence
    size = max(1, min(policy.block, max(sq, sk)))
    nq, nk = -(-sq // size), -(-sk // size)
    keep = policy.keep(nk)
    if keep >= nk:  # every block read: dense attention itself
        return dense_attention(q, k, v, mask, heads, scale, zero_masked_rows), b * heads * nq * nk, b * heads * nq * nk
    qh = split_heads(q.astype(np.float32, copy=False), heads) * np.float32(scale)
    kh = split_heads(k.astype(np.float32, copy=False), heads)
    vh = split_heads(v.astype(np.float32, copy=False), heads)
    h, d = qh.shape[1], qh.shape[3]
    if mask is None:
        mask = np.zeros((1, 1, 1, sk), np.float32)
    mask = mask.astype(np.float32, copy=False).reshape((1,) * (4 - mask.ndim) + mask.shape)
    mask = np.broadcast_to(mask, mask.shape[:3] + (sk,))  # [b|1, h|1, sq|1, sk]
    key_mask = _row_uniform(mask)  # [b|1, h|1, 1, sk], or None when rows differ

    kb = _blocks(kh, nk, size)
    # the largest mask value a query meets in a key block bounds what the mask adds there
    pad_keys = lambda m: np.concatenate([m, np.full(m.shape[:-1] + (nk * size - sk,), -np.inf, np.float32)], axis=-1)  # noqa: E731
    if key_mask is not None:
        km = pad_keys(key_mask).reshape(key_mask.shape[:2] + (nk, size))  # [b|1, h|1, nk, size]
        mask_max = km.max(axis=-1)[:, :, None, :]
    else:
        mp = pad_keys(mask)
        mask_max = mp.reshape(mp.shape[:-1] + (nk, size)).max(axis=-1)
    score = block_scores(qh, kb, sk, mask_max, nq)
    # the local block, then the sink block, are read first (when they hold a key the block may see)
    rows = np.arange(nq)
    local = np.minimum(rows, nk - 1)
    live = np.isfinite(score)
    score[:, :, rows, 0] = np.where(live[:, :, rows, 0], np.finfo(np.float32).max, score[:, :, rows, 0])
    score[:, :, rows, local] = np.where(live[:, :, rows, local], np.inf, score[:, :, rows, local])
    idx = np.argpartition(-score, keep - 1, axis=-1)[..., :keep]  # [b, h, nq, keep]
    bi, hi_ = np.arange(b)[:, None, None, None], np.arange(h)[None, :, None, None]
    ksel = kb[bi, hi_, idx].reshape(b, h, nq, keep * size, d)
    vsel = _blocks(vh, nk, size)[bi, hi_, idx].reshape(b, h, nq, keep * size, d)
    s = np.matmul(_blocks(qh, nq, size), ksel.transpose(0, 1, 2, 4, 3))  # [b, h, nq, size, keep·size]
    if key_mask is not None:
        mb, mh = (bi if km.shape[0] > 1 else 0), (hi_ if km.shape[1] > 1 else 0)
        s += km[mb, mh, idx].reshape(b, h, nq, 1, keep * size)
    else:  # a mask that differs per query row: gather its blocks (padding query rows read zeros)
        mp = mp if nq * size == sq else np.concatenate(
            [mp, np.zeros(mp.shape[:2] + (nq * size - sq, mp.shape[-1]), np.float32)], axis=-2)
        mp = mp.reshape(mp.shape[:2] + (nq, size, nk, size))
        s += np.take_along_axis(mp, idx[:, :, :, None, :, None], axis=4).reshape(b, h, nq, size, keep * size)
    out = np.matmul(softmax_rows(s, zero_masked_rows), vsel)  # [b, h, nq, size, d]
    return merge_heads(out.reshape(b, h, nq * size, d)[:, :, :sq]), b * h * nq * keep, b * h * nq * nk
