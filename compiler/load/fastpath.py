"""PyTorch's fused inference kernels, written as the plain ATen ops the ONNX exporter translates.

In eval mode without autograd (how models are traced for deployment), nn.MultiheadAttention and
nn.TransformerEncoderLayer with batch_first=True take a "fast path": one fused kernel each
(aten::_native_multi_head_attention, aten::_transformer_encoder_layer_fwd) that TorchScript records
and that no ONNX exporter translates. `DECOMPOSITIONS` maps them to functions computing the same
thing from linear / softmax / layer_norm, for ExportedProgram.run_decompositions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

aten = torch.ops.aten


def _masked(scores: torch.Tensor, mask, mask_type) -> torch.Tensor:
    """scores [B, H, L, S]; mask: key padding [B, S] (type 1), [B, H, L, S] (type 2) or [L, S] (type 0);
    boolean masks mark the positions to leave out, float masks are added."""
    if mask is None:
        return scores
    B, H, L, S = scores.shape
    if mask_type == 1:
        mask = mask.reshape(B, 1, 1, S)
    elif mask.dim() == 2:
        mask = mask.reshape(1, 1, L, S)
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask, float("-inf"))
    return scores + mask


def multi_head_attention(query, key, value, embed_dim, num_head, qkv_weight, qkv_bias, proj_weight, proj_bias,
                         mask=None, need_weights=True, average_attn_weights=True, mask_type=None):
    """aten::_native_multi_head_attention: batch-first [B, L, E] inputs, packed q/k/v projections."""
    B, L, _ = query.shape
    S = key.shape[1]
    hd = embed_dim // num_head
    wq, wk, wv = qkv_weight.chunk(3)
    bq, bk, bv = qkv_bias.chunk(3)
    q = F.linear(query, wq, bq).reshape(B, L, num_head, hd).transpose(1, 2)
    k = F.linear(key, wk, bk).reshape(B, S, num_head, hd).transpose(1, 2)
    v = F.linear(value, wv, bv).reshape(B, S, num_head, hd).transpose(1, 2)
    scores = _masked(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(hd), mask, mask_type)
    attn = torch.softmax(scores, dim=-1)
    out = F.linear(torch.matmul(attn, v).transpose(1, 2).reshape(B, L, embed_dim), proj_weight, proj_bias)
    if not need_weights:
        return out, out.new_empty(0)
    return out, attn.mean(1) if average_attn_weights else attn


def transformer_encoder_layer(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, use_gelu,
                              norm_first, eps, norm_weight_1, norm_bias_1, norm_weight_2, norm_bias_2,
                              ffn_weight_1, ffn_bias_1, ffn_weight_2, ffn_bias_2, mask=None, mask_type=None):
    """aten::_transformer_encoder_layer_fwd: self-attention and FFN blocks with residuals, pre- or post-norm."""
    def attention(x):
        return multi_head_attention(x, x, x, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias,
                                    mask, False, True, mask_type)[0]

    def ffn(x):
        h = F.linear(x, ffn_weight_1, ffn_bias_1)
        return F.linear(F.gelu(h) if use_gelu else F.relu(h), ffn_weight_2, ffn_bias_2)

    def norm(x, w, b):
        return F.layer_norm(x, (embed_dim,), w, b, eps)

    if norm_first:
        x = src + attention(norm(src, norm_weight_1, norm_bias_1))
        return x + ffn(norm(x, norm_weight_2, norm_bias_2))
    x = norm(src + attention(src), norm_weight_1, norm_bias_1)
    return norm(x + ffn(x), norm_weight_2, norm_bias_2)


DECOMPOSITIONS = {
    aten._native_multi_head_attention.default: multi_head_attention,
    aten._transformer_encoder_layer_fwd.default: transformer_encoder_layer,
}
