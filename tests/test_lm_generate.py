"""Language models end to end: tiny random Gemma 3 (sliding + global), Llama, Qwen2 and Mistral models
compiled from a Hugging Face folder or a GGUF file (compiler/lm_compile.py) and run by
runtime/generate.py: float greedy tokens and logits equal transformers', perplexity equals
transformers', 8 bits runs exactly the stored 8-bit weights, streaming, EOS, memory budget, and
one-line errors for bad prompts and missing tokenizers."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from lm_fixtures import (check_float_bundle_greedy, tiny_model, tiny_tokenizer_json,  # noqa: E402
                         transformers_greedy, write_gguf)
from lm_reference import ReferenceDecoder  # noqa: E402

import nadoo.runtime as nd  # noqa: E402
from nadoo.compiler.calibrate import dense_builders  # noqa: E402
from nadoo.compiler.lm_compile import compile_lm, compile_lm_source, is_lm_source, lm_feeds, lm_graph  # noqa: E402
from nadoo.compiler.lm_source import LMSource, load_lm_source, lm_source_from_model  # noqa: E402
from nadoo.compiler.pipeline import CompileOptions  # noqa: E402
from nadoo.runtime.chunked.store import ENCODED_BLOCK_SHARE, MIN_BLOCK  # noqa: E402
from nadoo.runtime.engine import Plan  # noqa: E402
from nadoo.runtime.errors import BundleError, CompileError, InputError, ModelError  # noqa: E402
from nadoo.runtime.generate import LanguageModel, perplexity  # noqa: E402
from nadoo.runtime.lm_index import validate_lm  # noqa: E402

VOCAB = 400  # the tiny tokenizer's size
NEW = 20
FAMILIES = ["gemma3", "llama", "qwen2", "mistral"]
TEXT = ("the quick brown fox jumps over the lazy dog. a cat sat on the mat and the dog ran; then they went home "
        "to eat bread with honey. one two three four five six seven. café déjà vu, 東京 🙂! ") * 3


def cli(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "nadoo.runtime.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("nadoo: error:"), (r.returncode, r.stderr)
    return lines[0]


def hf_folder(path: Path, model) -> Path:
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text(tiny_tokenizer_json(VOCAB))
    (path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    return path


def prompt_ids(seed=0, n=8):
    return np.random.default_rng(seed).integers(4, VOCAB, n).tolist()


def session(path, bits="float", **kw):
    return nd.Session(path, policy=nd.Policy(bits=bits), **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family -> (transformers model, HF folder, bundle compiled from it with --keep-float)."""
    out = {}
    for fam in FAMILIES:
        d = tmp_path_factory.mktemp(fam)
        model = tiny_model(fam, vocab=VOCAB)
        folder = hf_folder(d / "hf", model)
        bundle = d / f"{fam}.ndc"
        compile_lm(folder, bundle, CompileOptions(keep_float=True), quiet=True)
        out[fam] = (model, folder, bundle)
    return out


# ------------------------------------------------------------------ float: identical to transformers
@pytest.mark.parametrize("family", FAMILIES)
def test_float_greedy_and_logits_equal_transformers(built, family):
    model, _, bundle = built[family]
    check_float_bundle_greedy(model, bundle, prompt_ids(), NEW)


def test_sliding_window_is_exercised(built):
    # Gemma's and Mistral's window of 4 over 28 positions: with a wider window the tokens change
    model, folder, _ = built["mistral"]
    src = load_lm_source(folder)
    prompt = prompt_ids()
    tokens, _ = transformers_greedy(model, prompt, NEW)
    wide = ReferenceDecoder(replace(src, config={**src.config, "sliding_window": 64}))
    assert wide.greedy(prompt, NEW)[0] != tokens


@pytest.mark.parametrize("family,over", [
    ("gemma3", dict(vocab=300, num_hidden_layers=6, layer_types=None, head_dim=256, query_pre_attn_scalar=256,
                    num_attention_heads=2, num_key_value_heads=1,
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                     "full_attention": {"rope_type": "default", "rope_theta": 1e6}})),
    ("llama", dict(vocab=300)),
    ("qwen2", dict(vocab=300)),
])
def test_gguf_greedy_equals_transformers(tmp_path, family, over):
    model = tiny_model(family, **over)
    gguf = write_gguf(tmp_path / f"tiny-{family}.gguf", model)
    assert is_lm_source(gguf) and is_lm_source(tmp_path) is False
    bundle = tmp_path / "m.ndc"
    compile_lm(gguf, bundle, CompileOptions(keep_float=True, quant_method="rtn"), quiet=True)  # float is compared
    prompt = np.random.default_rng(1).integers(4, 300, 8).tolist()
    tokens, _ = transformers_greedy(model, prompt, NEW)
    with session(bundle) as s:
        assert s.generate(prompt_ids=prompt, max_new_tokens=NEW, stop_at_eos=False).token_ids == tokens
        assert s.bundle.lm.add_bos and s.bundle.lm.tokenizer_payload is not None  # GGUF metadata tokenizer


def test_tied_head_is_the_embedding_stored_once(built):
    with session(built["gemma3"][2]) as s:
        names = set(s.bundle.tensors)
        assert "embed" in names and "head" not in names
        heads = [n for n in s.plan.graph["nodes"] if n["op"] == "LMHead" and n["outputs"] == ["logits"]]
        assert heads[0]["attrs"]["weight"] == "embed"
    with session(built["qwen2"][2]) as s:  # untied: a head of its own
        assert "head" in s.bundle.tensors


# ------------------------------------------------------------------ perplexity
def transformers_perplexity(model, ids, ctx, bos, first):
    nll = []
    for w in range(len(ids) // ctx):
        win = [bos] + ids[w * ctx + 1:(w + 1) * ctx]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([win])).logits[0].double(), -1).numpy()
        nll += [-logp[p, win[p + 1]] for p in range(first, ctx - 1)]
    return float(np.exp(np.mean(nll))), len(nll)


@pytest.mark.parametrize("score", ["half", "all"])
def test_perplexity_equals_transformers(built, score):
    model, _, bundle = built["gemma3"]
    with session(bundle) as s:
        ids = LanguageModel(s).encode(TEXT)
        r = perplexity(s, TEXT, context=16, score=score)
    ppl, n = transformers_perplexity(model, ids, 16, 2, 8 if score == "half" else 0)
    assert r["tokens_scored"] == n == (len(ids) // 16) * (7 if score == "half" else 15)
    assert r["perplexity"] == pytest.approx(ppl, rel=1e-5)


# ------------------------------------------------------------------ quantized tiers
def read_in_token_order(s, name, tier):
    """A decoded tensor in the source's layout: an MLP's down projection is stored transposed (chunked by
    input neuron groups), and the LM head's tensor (the embedding too, when tied) in the routed head's
    vocabulary order."""
    w = s.bundle.read_weight(name, tier)
    if s.bundle.tensors[name].kind == "ffn_down":
        return w.T
    head = next(n for n in s.plan.graph["nodes"] if n["op"] == "LMHead")
    return w[dict(s.bundle.read_constants())[head["inputs"][1]]] if head["attrs"]["weight"] == name else w


def test_8_bit_runs_the_stored_8_bit_weights(built):
    """At 8 bits the session computes what the reference decoder computes over the bundle's decoded
    q8 tensors (to float rounding), and stays close to the float model."""
    model, folder, bundle = built["llama"]
    src = load_lm_source(folder)
    seq = prompt_ids() + transformers_greedy(model, prompt_ids(), NEW)[0]
    with session(bundle, "8") as s:
        q8 = {n: read_in_token_order(s, n, "q8") for n in s.bundle.tensors}
        logits = LanguageModel(s).forward(seq, 0, keep=0)[0]
    ref = ReferenceDecoder(LMSource(src.config, {**src.weights, **q8}))
    exact = ref.forward(seq)
    assert np.abs(logits - exact).max() <= 1e-4 * np.abs(exact).max()
    ref_f = ReferenceDecoder(src).forward(seq)
    # random weights with peaked attention amplify rounding: close, not equal
    assert np.abs(logits - ref_f).max() <= 0.2 * np.abs(ref_f).max()
    assert (logits.argmax(-1) == ref_f.argmax(-1)).mean() >= 0.85


def test_bits_for_sets_the_tier_of_the_tensors_it_names(built):
    """--bits 4 --bits-for embed=8: the tied embedding and LM head run their q8 weights, every other
    tensor its q4 ones; the session computes what the reference decoder computes over that mix."""
    model, folder, bundle = built["gemma3"]
    src = load_lm_source(folder)
    seq = prompt_ids(3, 24)
    with nd.Session(bundle, policy=nd.Policy(bits="4", bits_for="embed=8")) as s:
        mixed = {n: read_in_token_order(s, n, "q8" if n == "embed" else "q4") for n in s.bundle.tensors}
        logits = LanguageModel(s).forward(seq, 0, keep=0)[0]
    with session(bundle, "4") as s:
        plain = LanguageModel(s).forward(seq, 0, keep=0)[0]
    exact = ReferenceDecoder(LMSource(src.config, {**src.weights, **mixed})).forward(seq)
    assert np.abs(logits - exact).max() <= 1e-4 * np.abs(exact).max()
    assert np.abs(plain - exact).max() > 1e-3 * np.abs(exact).max()  # 4 bits everywhere is another model
    pol = nd.Policy(bits="4", bits_for=["layers.0.*=float", "layers.*=2"])  # shell patterns, first match wins
    assert [pol.tier_override(n) for n in ("layers.0.attn.q", "layers.1.mlp.up", "embed")] == ["f32", "q2", None]


def test_cli_bits_for(built, tmp_path):
    bundle = built["gemma3"][2]
    r = cli("generate", bundle, "--prompt-ids", "5,6,7", "--max-new-tokens", 6, "--no-eos", "--bits", "4",
            "--bits-for", "embed=8", "--json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["policy"]["bits_for"] == {"embed": "8"}
    with nd.Session(bundle, policy=nd.Policy(bits="4", bits_for="embed=8")) as s:
        assert j["token_ids"] == s.generate(prompt_ids=[5, 6, 7], max_new_tokens=6, stop_at_eos=False).token_ids
    assert "matches no tensor" in one_line_error(cli("generate", bundle, "--prompt-ids", "5", "--bits-for", "emb=8"))
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert "8, 6, 5, 4, 3, 2 or float" in one_line_error(cli("perplexity", bundle, "--text-file", text, "--bits-for", "embed=7"))
    assert "PATTERN=BITS" in one_line_error(cli("run", bundle, "--bits-for", "embed"))
    bare = tmp_path / "bare.ndc"  # no float tier
    compile_lm_source(lm_source_from_model(built["llama"][0]), bare, quiet=True)
    assert "--keep-float" in one_line_error(cli("generate", bare, "--prompt-ids", "5", "--bits-for", "embed=float"))


def test_memory_budget_gives_the_same_tokens(built):
    bundle = built["gemma3"][2]
    prompt = prompt_ids(2)
    with session(bundle, "8") as s:
        free = s.generate(prompt_ids=prompt, max_new_tokens=NEW, stop_at_eos=False)
        sizes = {n: 4 * e.rows * e.row_len for n, e in s.bundle.tensors.items()}
    # 24 KB: most chunks stream; just under the embedding's decoded size: the layers' payloads are held
    # while the embedding and the head tied to it stream beside them
    mixed = sizes["embed"] - 1
    assert max(v for n, v in sizes.items() if n != "embed") < mixed < free.stats["resident_weight_bytes"]
    for budget in (24_000, mixed):
        with session(bundle, "8", memory_budget=budget) as s:
            tight = s.generate(prompt_ids=prompt, max_new_tokens=NEW, stop_at_eos=False)
            store = s.ops[0].env.store
            room = store.block_room()
            held_whole = {n for n, e in s.bundle.tensors.items() if store.fits(e)}
            whole = {k[0] for k in s.cache._items if k[2] == "full"}
            largest = max(a.nbytes for a in s.cache._items.values())
        assert tight.token_ids == free.token_ids, budget
        assert tight.stats["resident_weight_bytes"] <= budget < free.stats["resident_weight_bytes"]
        assert tight.stats["bytes_read_per_token"] > free.stats["bytes_read_per_token"]  # under the budget weights stream
        # both budgets are below the decoded model: the cache holds chunks' payloads, no tensor whole, and
        # no entry beyond the store's block room (one chunk excepted)
        assert store.encoded and room == min(budget, max(budget // ENCODED_BLOCK_SHARE, MIN_BLOCK))
        assert largest <= max(room, max_chunk_bytes(bundle)) and not held_whole and not whole


def max_chunk_bytes(bundle) -> int:
    with nd.Session(bundle) as s:
        return max(4 * e.row_len * int(np.diff(e.bounds).max()) for e in s.bundle.tensors.values())


# ------------------------------------------------------------------ text, streaming, EOS
def test_streaming_text_equals_the_final_text(built):
    with session(built["qwen2"][2], "8") as s:
        tok = LanguageModel(s).tokenizer()
        for seed in range(3):  # sampled, so byte-fallback pieces and partial characters come up
            st = s.stream("the cat", max_new_tokens=24, temperature=1.5, seed=seed, stop_at_eos=False)
            pieces = [t.text for t in st]
            r = st.result
            assert "".join(pieces) == r.text == tok.decode([t for t in r.token_ids if t < tok.vocab_size])
            assert len(pieces) == len(r.token_ids) == 24 and r.prompt_ids == tok.encode("the cat")
        again = s.generate("the cat", max_new_tokens=24, temperature=1.5, seed=2, stop_at_eos=False)
        assert again.token_ids == r.token_ids  # the seed makes a sample reproducible


def test_eos_stops_generation(built, tmp_path):
    model, folder, _ = built["gemma3"]
    prompt = prompt_ids(3)
    tokens, _ = transformers_greedy(model, prompt, NEW)
    stop = tokens[5]
    src = load_lm_source(folder)
    bundle = tmp_path / "eos.ndc"
    compile_lm_source(replace(src, config={**src.config, "eos_ids": [stop]}), bundle,
                      CompileOptions(keep_float=True, quant_method="rtn"), quiet=True)
    with session(bundle) as s:
        r = s.generate(prompt_ids=prompt, max_new_tokens=NEW)
    assert r.stop_reason == "eos" and r.token_ids == tokens[:tokens.index(stop) + 1]


def test_sampling_options_are_checked(built):
    with session(built["llama"][2], "8") as s:
        for kw in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -2}, {"max_new_tokens": 0}, {"seed": -1}):
            with pytest.raises(InputError):
                s.generate(prompt_ids=[5, 6], **kw)
        top1 = s.generate(prompt_ids=[5, 6], max_new_tokens=8, temperature=2.0, top_k=1, stop_at_eos=False)
        greedy = s.generate(prompt_ids=[5, 6], max_new_tokens=8, stop_at_eos=False)
        assert top1.token_ids == greedy.token_ids  # top-k 1 is greedy whatever the temperature


def test_positions_must_continue_the_cache(built):
    with session(built["mistral"][2]) as s:
        lm = LanguageModel(s)
        a, _ = lm.forward([5, 6, 7], 0)
        with pytest.raises(InputError, match="continue the cached sequence at 3"):
            lm.forward([8], 5)
        b, _ = lm.forward([5, 6, 7], 0)  # position 0 starts over
        np.testing.assert_array_equal(a, b)
        st = s.stream(prompt_ids=[5, 6], max_new_tokens=4)
        next(st)
        lm.forward([9, 9], 0)  # another sequence used the cache meanwhile
        with pytest.raises(InputError, match="another sequence"):
            next(st)


def test_attention_scores_count_against_the_value_cap():
    """A long prompt's score matrix [heads, n, n] is checked before it is allocated."""
    src = lm_source_from_model(tiny_model("llama", vocab=VOCAB))
    graph, consts, weights = lm_graph(src, head="head")
    plan = Plan(graph, consts, custom_ops=dense_builders({w.name: w for w in weights}), max_elements=10_000)
    plan.run(lm_feeds(list(range(4, 30))))  # 4 heads x 26 x 26 scores
    with pytest.raises(ModelError, match=r"attn.out \(Attention\) would produce 14,400 elements"):
        plan.run(lm_feeds(list(range(4, 64))))


# ------------------------------------------------------------------ the command line
def test_cli_compile_folder_generate_json_and_stream(built, tmp_path):
    _, folder, _ = built["gemma3"]
    bundle = tmp_path / "cli.ndc"
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    r = cli("compile", folder, "-o", bundle, "--calib-text", calib, "--calib-len", 16, "-q")
    assert r.returncode == 0, r.stderr
    assert "windows of 16 tokens" in r.stdout
    r = cli("generate", bundle, "--prompt", "the dog", "--max-new-tokens", 12, "--no-eos", "--json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    for k in ("text", "token_ids", "prompt_tokens", "ttft_s", "decode_tokens_per_s", "bytes_read",
              "bytes_read_per_token", "peak_rss_bytes", "resident_weight_bytes", "layers"):
        assert k in j, k
    assert len(j["token_ids"]) == 12 and j["prompt_tokens"] == 3 and j["layers"]["embed"]["bytes_read"] > 0
    streamed = cli("generate", bundle, "--prompt", "the dog", "--max-new-tokens", 12, "--no-eos")
    assert streamed.returncode == 0 and streamed.stdout == j["text"] + "\n"
    r = cli("perplexity", bundle, "--text-file", calib, "--context", 16, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["tokens_scored"] > 0
    r = cli("run", bundle)  # the stored sample: the last logits of the first calibration window
    assert r.returncode == 0 and "cosine 0.99" in r.stdout


def test_cli_errors_are_one_line(built, tmp_path):
    bundle = built["llama"][2]
    assert "outside the vocabulary" in one_line_error(cli("generate", bundle, "--prompt-ids", "5,9999"))
    assert "comma-separated" in one_line_error(cli("generate", bundle, "--prompt-ids", "5,x"))
    assert "empty" in one_line_error(cli("generate", bundle, "--prompt-ids", ""))
    assert "exactly one" in one_line_error(cli("generate", bundle))
    assert "positions" in one_line_error(cli("generate", bundle, "--prompt-ids", "5", "--max-new-tokens", 500))
    short = tmp_path / "short.txt"
    short.write_text("the dog")
    assert "fewer than one window" in one_line_error(cli("perplexity", bundle, "--text-file", short, "--context", 16))
    assert "model's positions" in one_line_error(cli("perplexity", bundle, "--text-file", short))
    golden = Path(__file__).resolve().parents[1] / "format_spec" / "golden" / "tiny.ndc"
    assert "not a language-model bundle" in one_line_error(cli("generate", golden, "--prompt-ids", "1"))
    # a bundle compiled from an in-memory model without its tokenizer: ids work, text does not
    bare = tmp_path / "bare.ndc"
    compile_lm_source(lm_source_from_model(built["llama"][0]), bare, quiet=True)
    assert "no tokenizer" in one_line_error(cli("generate", bare, "--prompt", "hi"))
    r = cli("generate", bare, "--prompt-ids", "5,6", "--max-new-tokens", 3, "--no-eos")
    assert r.returncode == 0 and len(r.stdout.split()) == 3


def test_compile_refusals_are_one_compile_error(built, tmp_path):
    _, folder, _ = built["llama"]
    for opts, msg in ((CompileOptions(calib="x.npz"), "--calib-text"), (CompileOptions(prune_tau=0.1), "prune"),
                      (CompileOptions(calib_text=str(tmp_path / "none.txt")), "no such calibration text"),
                      (CompileOptions(calib_len=1), "at least 2")):
        with pytest.raises(CompileError, match=msg):
            compile_lm(folder, tmp_path / "x.ndc", opts, quiet=True)
    (tmp_path / "tiny.txt").write_text("the")
    with pytest.raises(CompileError, match="fewer than one --calib-len window"):
        compile_lm(folder, tmp_path / "x.ndc", CompileOptions(calib_text=str(tmp_path / "tiny.txt")), quiet=True)
    assert not (tmp_path / "x.ndc").exists()
    with pytest.raises(CompileError, match="needs the model's tokenizer"):
        compile_lm_source(lm_source_from_model(built["llama"][0]), tmp_path / "x.ndc",
                          CompileOptions(calib_text=str(tmp_path / "tiny.txt")), quiet=True)


def test_lm_index_key_is_validated(built):
    with nd.Session(built["llama"][2]) as s:
        b, good = s.bundle, s.bundle.index["lm"]
        gen = good["generation"]
        bad = [{**good, **k} for k in (
            {"generation": {**gen, "eos_ids": [VOCAB]}}, {"generation": {**gen, "bos_id": -1}},
            {"generation": {**gen, "add_bos": "yes"}}, {"config": {**good["config"], "vocab": 0}},
            {"tokenizer": 10 ** 9}, {"chat_template": 5}, {"generation": None}, {"tokenizer_tables": 10 ** 9},
            {"tokenizer_tables": good["tokenizer"]}, {"tokenizer": None, "tokenizer_tables": 0})]
        for lm in bad:
            with pytest.raises(BundleError, match="corrupt bundle: lm"):
                validate_lm(b, lm, set())
        tok = good["tokenizer"]
        with pytest.raises(BundleError, match="referenced twice"):
            validate_lm(b, good, {tok})
        assert validate_lm(b, good, set()).eos_ids == tuple(gen["eos_ids"])
