"""runtime/sparse_attention.py through the attention kernel and a compiled tiny Gemma 3: each policy
against a per-query float64 reference that spells the selection out, equality with dense when the
budget covers every key, eviction bounds, fewer KV bytes read, and one-line errors for bad options."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nadoo.runtime.lm_kernels as K  # noqa: E402
from nadoo.runtime.errors import InputError  # noqa: E402
from nadoo.runtime.kv_cache import LayerKVCache, SequenceState  # noqa: E402
from nadoo.runtime.lm_kernels import attention  # noqa: E402
from nadoo.runtime.sparse_attention import AttentionPolicy  # noqa: E402

N, H, KV, D = 40, 4, 2, 8
SCALE = 0.4
B, S, W, P = 16, 2, 4, 4  # budget, sinks, window, page


def data(seed=0, n=N):
    rng = np.random.default_rng(seed)
    q = rng.normal(0, 2, (n, H * D)).astype(np.float32)
    k = rng.normal(0, 2, (n, KV * D)).astype(np.float32)
    v = rng.normal(size=(n, KV * D)).astype(np.float32)
    return q, k, v


def cache_for(pol, window=None, dtype=np.float32):
    """The cache a session would make for a layer (SequenceState.layer)."""
    st = SequenceState(dtype=dtype, attention=pol)
    return st.layer("l", KV, D, 256, window)


def run(pol, chunks, seed=0, window=None, dtype=np.float32):
    q, k, v = data(seed, sum(chunks))
    cache = cache_for(pol, window, dtype)
    outs, at = [], 0
    for c in chunks:
        outs.append(attention(q[at:at + c], k[at:at + c], v[at:at + c], cache, n_heads=H, scale=SCALE,
                              window=window, sparse=pol))
        at += c
    return np.concatenate(outs), cache


# ------------------------------------------------------------------ a reference that spells selections out
def _probs(qh, keys):
    s = keys @ qh * SCALE
    e = np.exp(s - s.max())
    return e / e.sum()


C = 16  # pages with candidates: keys the bound's pages offer beyond sinks and window (sparq: its first stage)
R = 3  # sparq: coordinates of each key its first stage reads


def reference(kind, n=N, seed=0, window=None, candidates=None):
    """Per query, per KV head: the keys the policy selects, then plain float64 attention over them."""
    q, k, v = data(seed, n)
    g = H // KV
    q = q.reshape(n, H, D).astype(np.float64)
    k = k.reshape(n, KV, D).astype(np.float64)
    v = v.reshape(n, KV, D).astype(np.float64)
    out = np.zeros((n, H, D))
    kept = [set() for _ in range(KV)]  # heavy: the cache's positions
    acc = [dict() for _ in range(KV)]
    for p in range(n):
        for h in range(KV):
            heads = range(h * g, (h + 1) * g)
            vis = [j for j in range(p + 1) if window is None or j > p - window]
            if kind == "heavy":
                kept[h].add(p)
                vis = sorted(kept[h])
            sel = vis
            if len(vis) > B and kind == "window":
                sel = [j for j in vis if j < S or j > p - W]
            elif len(vis) > B and kind == "oracle":
                mass = sum(_probs(q[p, hh], k[vis, h]) for hh in heads)
                sel = sorted(np.array(vis)[np.argsort(-mass)[:B]].tolist())
            elif len(vis) > B and kind == "sparq":
                base = {j for j in vis if j < S or j > p - W}
                idx = np.argsort(-sum(np.abs(q[p, hh]) for hh in heads))[:R]  # the group's largest |q|
                est = 0
                for hh in heads:
                    tau = np.sqrt(np.abs(q[p, hh, idx]).sum() / np.abs(q[p, hh]).sum())
                    est = est + _probs(q[p, hh, idx] / tau, k[vis][:, h, idx])
                rest = sorted((j for j in vis if j not in base), key=lambda j: -est[vis.index(j)])
                sel = sorted(base | set(rest[:C]))
                mass = sum(_probs(q[p, hh], k[sel, h]) for hh in heads)
                rest = sorted((j for j in sel if j not in base), key=lambda j: -mass[sel.index(j)])
                sel = sorted(base | set(rest[:B - S - W]))
            elif len(vis) > B and kind == "pages":
                base = {j for j in vis if j < S or j > p - W}
                bounds = {}  # page -> each head's scaled Quest bound
                for pg in range(p // P + 1):
                    first, last = pg * P, pg * P + P - 1
                    if first > p - W or last < S:
                        continue
                    keys = k[first:min(last, p) + 1, h]
                    lo, hi = keys.min(0), keys.max(0)
                    bounds[pg] = np.array([np.maximum(q[p, hh] * lo, q[p, hh] * hi).sum() * SCALE for hh in heads])
                # a page's score: the softmax weights its bound gets from each head, summed over the heads
                best = np.max(list(bounds.values()), axis=0)
                scores = {pg: np.exp(b - best).sum() for pg, b in bounds.items()}
                top = sorted(scores, key=lambda pg: -scores[pg])[:(candidates or B - S - W) // P]
                sel = sorted(base | {j for j in vis if j // P in top})
                if candidates:  # the candidates' exact weights (each head's softmax over them, summed) choose
                    mass = sum(_probs(q[p, hh], k[sel, h]) for hh in heads)
                    rest = sorted((j for j in sel if j not in base), key=lambda j: -mass[sel.index(j)])
                    sel = sorted(base | set(rest[:B - S - W]))
            for hh in heads:
                pr = _probs(q[p, hh], k[sel, h])
                out[p, hh] = pr @ v[sel, h]
                if kind == "heavy":
                    for j, x in zip(sel, pr):
                        acc[h][j] = acc[h].get(j, 0.0) + x
        if kind == "heavy" and len(kept[0]) >= B:
            # one position set for all KV heads, ranked by the attention summed over them
            nxt = p + 1
            keep = {j for j in kept[0] if j < S or j > nxt - W}
            rest = sorted(set(kept[0]) - keep, key=lambda j: -sum(a.get(j, 0.0) for a in acc))
            keep |= set(rest[:B - 1 - len(keep)])
            kept = [set(keep) for _ in range(KV)]
    return out.reshape(n, H * D)


@pytest.mark.parametrize("kind", ["window", "pages", "oracle"])
@pytest.mark.parametrize("chunks", [[N], [17] + [1] * 23, [1] * N])
def test_policy_equals_its_reference(kind, chunks):
    pol = AttentionPolicy(kind, B, **({"sink": S, "window": W} if kind != "oracle" else {}),
                          **({"page": P} if kind == "pages" else {}))
    got, _ = run(pol, chunks)
    np.testing.assert_allclose(got, reference(kind), rtol=1e-5, atol=1e-5)
    dense, _ = run(AttentionPolicy(), chunks)
    assert np.abs(got - dense).max() > 1e-2  # the budget really cut something


@pytest.mark.parametrize("chunks", [[N], [17] + [1] * 23, [1] * N])
def test_pages_with_candidates_equal_the_reference_and_read_their_keys(chunks):
    pol = AttentionPolicy("pages", B, sink=S, window=W, page=P, candidates=C)
    got, cache = run(pol, chunks)
    np.testing.assert_allclose(got, reference("pages", candidates=C), rtol=1e-5, atol=1e-5)
    plain, pcache = run(AttentionPolicy("pages", B, sink=S, window=W, page=P), chunks)
    assert np.abs(got - plain).max() > 1e-3  # the exact scores chose other keys than the bound's pages
    # the same bounds scored and values read, plus the keys of the candidates not attended (half a key each)
    assert cache.bytes_read > pcache.bytes_read


@pytest.mark.parametrize("chunks", [[N], [17] + [1] * 23, [1] * N])
def test_sparq_equals_its_reference(chunks):
    pol = AttentionPolicy("sparq", B, sink=S, window=W, candidates=C, components=R)
    got, cache = run(pol, chunks)
    np.testing.assert_allclose(got, reference("sparq"), rtol=1e-5, atol=1e-5)
    dense, dcache = run(AttentionPolicy(), chunks)
    assert np.abs(got - dense).max() > 1e-2


@pytest.mark.parametrize("dtype", [np.float16, np.int8])
@pytest.mark.parametrize("kind", ["pages", "sparq"])
def test_two_stage_prefill_equals_decoding_on_compact_caches(kind, dtype):
    # a prefill scores decoded keys; a decode step gathers the stored ones (and int8 scales): same choice
    pol = AttentionPolicy(kind, B, sink=S, window=W, candidates=C, **({"page": P} if kind == "pages" else
                                                                      {"components": R}))
    (x, c1), (y, c2) = run(pol, [N], dtype=dtype), run(pol, [1] * N, dtype=dtype)
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    assert c1.bytes_read == c2.bytes_read


def test_heavy_hitters_decoded_token_by_token_equal_the_reference():
    pol = AttentionPolicy("heavy", B, sink=S, window=W)
    got, cache = run(pol, [1] * N)
    np.testing.assert_allclose(got, reference("heavy"), rtol=1e-5, atol=1e-5)
    assert cache.filled == B - 1 and cache.length == N
    held = set(cache.slot_positions.tolist())
    assert set(range(S)) <= held and set(range(N - W + 1, N)) <= held  # sinks and the recent window stay


@pytest.mark.parametrize("kind", ["window", "pages", "sparq", "heavy", "oracle"])
@pytest.mark.parametrize("chunks", [[N], [9, 1, 1, 20, 1, 8], [1] * N])
@pytest.mark.parametrize("window", [None, 6])
def test_every_policy_is_dense_when_the_budget_covers_every_key(kind, chunks, window):
    dense, dcache = run(AttentionPolicy(), chunks, window=window)
    got, cache = run(AttentionPolicy(kind, N, scope="all"), chunks, window=window)
    np.testing.assert_allclose(got, dense, rtol=1e-6, atol=1e-6)
    assert cache.bytes_read == dcache.bytes_read
    if kind == "pages":
        got, cache = run(AttentionPolicy(kind, N, scope="all", candidates=N), chunks, window=window)
        np.testing.assert_allclose(got, dense, rtol=1e-6, atol=1e-6)
        assert cache.bytes_read == dcache.bytes_read


def test_prefill_in_row_blocks_equals_one_block(monkeypatch):
    pols = [AttentionPolicy(), AttentionPolicy("window", B), AttentionPolicy("pages", B, page=P),
            AttentionPolicy("pages", B, sink=S, window=W, page=P, candidates=C),
            AttentionPolicy("sparq", B, sink=S, window=W, candidates=C, components=R),
            AttentionPolicy("oracle", B)]
    whole = [run(pol, [N])[0] for pol in pols]
    monkeypatch.setattr(K, "_ROW_BLOCK", 3)
    for pol, ref in zip(pols, whole):
        # float32 sums in another order: a few ulps apart
        np.testing.assert_allclose(run(pol, [N])[0], ref, rtol=1e-5, atol=1e-5)


def test_native_window_under_scope_all_selects_inside_the_window():
    pol = AttentionPolicy("window", 5, sink=1, window=4, scope="all")
    got, cache = run(pol, [30], window=8)
    ref, _ = run(AttentionPolicy("window", 5, sink=1, window=4), [30])  # the same selection on a global layer
    assert cache.ring
    # positions older than the native window are out of reach, so only the sink differs once it leaves the ring
    np.testing.assert_allclose(got[:8], ref[:8], rtol=1e-6, atol=1e-6)
    glob, _ = run(AttentionPolicy("window", 5, sink=1, window=4), [30], window=8)  # scope global: exact
    np.testing.assert_allclose(glob, run(AttentionPolicy(), [30], window=8)[0], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ bounds and bytes
def test_evicting_policies_bound_the_cache_and_pages_read_less():
    n = 200
    dense, dc = run(AttentionPolicy(), [60] + [1] * (n - 60))
    for kind in ("window", "heavy"):
        _, c = run(AttentionPolicy(kind, B), [60] + [1] * (n - 60))
        assert c.filled == B - 1 and c.capacity <= 2 * 16 and c.nbytes < dc.nbytes / 4
        assert c.bytes_read < dc.bytes_read / 4
    _, pc = run(AttentionPolicy("pages", B, page=P), [60] + [1] * (n - 60))
    assert pc.filled == n  # nothing evicted
    assert pc.bytes_read < dc.bytes_read / 2


def test_int8_and_float16_caches_are_close_and_smaller():
    ref, c32 = run(AttentionPolicy(), [20, 1, 1, 18])
    for dt, tol, ratio in ((np.float16, 5e-3, 0.5), (np.int8, 0.15, 0.25 + 8 / (2 * D * 4))):
        got, c = run(AttentionPolicy(), [20, 1, 1, 18], dtype=dt)
        assert 0 < np.abs(got - ref).max() < tol
        assert c.nbytes == pytest.approx(c32.nbytes * ratio)
    # policies run on quantized caches too (eviction moves the scales with their keys)
    got, c = run(AttentionPolicy("heavy", B, kv_dtype="int8"), [1] * N, dtype=np.int8)
    exact, _ = run(AttentionPolicy("heavy", B), [1] * N)
    assert np.abs(got - exact).max() < 0.3 and c.filled == B - 1


@pytest.mark.parametrize("dtype", [np.float16, np.int8])
def test_quantized_ring_hands_back_old_and_new_keys(dtype):
    # a prefill chunk into a wrapped ring returns stored (encoded) old keys followed by the new ones
    ref, _ = run(AttentionPolicy(), [9, 1, 20, 1, 9], window=6)
    got, c = run(AttentionPolicy(), [9, 1, 20, 1, 9], window=6, dtype=dtype)
    assert c.ring and c.capacity == 6
    assert 0 < np.abs(got - ref).max() < (5e-3 if dtype == np.float16 else 0.15)


def test_quest_bound_is_an_upper_bound():
    from nadoo.runtime.sparse_attention import page_bounds

    rng = np.random.default_rng(5)
    keys = rng.normal(size=(1, 37, 8)).astype(np.float32)
    lo, hi = page_bounds(keys, np.arange(37), 5, 8)
    q = rng.normal(size=8).astype(np.float32)
    for pg in range(8):
        real = (keys[0, pg * 5:pg * 5 + 5] @ q).max()
        assert np.maximum(q * lo[0, pg], q * hi[0, pg]).sum() >= real - 1e-5



def test_outward_rounding_keeps_bounds():
    from nadoo.runtime.sparse_attention import round_outward

    rng = np.random.default_rng(3)
    a = np.concatenate([rng.normal(scale=s, size=4000) for s in (1e-3, 1, 300)]).astype(np.float32)
    a = np.concatenate([a, a.astype(np.float16).astype(np.float32), [0.0, np.inf, -np.inf]]).astype(np.float32)
    f16 = np.dtype(np.float16)
    lo, hi = round_outward(a, f16, -np.inf), round_outward(a, f16, np.inf)
    assert lo.dtype == hi.dtype == f16
    assert (lo.astype(np.float32) <= a).all() and (hi.astype(np.float32) >= a).all()
    exact = a.astype(np.float16).astype(np.float32) == a  # representable values stay as they are
    assert (lo[exact] == a[exact]).all() and (hi[exact] == a[exact]).all()
    fin = np.isfinite(a)
    gap = (hi[fin].astype(np.float32) - lo[fin].astype(np.float32))
    assert (gap <= 2 * np.abs(np.spacing(hi[fin]).astype(np.float32))).all()  # one step of float16 at most


def test_half_precision_cache_keeps_float16_page_bounds_that_bound_its_keys():
    pol = AttentionPolicy("pages", B, page=P, kv_dtype="float16")
    got, c = run(pol, [60] + [1] * 40, dtype=np.float16)
    _, c32 = run(AttentionPolicy("pages", B, page=P), [60] + [1] * 40)
    assert c.page_lo.dtype == np.float16 and c32.page_lo.dtype == np.float32
    _, k, _ = data(0, 100)
    keys = k.reshape(100, KV, D).transpose(1, 0, 2)
    for pg in range(c.n_pages):
        blk = keys[:, pg * P:(pg + 1) * P]
        assert (c.page_lo[:, pg].astype(np.float32) <= blk.min(1)).all()
        assert (c.page_hi[:, pg].astype(np.float32) >= blk.max(1)).all()
    # float16 keys and bounds: the bounds cost half, so the cache reads less than its float32 twin
    assert c.bytes_read < c32.bytes_read


# ------------------------------------------------------------------ options
@pytest.mark.parametrize("kw,match", [
    (dict(kind="sparse"), "unknown --attention"),
    (dict(budget=8), "needs a sparse --attention"),
    (dict(kind="window"), "needs --kv-budget"),
    (dict(kind="window", budget=0), "kv-budget must be an integer >= 1"),
    (dict(kind="window", budget=8, sink=8), "must leave room"),
    (dict(kind="heavy", budget=8, page=4), "--page applies to --attention pages"),
    (dict(kind="oracle", budget=8, sink=2), "do not apply"),
    (dict(kind="pages", budget=64, page=16, window=8), "window >= --page"),
    (dict(kind="window", budget=8, candidates=8), "--candidates applies to --attention pages or sparq"),
    (dict(kind="pages", budget=64, components=8), "--components applies to --attention sparq"),
    (dict(kind="sparq", budget=64, candidates=8), "at least the keys it chooses from"),
    (dict(kind="pages", budget=64, page=4, window=8, sink=4, candidates=40), "at least the keys it chooses from"),
    (dict(kind="window", budget=8, window=True), "must be an integer"),
    (dict(scope="some"), "attention-scope"),
    (dict(kv_dtype="int4"), "kv-dtype"),
])
def test_bad_options_are_one_clear_error(kw, match):
    with pytest.raises(InputError, match=match):
        AttentionPolicy(**kw)


def test_heavy_refuses_a_ring_smaller_than_its_budget():
    with pytest.raises(InputError, match="ring"):
        run(AttentionPolicy("heavy", 4, sink=1, window=2, scope="all"), [10], window=6)


# ------------------------------------------------------------------ through a compiled model
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from lm_fixtures import tiny_model, tiny_tokenizer_json

    from nadoo.compiler.lm_compile import compile_lm
    from nadoo.compiler.pipeline import CompileOptions

    d = tmp_path_factory.mktemp("sattn")
    model = tiny_model("gemma3", vocab=400, max_position_embeddings=128)
    model.save_pretrained(d / "hf")
    (d / "hf" / "tokenizer.json").write_text(tiny_tokenizer_json(400))
    (d / "hf" / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    out = d / "g.ndc"
    compile_lm(d / "hf", out, CompileOptions(keep_float=True), quiet=True)
    return out


def sess(path, **attn):
    import nadoo.runtime as nd

    return nd.Session(path, policy=nd.Policy(bits="float", attention=attn or None))


PROMPT = np.random.default_rng(0).integers(4, 400, 70).tolist()


def test_session_policies_match_dense_with_a_covering_budget_and_differ_without(bundle):
    from nadoo.runtime.generate import perplexity

    with sess(bundle) as s:
        dense = s.generate(prompt_ids=PROMPT, max_new_tokens=8, stop_at_eos=False)
        dppl = perplexity(s, ids=PROMPT * 2, context=100)
    for kind in ("window", "pages", "sparq", "heavy", "oracle"):
        with sess(bundle, kind=kind, budget=128) as s:
            r = s.generate(prompt_ids=PROMPT, max_new_tokens=8, stop_at_eos=False)
            assert r.token_ids == dense.token_ids
            assert r.stats["kv_bytes_read_per_token"] == dense.stats["kv_bytes_read_per_token"]
            assert perplexity(s, ids=PROMPT * 2, context=100)["perplexity"] == pytest.approx(dppl["perplexity"], 1e-5)
        # sparq: 2 of the tiny model's head coordinates (its default 16 would be whole keys here)
        extra = {"pages": {"page": 2}, "sparq": {"components": 2, "candidates": 24}}.get(kind, {})
        with sess(bundle, kind=kind, budget=24, **extra) as s:
            r = s.generate(prompt_ids=PROMPT, max_new_tokens=8, stop_at_eos=False)
            p = perplexity(s, ids=PROMPT * 2, context=100)
            assert p["perplexity"] != pytest.approx(dppl["perplexity"], 1e-3)
            assert r.stats["kv_bytes_read_per_token"] < dense.stats["kv_bytes_read_per_token"]
            assert p["kv_bytes_read_per_token"] < dppl["kv_bytes_read_per_token"]
            assert r.stats["attention_s_per_token"] > 0
            if kind in ("window", "heavy"):
                assert r.stats["kv_cache_bytes"] < dense.stats["kv_cache_bytes"]
            assert r.stats["policy"]["attention"]["kind"] == kind


def cli(*args):
    return subprocess.run([sys.executable, "-m", "nadoo.runtime.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_cli_generate_json_reports_kv_and_bad_options_are_one_line(bundle):
    ids = ",".join(map(str, PROMPT[:40]))
    r = cli("generate", bundle, "--prompt-ids", ids, "--max-new-tokens", "3", "--no-eos", "--bits", "float",
            "--attention", "pages", "--kv-budget", "16", "--page", "2", "--kv-dtype", "float16", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("kv_bytes_read_per_token", "kv_cache_bytes", "attention_s_per_token"):
        assert out[key] > 0
    for bad in (["--kv-budget", "8"], ["--attention", "window"], ["--attention", "window", "--kv-budget", "4", "--sink", "4"],
                ["--attention", "heavy", "--kv-budget", "8", "--page", "4"], ["--kv-dtype", "int4"]):
        r = cli("generate", bundle, "--prompt-ids", ids, "--bits", "float", *bad)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("nadoo: error:"), (bad, r.stderr)
