"""GPTQ error feedback: same payload layout, lower output error than the search alone on correlated inputs."""
import numpy as np

import pytest

from nadoo.compiler.quantize import gptq_factor, quantize, quantize_chunks, quantize_rows_gptq
from nadoo.runtime.tiers import CODECS

TIER = {8: "q8", 4: "q4", 2: "q2"}


def _roundtrip(codes, s, p, G, bits, codec):
    """Pack with the codec's layout and decode what the runtime reads."""
    layout = CODECS[codec][TIER[bits]]
    payload = layout.pack(codes, s, p, G)[0]
    assert [len(payload)] == layout.payload_sizes(*codes.shape, G)
    return layout.decode(TIER[bits], [payload], *codes.shape, G), payload


def _data(seed=0, R=48, K=128, N=2000):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(K, K)) * 0.3 + np.eye(K)
    X = (rng.normal(size=(N, 16)) @ rng.normal(size=(16, K)) + 0.3 * rng.normal(size=(N, K))) @ mix
    W = rng.normal(size=(R, K)).astype(np.float32)
    return W, X.astype(np.float32)


def _out_err(W, Wh, X):
    return float(np.sum((X @ (W - Wh).T) ** 2) / np.sum((X @ W.T) ** 2))


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_gptq_beats_search_on_output_error_and_keeps_layout(codec):
    W, X = _data()
    H = X.T.astype(np.float64) @ X / len(X)
    imp = np.diag(H).astype(np.float32)
    for bits in (4, 2):
        errs = {}
        for name, kw in (("search", {}), ("gptq", {"hessian": H})):
            codes, s, m = quantize(W, bits, 32, imp, codec=codec, **kw)
            errs[name] = _out_err(W, _roundtrip(codes, s, m, 32, bits, codec)[0], X)
        assert errs["gptq"] < 0.8 * errs["search"], (bits, errs)


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_act_order_and_chunks_are_consistent(codec):
    W, X = _data(1)
    H = X.T.astype(np.float64) @ X / len(X)
    whole = quantize(W, 4, 32, None, hessian=H, codec=codec)
    parts = quantize_chunks(W, [0, 16, 48], 4, 32, None, hessian=H, codec=codec)
    # rows are independent given H: chunking the rows changes nothing
    assert parts[0][0] == _roundtrip(whole[0][:16], whole[1][:16], whole[2][:16], 32, 4, codec)[1]
    codes, s, m = quantize(W, 4, 32, None, hessian=H, act_order=True, codec=codec)
    assert codes.shape == W.shape and s.shape == (48, 4)
    U = gptq_factor(H)
    assert np.allclose(U.T.astype(np.float64) @ U, np.linalg.inv(H + 0.1 * np.mean(np.diag(H)) * np.eye(128)),
                       rtol=1e-3, atol=1e-3 * np.abs(np.linalg.inv(H)).max())


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_rows_gptq_for_transposed_weights(codec):
    W, X = _data(2, R=40, K=96)
    H = X.T.astype(np.float64) @ X / len(X)
    Wt = np.ascontiguousarray(W.T)                      # [K inputs, R outputs], groups along outputs
    errs = {}
    for name in ("plain", "gptq"):
        if name == "gptq":
            codes, s, m = quantize_rows_gptq(Wt, 4, 16, H, codec=codec)
        else:
            codes, s, m = quantize(Wt, 4, 16, None, codec=codec)
        Wh = _roundtrip(codes, s, m, 16, 4, codec)[0].T
        errs[name] = _out_err(W, Wh, X)
    assert errs["gptq"] < 0.8 * errs["plain"], errs


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_dead_input_channels_do_not_break_gptq(codec):
    W, X = _data(3, K=64)
    X[:, :5] = 0
    H = X.T.astype(np.float64) @ X / len(X)
    codes, s, m = quantize(W, 2, 32, np.diag(H), hessian=H, codec=codec)
    assert np.isfinite(s.astype(np.float32)).all() and codes.max() <= 3
