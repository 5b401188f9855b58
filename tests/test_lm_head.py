"""The LM head routed by vocabulary chunk (compiler/lm_head.py, runtime/chunked/lm_head.py) on tiny
random Gemma 3 / Qwen2 models: greedy tokens under --lm-head topk equal the dense head's at every
tier, also when the first chunks miss the argmax (the certification reads more); the logits it
computes are the dense ones and the rest -inf; sampling leaves out at most epsilon of the mass; the
embedding tied to the reordered head still looks up the right rows; stats keys; one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

pytest.importorskip("torch")
pytest.importorskip("transformers")

from lm_fixtures import tiny_model, transformers_greedy  # noqa: E402

import nadoo.runtime as nd  # noqa: E402
from nadoo.compiler.lm_compile import compile_lm  # noqa: E402
from nadoo.compiler.lm_head import bisection_order  # noqa: E402
from nadoo.compiler.pipeline import CompileOptions  # noqa: E402
from nadoo.runtime.chunked.gather import checked_row_map  # noqa: E402
from nadoo.runtime.chunked.lm_head import sampling  # noqa: E402
from nadoo.runtime.errors import BundleError, InputError  # noqa: E402
from nadoo.runtime.generate import LanguageModel, perplexity  # noqa: E402

VOCAB = 512
ROWS = 16  # rows per vocabulary chunk: 32 chunks
PROMPTS = [np.random.default_rng(s).integers(4, VOCAB, 6).tolist() for s in range(4)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family -> (model, bundle): float kept, chunks of 16 vocabulary rows, no tokenizer. A random
    model's hidden states fill all their dimensions (a real model's do not): the basis is full, and
    the staged bound (a third, two thirds, all of it) still has something to prune."""
    out = {}
    for fam in ("gemma3", "qwen2"):
        d = tmp_path_factory.mktemp(fam)
        model = tiny_model(fam, vocab=VOCAB)
        model.save_pretrained(d / "hf")
        compile_lm(d / "hf", d / f"{fam}.ndc", CompileOptions(keep_float=True, embedding_rows=ROWS,
                                                                         lm_head_sketch=1.0), quiet=True)
        out[fam] = (model, d / f"{fam}.ndc")
    return out


def tokens(bundle, bits, prompt, new=12, **head):
    with nd.Session(bundle, policy=nd.Policy(bits=bits, **head)) as s:
        r = s.generate(prompt_ids=prompt, max_new_tokens=new, stop_at_eos=False)
    return r.token_ids, r.stats


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_float_dense_head_equals_transformers(built, family):
    """The reordered head (and, for Gemma, the embedding tied to it) computes the source model."""
    model, bundle = built[family]
    want, _ = transformers_greedy(model, PROMPTS[0], 12)
    assert tokens(bundle, "float", PROMPTS[0])[0] == want


@pytest.mark.parametrize("bits", ["float", "8", "4", "2"])
def test_topk_greedy_tokens_equal_dense(built, bits):
    for fam in ("gemma3", "qwen2"):
        bundle = built[fam][1]
        for p in PROMPTS:
            dense, _ = tokens(bundle, bits, p)
            for k in (1, 3):
                routed, st = tokens(bundle, bits, p, lm_head="topk", lm_head_k=k)
                assert routed == dense, (fam, bits, k, p)
                assert st["lm_head_chunks_read_per_token"] < st["lm_head_chunks_total"]


def test_certification_reads_more_when_the_first_chunks_miss(built):
    """With k = 1 the top-estimate chunk is sometimes not the argmax's: those calls are not
    certified, read further chunks, and still give the dense tokens."""
    bundle = built["gemma3"][1]
    rates = []
    for p in PROMPTS:
        dense, _ = tokens(bundle, "4", p, new=16)
        routed, st = tokens(bundle, "4", p, new=16, lm_head="topk", lm_head_k=1)
        assert routed == dense
        rates.append(st["lm_head_certified_rate"])
        assert st["lm_head_chunks_read_per_token"] >= 1
    assert min(rates) < 1  # the fallback path ran (more than the one chunk scored first)
    _, st = tokens(bundle, "4", PROMPTS[0], lm_head="topk", lm_head_k=VOCAB // ROWS)  # k = every chunk
    assert st["lm_head_certified_rate"] == 1.0 and st["lm_head_chunks_read_per_token"] == VOCAB // ROWS


def step_logits(bundle, bits, prompt, temperature=0.0, **head):
    with nd.Session(bundle, policy=nd.Policy(bits=bits, **head)) as s, sampling(temperature):
        logits, st = LanguageModel(s).forward(prompt, 0, keep=1)
    return logits[0], st


def test_routed_logits_are_the_dense_ones_or_minus_inf(built):
    bundle = built["gemma3"][1]
    for p in PROMPTS:
        dense, _ = step_logits(bundle, "8", p)
        routed, st = step_logits(bundle, "8", p, lm_head="topk", lm_head_k=2)
        live = np.isfinite(routed)
        assert np.all(np.isneginf(routed[~live])) and 0 < live.sum() < VOCAB
        np.testing.assert_allclose(routed[live], dense[live], rtol=0, atol=1e-5 * np.abs(dense).max())
        assert routed.argmax() == dense.argmax()
        head = st["lm_head"]
        assert head["routed_calls"] == 1 and head["chunks_read"] * ROWS == live.sum()
        # exact rows plus the sketch (on a 64-wide toy the sketch is not cheaper than the head; on Gemma it is)
        assert head["dense_macs"] == VOCAB * 64 and head["macs"] > head["chunks_read"] * ROWS * 64


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_sampling_leaves_out_at_most_epsilon(built, temperature):
    bundle = built["qwen2"][1]
    eps = 1e-2
    for p in PROMPTS:
        dense, _ = step_logits(bundle, "8", p)
        routed, st = step_logits(bundle, "8", p, temperature, lm_head="topk", lm_head_k=1, lm_head_epsilon=eps)
        z = dense.astype(np.float64) / temperature
        prob = np.exp(z - z.max())
        prob /= prob.sum()
        left_out = prob[~np.isfinite(routed)].sum()
        assert left_out <= st["lm_head"]["tail_mass_max"] <= eps
    with nd.Session(bundle, policy=nd.Policy(bits="8", lm_head="topk", lm_head_epsilon=eps)) as s:
        r = s.generate(prompt_ids=PROMPTS[0], max_new_tokens=6, temperature=temperature, seed=3, stop_at_eos=False)
    assert r.stats["lm_head_tail_mass_max"] <= eps and r.stats["lm_head_certified_rate"] is None


def test_perplexity_keeps_the_dense_head(built):
    bundle = built["gemma3"][1]
    ids = np.random.default_rng(9).integers(4, VOCAB, 40).tolist()
    with nd.Session(bundle, policy=nd.Policy(bits="8")) as s:
        dense = perplexity(s, ids=ids, context=20)["perplexity"]
    with nd.Session(bundle, policy=nd.Policy(bits="8", lm_head="topk")) as s:
        # float rounding only (BLAS may split a product differently between two sessions)
        assert perplexity(s, ids=ids, context=20)["perplexity"] == pytest.approx(dense, rel=1e-6)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "nadoo.runtime.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=180)


def one_line_error(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("nadoo: error:"), (r.returncode, r.stderr)
    return lines[0]


def test_cli_generate_json_keys(built):
    bundle = built["gemma3"][1]
    ids = ",".join(map(str, PROMPTS[1]))
    runs = {}
    for head in ("dense", "topk"):
        r = cli("generate", bundle, "--prompt-ids", ids, "--max-new-tokens", 5, "--no-eos", "--lm-head", head,
                "--lm-head-k", 2, "--json")
        assert r.returncode == 0, r.stderr
        runs[head] = json.loads(r.stdout)
    d, t = runs["dense"], runs["topk"]
    assert d["token_ids"] == t["token_ids"]
    assert d["lm_head_chunks_read_per_token"] == d["lm_head_chunks_total"] == VOCAB // ROWS
    assert d["lm_head_certified_rate"] is None
    assert t["lm_head_chunks_read_per_token"] < VOCAB // ROWS and 0 <= t["lm_head_certified_rate"] <= 1
    assert t["dense_macs_per_token"] == d["dense_macs_per_token"] == d["macs_per_token"] > 0
    assert d["lm_head_macs_per_token"] == d["lm_head_dense_macs_per_token"] == t["lm_head_dense_macs_per_token"]
    assert t["macs_per_token"] - t["lm_head_macs_per_token"] == d["macs_per_token"] - d["lm_head_macs_per_token"]


def test_bad_options_are_one_line_errors(built, tmp_path):
    bundle = built["gemma3"][1]
    for kw in ({"lm_head": "sparse"}, {"lm_head_k": 0}, {"lm_head_k": 2.5}, {"lm_head_epsilon": 0},
               {"lm_head_epsilon": 1.5}):
        with pytest.raises(InputError):
            nd.Policy(**kw)
    assert "--lm-head-k" in one_line_error(cli("generate", bundle, "--prompt-ids", "5", "--lm-head-k", 0))
    assert "--lm-head" in one_line_error(cli("generate", bundle, "--prompt-ids", "5", "--lm-head", "x"))
    assert "--lm-head-epsilon" in one_line_error(cli("generate", bundle, "--prompt-ids", "5", "--lm-head-epsilon", 1))
    golden = Path(__file__).resolve().parents[1] / "format_spec" / "golden" / "tiny.ndc"  # no routed head
    assert "routed by vocabulary chunk" in one_line_error(cli("generate", golden, "--prompt-ids", "5", "--lm-head", "topk"))


def test_row_map_must_be_a_permutation():
    assert checked_row_map(np.array([2, 0, 1]), 3, "t").tolist() == [2, 0, 1]
    for bad in (np.array([0, 0, 1]), np.array([0, 1]), np.array([0.0, 1.0, 2.0]), np.array([0, 1, 3])):
        with pytest.raises(BundleError):
            checked_row_map(bad, 3, "t")


def test_bisection_order_groups_similar_rows():
    """Rows drawn around 8 well separated centres: every chunk of the order holds one centre's rows."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((8, 6)) * 10
    label = rng.permutation(np.repeat(np.arange(8), 16))
    order = bisection_order((centres[label] + rng.standard_normal((128, 6)) * 0.1).astype(np.float32), 16)
    assert sorted(order.tolist()) == list(range(128))
    assert all(len(set(label[order[i:i + 16]])) == 1 for i in range(0, 128, 16))


def test_a_loose_bound_falls_back_to_the_dense_head(tmp_path):
    """A basis of 6 of 64 dimensions bounds nothing on a random model: the calls compute the dense
    head (every chunk) and give its tokens."""
    tiny_model("gemma3", vocab=VOCAB).save_pretrained(tmp_path / "hf")
    bundle = tmp_path / "loose.ndc"
    compile_lm(tmp_path / "hf", bundle, CompileOptions(embedding_rows=ROWS, lm_head_sketch=0.1), quiet=True)
    dense, _ = tokens(bundle, "8", PROMPTS[2])
    routed, st = tokens(bundle, "8", PROMPTS[2], lm_head="topk", lm_head_k=1)
    assert routed == dense
    assert st["lm_head_chunks_read_per_token"] == VOCAB // ROWS and st["lm_head_certified_rate"] == 0
    assert st["lm_head_macs_per_token"] > st["lm_head_dense_macs_per_token"]  # the sketch came on top
