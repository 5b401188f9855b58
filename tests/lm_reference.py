"""A NumPy reference decoder over an LMSource: the runtime's LM kernels and KV cache wired together
with plain np.matmul. Test support (and the yardstick for tools/lm_reference.py), not product code:
the product runs a compiled graph with a fused attention op."""
from __future__ import annotations

import numpy as np

from nadoo.runtime.kv_cache import KVCache
from nadoo.runtime.lm_kernels import ACTIVATIONS, RopeTable, attention, rms_norm


class ReferenceDecoder:
    def __init__(self, src, max_positions: int | None = None, kv_dtype=np.float32):
        c, w = src.config, src.weights
        self.c, self.w = c, w
        self.max_positions = min(max_positions or c["max_positions"], c["max_positions"])
        self.ropes = {kind: RopeTable(w[f"rope.{kind}.inv_freq"], self.max_positions) for kind in c["rope"]}
        windows = [c["sliding_window"] if t == "sliding" else None for t in c["layer_types"]]
        self.cache = KVCache(windows, c["kv_heads"], c["head_dim"], self.max_positions, kv_dtype)
        self.act = ACTIVATIONS[c["activation"]]
        self.head = w["embed"] if c["tied_head"] else w["head"]

    def reset(self):
        self.cache.reset()

    def _norm(self, x, name):
        return rms_norm(x, self.w[name], self.c["norm_eps"], self.c["norm_style"])

    def _linear(self, x, name):
        y = np.matmul(x, self.w[name].T)
        b = self.w.get(name + "_bias")
        return y if b is None else y + b

    def forward(self, ids, last: int | None = None) -> np.ndarray:
        """Run token ids (continuing the cached sequence); logits [n, vocab], or only for the last
        `last` positions (scoring a long window needs only some of them)."""
        c = self.c
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        x = self.w["embed"][ids] * np.float32(c["embed_scale"])
        for i, kind in enumerate(c["layer_types"]):
            p = f"layers.{i}."
            h = self._norm(x, p + "attn_norm")
            a = attention(
                self._linear(h, p + "attn.q"), self._linear(h, p + "attn.k"), self._linear(h, p + "attn.v"),
                self.cache.layers[i], n_heads=c["heads"], scale=c["attn_scale"], rope=self.ropes[kind],
                window=c["sliding_window"] if kind == "sliding" else None, softcap=c["attn_softcap"],
                q_norm=self.w.get(p + "attn.q_norm"), k_norm=self.w.get(p + "attn.k_norm"),
                norm_eps=c["norm_eps"], norm_style=c["norm_style"])
            a = self._linear(a, p + "attn.o")
            if c["sandwich_norm"]:
                a = self._norm(a, p + "post_attn_norm")
            x = x + a
            h = self._norm(x, p + "mlp_norm")
            m = self._linear(self.act(self._linear(h, p + "mlp.gate")) * self._linear(h, p + "mlp.up"), p + "mlp.down")
            if c["sandwich_norm"]:
                m = self._norm(m, p + "post_mlp_norm")
            x = x + m
        x = self._norm(x if last is None else x[-last:], "final_norm")
        logits = np.matmul(x, self.head.T)
        if c["final_softcap"] is not None:
            cap = np.float32(c["final_softcap"])
            logits = np.tanh(logits / cap) * cap
        return logits

    def greedy(self, prompt_ids, new_tokens: int):
        """Prefill the prompt, then decode `new_tokens` greedily. Returns (tokens, logits per step);
        step 0's logits are the prefill's last position."""
        self.reset()
        logits = self.forward(prompt_ids, last=1)[0]
        tokens, steps = [], [logits]
        for _ in range(new_tokens):
            tokens.append(int(np.argmax(logits)))
            if len(tokens) == new_tokens:
                break
            logits = self.forward([tokens[-1]])[0]
            steps.append(logits)
        return tokens, steps
