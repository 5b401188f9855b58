"""runtime/lm_kernels.py and runtime/kv_cache.py against transformers' own modules and against a
direct float64 attention that holds every key (no cache, no ring, explicit loops over heads)."""
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nadoo.runtime.errors import InputError  # noqa: E402
from nadoo.runtime.kv_cache import KVCache, LayerKVCache  # noqa: E402
from nadoo.runtime.lm_kernels import (ACTIVATIONS, RopeTable, apply_rope, attention, rms_norm,  # noqa: E402
                                      rope_inv_freq)

torch = pytest.importorskip("torch")


# ------------------------------------------------------------------ norms, activations, rope
def test_rms_norm_matches_transformers_plain_and_gemma():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (5, 48)).astype(np.float32)
    w = rng.normal(0, 0.5, 48).astype(np.float32)
    for cls, style in ((LlamaRMSNorm, "plain"), (Gemma3RMSNorm, "gemma")):
        m = cls(48, eps=1e-5)
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(w))
            ref = m(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(rms_norm(x, w, 1e-5, style), ref, rtol=1e-6, atol=1e-6)
    # the two styles really differ (a test that would pass with the wrong style is no test)
    assert np.abs(rms_norm(x, w, 1e-5, "gemma") - rms_norm(x, w, 1e-5, "plain")).max() > 0.1
    with pytest.raises(InputError, match="norm style"):
        rms_norm(x, w, 1e-5, "layer")


def test_activations_match_torch_and_stay_quiet_at_extremes():
    x = np.linspace(-120, 30, 2001, dtype=np.float32)
    t = torch.from_numpy(x)
    np.testing.assert_allclose(ACTIVATIONS["silu"](x), torch.nn.functional.silu(t).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ACTIVATIONS["gelu_tanh"](x), torch.nn.functional.gelu(t, approximate="tanh").numpy(),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ACTIVATIONS["gelu"](x), torch.nn.functional.gelu(t).numpy(), rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ACTIVATIONS["silu"](np.array([-1000.0], np.float32))[0] == 0


def test_rope_matches_transformers_at_small_and_large_positions():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=40000)
    rot = LlamaRotaryEmbedding(cfg)
    inv = rope_inv_freq(32, 10000.0)
    np.testing.assert_allclose(inv, rot.inv_freq.numpy(), rtol=1e-7)
    pos = np.array([0, 1, 7, 513, 31999])
    rng = np.random.default_rng(1)
    q = rng.normal(size=(3, len(pos), 32)).astype(np.float32)
    k = rng.normal(size=(1, len(pos), 32)).astype(np.float32)
    cos_t, sin_t = rot(torch.zeros(1), torch.from_numpy(pos)[None])
    rq, rk = apply_rotary_pos_emb(torch.from_numpy(q)[None], torch.from_numpy(k)[None], cos_t, sin_t)
    table = RopeTable(inv, 40000)
    cos = np.stack([table.cos_sin(int(p), 1)[0][0] for p in pos])
    sin = np.stack([table.cos_sin(int(p), 1)[1][0] for p in pos])
    np.testing.assert_allclose(apply_rope(q, cos, sin), rq[0].numpy(), atol=2e-6)
    np.testing.assert_allclose(apply_rope(k, cos, sin), rk[0].numpy(), atol=2e-6)
    with pytest.raises(InputError, match="outside"):
        table.cos_sin(39999, 2)


# ------------------------------------------------------------------ attention
def naive_attention(q, k, v, n_heads, kv_heads, scale, window=None, softcap=None):
    """All positions at once, float64, one head and one query at a time."""
    n, d = q.shape[0], q.shape[1] // n_heads
    q = q.reshape(n, n_heads, d).astype(np.float64)
    k = k.reshape(n, kv_heads, d).astype(np.float64)
    v = v.reshape(n, kv_heads, d).astype(np.float64)
    out = np.zeros((n, n_heads, d))
    for h in range(n_heads):
        kvh = h // (n_heads // kv_heads)
        for p in range(n):
            lo = 0 if window is None else max(0, p - window + 1)
            s = k[lo:p + 1, kvh] @ q[p, h] * scale
            if softcap:
                s = np.tanh(s / softcap) * softcap
            e = np.exp(s - s.max())
            out[p, h] = (e / e.sum()) @ v[lo:p + 1, kvh]
    return out.reshape(n, n_heads * d)


def run_chunks(q, k, v, cache, chunks, **kw):
    outs, at = [], 0
    for c in chunks:
        outs.append(attention(q[at:at + c], k[at:at + c], v[at:at + c], cache, **kw))
        at += c
    return np.concatenate(outs)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("chunks", [[23], [1] * 23, [6, 1, 1, 9, 1, 5], [4, 12, 7]])
def test_attention_equals_direct_computation(window, chunks):
    rng = np.random.default_rng(2)
    n, H, KV, D = sum(chunks), 6, 2, 8
    q = rng.normal(0, 2, (n, H * D)).astype(np.float32)
    k = rng.normal(0, 2, (n, KV * D)).astype(np.float32)
    v = rng.normal(size=(n, KV * D)).astype(np.float32)
    ref = naive_attention(q, k, v, H, KV, 0.3, window, softcap=4.0)
    cache = LayerKVCache(KV, D, max_positions=64, window=window)
    got = run_chunks(q, k, v, cache, chunks, n_heads=H, scale=0.3, window=window, softcap=4.0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert cache.length == n
    if window is not None:
        assert cache.capacity == window  # the ring never holds more than the window
        # a window-blind cache gives a different answer: the window test can fail
        blind = run_chunks(q, k, v, LayerKVCache(KV, D, 64), chunks, n_heads=H, scale=0.3, softcap=4.0)
        assert np.abs(blind - ref).max() > 1e-2


def test_attention_qk_norm_and_rope_are_applied_before_caching():
    rng = np.random.default_rng(3)
    n, H, KV, D = 7, 2, 1, 8
    q, k, v = (rng.normal(size=(n, c * D)).astype(np.float32) for c in (H, KV, KV))
    qn, kn = rng.normal(0, 0.3, D).astype(np.float32), rng.normal(0, 0.3, D).astype(np.float32)
    rope = RopeTable(rope_inv_freq(D, 100.0), 32)
    cos, sin = rope.cos_sin(0, n)
    # what the fused op must compute, spelled out: norm per head, rotate, then plain attention
    qq = apply_rope(rms_norm(q.reshape(n, H, D), qn, 1e-6, "gemma").transpose(1, 0, 2), cos, sin)
    kk = apply_rope(rms_norm(k.reshape(n, KV, D), kn, 1e-6, "gemma").transpose(1, 0, 2), cos, sin)
    ref = naive_attention(qq.transpose(1, 0, 2).reshape(n, -1), kk.transpose(1, 0, 2).reshape(n, -1), v, H, KV, 0.5)
    got = run_chunks(q, k, v, LayerKVCache(KV, D, 32), [3, 1, 3], n_heads=H, scale=0.5, rope=rope,
                     q_norm=qn, k_norm=kn, norm_style="gemma")
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_softmax_is_stable_for_huge_scores():
    D = 4
    k = np.eye(D, dtype=np.float32)[None].repeat(1, 0)[0]  # 4 keys, orthogonal
    v = np.arange(4 * D, dtype=np.float32).reshape(4, D)
    q = np.tile(k[2] * 1e4, (4, 1))
    cache = LayerKVCache(1, D, 8)
    out = attention(q, k, v, cache, n_heads=1, scale=1.0)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[3], v[2])  # all weight on the one matching key


def test_attention_rejects_mismatched_shapes():
    cache = LayerKVCache(2, 8, 16)
    x = np.zeros((3, 16), np.float32)
    with pytest.raises(InputError, match="expected"):
        attention(np.zeros((3, 40), np.float32), x, x, cache, n_heads=4, scale=1.0)
    with pytest.raises(InputError, match="evenly"):
        attention(np.zeros((3, 24), np.float32), x, x, cache, n_heads=3, scale=1.0)
    with pytest.raises(InputError, match="queries"):
        attention(np.zeros((2, 32), np.float32), x, x, cache, n_heads=4, scale=1.0)


# ------------------------------------------------------------------ KV cache
def test_cache_grows_by_doubling_and_reports_bytes():
    c = LayerKVCache(2, 8, max_positions=100)
    caps = []
    for _ in range(100):
        c.append(np.ones((2, 1, 8), np.float32), np.ones((2, 1, 8), np.float32))
        caps.append(c.capacity)
    assert sorted(set(caps)) == [16, 32, 64, 100]
    assert c.nbytes == 2 * 2 * 100 * 8 * 4
    half = LayerKVCache(2, 8, max_positions=100, dtype=np.float16)
    half.append(np.ones((2, 20, 8), np.float32), np.ones((2, 20, 8), np.float32))
    assert half.capacity == 20 and half.nbytes == 2 * 2 * 20 * 8 * 2  # a prefill reserves what it needs
    ring = LayerKVCache(2, 8, max_positions=100, window=24)
    for _ in range(60):
        ring.append(np.ones((2, 1, 8), np.float32), np.ones((2, 1, 8), np.float32))
    assert ring.capacity == 24 and ring.length == 60
    whole = KVCache([None, 24], 2, 8, 100)
    assert whole.nbytes == 0 and whole.length == 0


def test_cache_full_and_bad_input_are_one_clear_error():
    c = LayerKVCache(1, 4, max_positions=5)
    c.append(np.zeros((1, 5, 4), np.float32), np.zeros((1, 5, 4), np.float32))
    with pytest.raises(InputError, match="context is full"):
        c.append(np.zeros((1, 1, 4), np.float32), np.zeros((1, 1, 4), np.float32))
    with pytest.raises(InputError, match="shape"):
        LayerKVCache(1, 4, 5).append(np.zeros((2, 1, 4), np.float32), np.zeros((2, 1, 4), np.float32))
    with pytest.raises(InputError, match="float32, float16 or int8"):
        LayerKVCache(1, 4, 5, dtype=np.int16)
    with pytest.raises(InputError, match="positive"):
        LayerKVCache(1, 4, 5, window=0)
    c.reset()
    assert c.length == 0 and c.nbytes == 0


def test_float16_cache_is_close_to_float32():
    rng = np.random.default_rng(4)
    n, H, KV, D = 20, 4, 2, 16
    q, k, v = (rng.normal(size=(n, c * D)).astype(np.float32) for c in (H, KV, KV))
    kw = dict(n_heads=H, scale=D ** -0.5, window=6)
    a = run_chunks(q, k, v, LayerKVCache(KV, D, 32, 6), [8, 1, 11], **kw)
    b = run_chunks(q, k, v, LayerKVCache(KV, D, 32, 6, np.float16), [8, 1, 11], **kw)
    assert 0 < np.abs(a - b).max() < 5e-3
