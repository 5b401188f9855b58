"""Tests of the activation-aware grouped quantizer (compiler side), on the grid of both codecs."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nadoo.compiler.quantize import quantize, quantize_payload
from nadoo.runtime.errors import CompileError
from nadoo.runtime.tiers import CODECS

TIER = {8: "q8", 4: "q4", 2: "q2"}


def layout(bits, codec):
    return CODECS[codec][TIER[bits]]


def payload_decode(p, R, K, G, bits, codec):
    return layout(bits, codec).decode(TIER[bits], [p], R, K, G)


def decode(codes, scales, params, G, codec):
    """(w^, scale, lowest decodable value) per weight: s·q + min, or s·(q − z) with lowest −z·s."""
    K = codes.shape[1]
    s = np.repeat(scales.astype(np.float32), G, axis=1)[:, :K]
    p = np.repeat(params.astype(np.float32), G, axis=1)[:, :K]
    q = codes.astype(np.float32)
    if codec == "zp":
        assert params.dtype == np.uint8
        return (q - p) * s, s, -p * s
    assert params.dtype == np.float16
    return s * q + p, s, p


def weighted_err(w, wh, imp):
    return float((((w - wh).astype(np.float64) ** 2) * imp[None, :]).sum())


@st.composite
def problems(draw):
    rows = draw(st.integers(1, 12))
    K = draw(st.integers(1, 100))
    codec = draw(st.sampled_from(sorted(CODECS)))
    G = layout(8, codec).group(K, draw(st.sampled_from([16, 32, 64] if codec == "zp" else [4, 16, 32, 64])))
    bits = draw(st.sampled_from([8, 4, 2]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([1e-4, 0.05, 1.0, 300.0]))
    kind = draw(st.sampled_from(["normal", "laplace", "outlier"]))
    if kind == "normal":
        w = rng.standard_normal((rows, K))
    elif kind == "laplace":
        w = rng.laplace(size=(rows, K)) + draw(st.floats(-2, 2))
    else:
        w = rng.standard_normal((rows, K))
        w.flat[rng.integers(0, w.size)] *= 30
    imp = rng.gamma(0.5, 1.0, K) if draw(st.booleans()) else None
    return (w * scale).astype(np.float32), bits, G, imp, codec


@settings(max_examples=150, deadline=None)
@given(problems())
def test_error_bound_half_step_plus_clipping(pb):
    """Every decoded weight is within half a step of w, plus how far w lies outside its group's
    decodable range [lo, lo + qmax*scale] (clipping); lo = min, or -z*scale."""
    w, bits, G, imp, codec = pb
    for method in ("rtn", "search"):
        codes, scales, params = quantize(w, bits, G, imp, method=method, codec=codec)
        assert codes.dtype == np.uint8 and codes.shape == w.shape and codes.max() < (1 << bits)
        wh, s, m = decode(codes, scales, params, G, codec)
        p = layout(bits, codec).pack(codes, scales, params, G)[0]
        assert np.array_equal(payload_decode(p, *w.shape, G, bits, codec), wh)  # what the quantizer assumed
        qmax = (1 << bits) - 1
        clip = np.maximum(0, np.maximum(m - w, w - (m + qmax * s)))
        slop = 1e-5 * (np.abs(w) + np.abs(m) + qmax * s) + 1e-30
        assert np.all(np.abs(w - wh) <= s / 2 + clip + slop)
        if method == "rtn":
            # plain RTN covers every group: no clipping at all
            assert np.all(np.abs(w - wh) <= s / 2 + slop)


@settings(max_examples=150, deadline=None)
@given(problems())
def test_search_never_worse_than_rtn(pb):
    w, bits, G, imp, codec = pb
    impv = np.ones(w.shape[1]) if imp is None else imp
    e = {}
    for method in ("rtn", "search"):
        codes, scales, params = quantize(w, bits, G, imp, method=method, codec=codec)
        e[method] = weighted_err(w, decode(codes, scales, params, G, codec)[0], impv / impv.mean() + 0.01
                                 if imp is not None else impv)
    assert e["search"] <= e["rtn"] * (1 + 1e-6) + 1e-30


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_8bit_rtn_half_step(codec):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 200)) * 0.03).astype(np.float32)
    codes, scales, params = quantize(w, 8, 64, method="rtn", codec=codec)
    wh, s, _ = decode(codes, scales, params, 64, codec)
    assert np.all(np.abs(w - wh) <= s / 2 * (1 + 1e-3) + 1e-9)


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("w", [
    np.zeros((3, 70), np.float32),
    np.full((3, 70), 0.1234567, np.float32),
    np.full((2, 64), -65504.0, np.float32),
    np.full((2, 64), 65504.0, np.float32),
    np.array([[65504.0, -65504.0] * 32], np.float32),
    np.array([[1e-30, -1e-30, 0.0, 5e-8] * 16], np.float32),
    np.array([[1.0] * 63 + [1.0 + 1e-7]], np.float32),
    np.array([[3.0, 3.0, 3.0, 3.0, 3.0000002]], np.float32),
])
def test_degenerate_groups_are_finite(codec, bits, w):
    G = layout(bits, codec).group(w.shape[1], 64)
    payload, err = quantize_payload(w, bits, G, None, codec=codec)
    wh = payload_decode(payload, *w.shape, G, bits, codec)
    assert np.isfinite(wh).all()
    assert np.isfinite(err["mse"]) and np.isfinite(err["out_err"])
    # constant groups are reproduced to within float16 rounding of their value
    if np.ptp(w) == 0:
        assert np.allclose(wh, w, rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_zero_importance_channels_still_finite_and_sane(codec):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 128)).astype(np.float32)
    imp = np.zeros(128, np.float32)
    imp[:5] = 1.0
    p, e = quantize_payload(w, 4, 64, imp, codec=codec)
    wh = payload_decode(p, 16, 128, 64, 4, codec)
    assert np.isfinite(wh).all()
    assert np.abs(w - wh).max() < 1.0           # unimportant channels are still quantized sensibly
    p, e = quantize_payload(w, 4, 64, np.zeros(128, np.float32), codec=codec)   # all-zero importance = uniform
    assert np.isfinite(e["mse"])


@pytest.mark.parametrize("bad", [np.array([[np.nan, 1.0]], np.float32),
                                 np.array([[np.inf, 1.0]], np.float32),
                                 np.array([[70000.0, 1.0]], np.float32)])
def test_bad_weights_raise(bad):
    with pytest.raises(CompileError):
        quantize(bad, 4, 2)


def test_bad_args_raise():
    w = np.ones((2, 4), np.float32)
    with pytest.raises(CompileError):
        quantize(w, 7, 4)
    with pytest.raises(CompileError):
        quantize(w, 3, 4, codec="minmax")  # the legacy codec has no 3-bit tier
    with pytest.raises(CompileError):
        quantize(w, 4, 0)
    with pytest.raises(CompileError):
        quantize(w, 4, 4, importance=np.ones(3))
    with pytest.raises(CompileError):
        quantize(w, 4, 4, importance=-np.ones(4))
    with pytest.raises(CompileError):
        quantize(w, 4, 4, codec="nf4")


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_out_err_monotone_in_bits(codec):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((96, 300)).astype(np.float32)
    for imp in (None, rng.gamma(0.5, 1.0, 300).astype(np.float32)):
        errs = [quantize_payload(w, b, 64, imp, codec=codec)[1]["out_err"] for b in (8, 4, 2)]
        assert 0 < errs[0] < errs[1] < errs[2] < 1


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_payload_matches_codec_and_error_definitions(codec):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((10, 77)).astype(np.float32)
    imp = rng.random(77).astype(np.float32)
    p, e = quantize_payload(w, 4, 32, imp, codec=codec)
    assert [len(p)] == layout(4, codec).payload_sizes(10, 77, 32)
    wh = payload_decode(p, 10, 77, 32, 4, codec)
    d2 = (w.astype(np.float64) - wh) ** 2
    assert e["mse"] == pytest.approx(d2.mean(), rel=1e-9)
    assert e["out_err"] == pytest.approx((d2.sum(0) @ imp) / ((w.astype(np.float64) ** 2).sum(0) @ imp),
                                         rel=1e-9)
    codes, scales, params = quantize(w, 4, 32, imp, codec=codec)
    assert [p] == layout(4, codec).pack(codes, scales, params, 32)   # deterministic


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_importance_helps_weighted_error(codec):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((128, 256)).astype(np.float32)
    imp = rng.gamma(0.3, 1.0, 256).astype(np.float32)
    e_u = quantize_payload(w, 2, 64, None, codec=codec)[1]
    e_a = quantize_payload(w, 2, 64, imp, codec=codec)[1]
    # out_err of the uniform run is reported with uniform weights; recompute it weighted
    p_u, _ = quantize_payload(w, 2, 64, None, codec=codec)
    wh = payload_decode(p_u, 128, 256, 64, 2, codec)
    d2 = ((w - wh).astype(np.float64) ** 2).sum(0)
    weighted_u = (d2 @ imp) / ((w.astype(np.float64) ** 2).sum(0) @ imp)
    assert e_a["out_err"] < weighted_u
    assert e_u["out_err"] > 0


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_threads_give_identical_result(codec):
    rng = np.random.default_rng(6)
    w = rng.standard_normal((3000, 96)).astype(np.float32)
    imp = rng.random(96).astype(np.float32)
    a = quantize(w, 2, 32, imp, codec=codec)
    b = quantize(w, 2, 32, imp, threads=2, codec=codec)
    for x, y in zip(a, b):
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8))
