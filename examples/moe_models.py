"""Mixture-of-experts test subjects (compile side: torch / transformers).

    TinyMixtralLM()  transformers' MixtralForCausalLM exactly as shipped: hidden 64, 8 experts, top-2,
                     2 layers; forward(input_ids) -> logits
    PlainMoENet()    a hand-written MoE net: plain Linear-GELU-Linear experts with biases, a router with
                     bias, top-2 of the *logits* then softmax, a Python double loop with torch.where,
                     and a shared ReLU expert; forward(x [B, S, 32]) -> [B, S, 10]
Both have no-argument constructors so `nadoo compile state.pt --model-class examples.moe_models:...` works.
"""

from __future__ import annotations

import torch
from torch import nn


def mixtral_config(**kw):
    from transformers import MixtralConfig

    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=128,
                use_cache=False, tie_word_embeddings=False)
    base.update(kw)
    return MixtralConfig(**base)


class TinyMixtralLM(nn.Module):
    def __init__(self, **config):
        super().__init__()
        from transformers import MixtralForCausalLM

        torch.manual_seed(0)
        self.lm = MixtralForCausalLM(mixtral_config(**config)).eval()
        with torch.no_grad():  # larger than the 0.02 default init, so routing is decisive and outputs non-trivial
            for n, p in self.lm.named_parameters():
                if "norm" not in n:
                    p.normal_(0, 0.15)

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids).logits


class PlainMoE(nn.Module):
    def __init__(self, d: int = 32, f: int = 64, n_experts: int = 4, k: int = 2):
        super().__init__()
        self.router = nn.Linear(d, n_experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, f), nn.GELU(), nn.Linear(f, d)) for _ in range(n_experts))
        self.shared = nn.Sequential(nn.Linear(d, f), nn.ReLU(), nn.Linear(f, d))
        self.k = k

    def forward(self, x):
        top, idx = self.router(x).topk(self.k, dim=-1)
        w = top.softmax(-1)
        out = torch.zeros_like(x)
        for j in range(self.k):
            for e, expert in enumerate(self.experts):
                hit = (idx[..., j] == e)[..., None]
                out = out + torch.where(hit, w[..., j : j + 1] * expert(x), torch.zeros_like(x))
        return out + self.shared(x)


class PlainMoENet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.inp = nn.Linear(32, 32)
        self.moe1 = PlainMoE()
        self.norm = nn.LayerNorm(32)
        self.moe2 = PlainMoE()
        self.head = nn.Linear(32, 10)
        self.eval()

    def forward(self, x):
        h = self.inp(x)
        h = h + self.moe1(h)
        h = h + self.moe2(self.norm(h))
        return self.head(h)
