"""Size rules (see sizes.py) of the nadoo domain's ops. Their weights live in the bundle: the plan passes
the chunked weights' shapes (rows first, format spec §4.1) as `ctx.weight_shapes`."""
from __future__ import annotations

import numpy as np

from .sizes import _conv_rule, _conv_transpose_rule, _shape, prod, size_rule


def _weight(ctx, key: str = "weight") -> tuple | None:
    return ctx.weight_shapes.get(ctx.attrs.get(key))


@size_rule("ChunkedConv", domain="nadoo")
def _chunked_conv(node, ctx):
    rule = _conv_rule(node, ctx, _weight(ctx))
    return lambda x, b=None: rule(x)


@size_rule("ChunkedConvTranspose", domain="nadoo")
def _chunked_conv_transpose(node, ctx):
    w = _weight(ctx)
    if w is None:
        return None
    rule = _conv_transpose_rule(node, ctx, w)
    return lambda x, b=None: rule(x)


# LMHead: the same product; its other inputs are constants (row map, basis, mean)
@size_rule("ChunkedLinear", "LMHead", domain="nadoo")
def _chunked_linear(node, ctx):
    w = _weight(ctx)
    if w is None:
        return None
    r, k = w[0], prod(w[1:])

    def need(x, *rest):
        pos = prod(_shape(x)[:-1])
        return pos * r, pos * r * k
    return need


@size_rule("ChunkedGather", domain="nadoo")
def _chunked_gather(node, ctx):
    w = _weight(ctx)
    if w is None:
        return None
    row = prod(w[1:])
    return lambda idx, row_map=None: (prod(_shape(idx)) * row, 0)


def _ffn_rule(ctx, first: str, projections: int):
    """A fused MLP: `projections` matrices [r, k] from the input (`first` among them), then down, stored
    with r rows of n; its widest value has max(r, n) elements per position."""
    a, down = _weight(ctx, first), _weight(ctx, "down")
    if a is None or down is None:
        return None
    r, k, n = a[0], prod(a[1:]), prod(down[1:])

    def need(x, *rest):
        pos = prod(_shape(x)[:-1])
        return pos * max(r, n), pos * r * (projections * k + n)
    return need


@size_rule("ChunkedFFN", domain="nadoo")
def _chunked_ffn(node, ctx):
    return _ffn_rule(ctx, "up", 1)


@size_rule("GatedFFN", domain="nadoo")
def _gated_ffn(node, ctx):
    return _ffn_rule(ctx, "gate", 2)  # gate and up [r, k], down stored [r, n]


@size_rule("ChunkedRecurrent", domain="nadoo")
def _chunked_recurrent(node, ctx):
    w, r = _weight(ctx), _weight(ctx, "recurrence")
    if w is None or r is None:
        return None
    rows, k, h = w[0], prod(w[1:]), prod(r[1:])

    def need(x, *rest):
        steps = prod(_shape(x)[:2])  # sequence × batch, in either layout
        return steps * rows, steps * rows * (k + h)  # every step's gate pre-activations, against W and R
    return need


@size_rule("Attention", domain="nadoo")
def _attention(node, ctx):
    # scores [heads, n, keys]: the n new queries against the cached and new keys (positions < start + n)
    heads, d, limit = int(ctx.attr("heads")), int(ctx.attr("head_dim")), int(ctx.attr("max_positions"))

    def need(q, k, v, position_ids, *rest):
        n = _shape(q)[1] if len(_shape(q)) == 3 else 0
        pos = np.asarray(position_ids).reshape(-1)
        keys = min(max(int(pos[0]), 0), limit) + n if n and pos.size else n
        return heads * n * keys, 2 * heads * n * keys * d
    return need


@size_rule("EncoderAttention", domain="nadoo")
def _encoder_attention(node, ctx):
    # scores [B, heads, Sq, Sk]; q·Kᵀ and the weighted sum each one multiply-add per score and channel
    heads = ctx.attrs.get("heads")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        return None  # the builder reports the corrupt attribute

    def need(q, k, v, *rest):
        sq, sk = _shape(q), _shape(k)
        if len(sq) != 3 or len(sk) != 3:
            return 0, 0
        scores = sq[0] * heads * sq[1] * sk[1]
        return scores, 2 * scores * (sq[2] // heads)
    return need
