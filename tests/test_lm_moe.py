"""Mixture-of-experts language models end to end: tiny random Mixtral, Qwen2-MoE (shared expert with
its sigmoid gate, one dense layer) and OLMoE (q/k norms over the whole projection) models, 4 experts
top-2, compiled from Hugging Face folders (compiler/lm_compile.py): float greedy tokens and logits
equal transformers', 8 bits stays close, each decoded token reads exactly its own experts (top_k /
n_experts of all expert bytes), a memory budget and the ORT engine give the same tokens."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from lm_fixtures import check_float_bundle_greedy, randomize, tiny_tokenizer_json, transformers_greedy  # noqa: E402

import nadoo.runtime as nd  # noqa: E402
from nadoo.compiler.lm_compile import compile_lm, lm_graph  # noqa: E402
from nadoo.compiler.lm_families import check_config, config_from_hf  # noqa: E402
from nadoo.compiler.lm_source import load_lm_source, lm_source_from_model  # noqa: E402
from nadoo.compiler.pipeline import CompileOptions  # noqa: E402
from nadoo.runtime.errors import CompileError  # noqa: E402
from nadoo.runtime.generate import LanguageModel  # noqa: E402

VOCAB = 400
NEW = 16
EXPERTS, TOP_K = 4, 2
FAMILIES = ["mixtral", "qwen2_moe", "olmoe"]


def tiny_moe(family: str, seed: int = 0, **over):
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, attn_implementation="eager", bos_token_id=2, eos_token_id=1,
                  pad_token_id=0, num_experts_per_tok=TOP_K)
    if family == "mixtral":
        cfg = tf.MixtralConfig(**common, intermediate_size=48, num_local_experts=EXPERTS, sliding_window=5)
        cls = tf.MixtralForCausalLM
    elif family == "qwen2_moe":  # norm_topk_prob off: the top-k softmax weights are used as they are
        cfg = tf.Qwen2MoeConfig(**common, intermediate_size=80, moe_intermediate_size=48, num_experts=EXPERTS,
                                shared_expert_intermediate_size=40, norm_topk_prob=False, mlp_only_layers=[1])
        cls = tf.Qwen2MoeForCausalLM
    else:
        cfg = tf.OlmoeConfig(**common, intermediate_size=48, num_experts=EXPERTS, norm_topk_prob=True)
        cls = tf.OlmoeForCausalLM
    for k, v in over.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    return randomize(cls(cfg), seed)


def prompt_ids(seed=0, n=8):
    return np.random.default_rng(seed).integers(4, VOCAB, n).tolist()


def cli(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "nadoo.runtime.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family -> (transformers model, HF folder, bundle with float and 8/4/2-bit tiers)."""
    out = {}
    for fam in FAMILIES:
        d = tmp_path_factory.mktemp(fam)
        model = tiny_moe(fam)
        folder = d / "hf"
        model.save_pretrained(folder)  # hub layout: experts numbered (block_sparse_moe.experts.{e}.w1 for Mixtral)
        (folder / "tokenizer.json").write_text(tiny_tokenizer_json(VOCAB))
        (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
        bundle = d / f"{fam}.ndc"
        compile_lm(folder, bundle, CompileOptions(keep_float=True), quiet=True)
        out[fam] = (model, folder, bundle)
    return out


def session(path, bits="float", **kw):
    return nd.Session(path, policy=nd.Policy(bits=bits), **kw)


# ------------------------------------------------------------------ description and graph
def test_families_read_their_routing_and_experts(built):
    m = {f: load_lm_source(built[f][1]).config["moe"] for f in FAMILIES}
    assert all(c["n_experts"] == EXPERTS and c["top_k"] == TOP_K and c["softmax_order"] == "before" for c in m.values())
    assert [m[f]["normalize"] for f in FAMILIES] == [True, False, True]
    assert m["qwen2_moe"]["layers"] == [True, False, True] and m["qwen2_moe"]["shared_intermediate"] == 40
    assert m["mixtral"]["shared_intermediate"] is None and load_lm_source(built["olmoe"][1]).config["qk_norm_full"]


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_stacked_experts_equal_the_saved_ones(built, family):
    # an in-memory model holds its experts stacked (gate_up_proj [E, 2F, H]); the folder numbers them
    model, folder, _ = built[family]
    a, b = lm_source_from_model(model).weights, load_lm_source(folder).weights
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert "layers.0.moe.experts.3.down" in a and "layers.0.mlp.gate" not in a


def test_moe_blocks_stay_the_moe_op(built):
    src = load_lm_source(built["qwen2_moe"][1])
    graph, _, weights = lm_graph(src, head="head")
    moe = [n for n in graph["nodes"] if n["op"] == "MoE"]
    assert [n["attrs"]["moe"] for n in moe] == ["layers.0.moe", "layers.2.moe"]
    assert {n["attrs"]["normalize"] for n in moe} == {0} and not any(".experts." in w.name for w in weights)
    gated = {n["attrs"]["gate"] for n in graph["nodes"] if n["op"] == "GatedFFN"}
    assert gated == {"layers.0.moe.shared.gate", "layers.1.mlp.gate", "layers.2.moe.shared.gate"}


# ------------------------------------------------------------------ float: identical to transformers
@pytest.mark.parametrize("family", FAMILIES)
def test_float_greedy_and_logits_equal_transformers(built, family):
    model, _, bundle = built[family]
    st = check_float_bundle_greedy(model, bundle, prompt_ids(), NEW)
    # routing matters: in every MoE layer the prompt's tokens pick different experts
    assert all(L["experts_used"] > TOP_K for L in st["moe"]["layers"].values())


def test_routing_flags_change_the_tokens(built):
    # the same Qwen2-MoE weights with the k routing weights renormalised compute something else
    model, _, bundle = built["qwen2_moe"]
    flipped = tiny_moe("qwen2_moe", norm_topk_prob=True)
    flipped.load_state_dict(model.state_dict())
    prompt = prompt_ids(1)
    assert transformers_greedy(flipped, prompt, NEW)[0] != transformers_greedy(model, prompt, NEW)[0]
    assert config_from_hf(flipped.config)["moe"]["normalize"] and not config_from_hf(model.config)["moe"]["normalize"]


# ------------------------------------------------------------------ quantized, per-token reads
def q8_model(s, model):
    """A copy of the transformers model holding the bundle's decoded q8 weights (experts included)."""
    import copy

    from nadoo.compiler.lm_source import hf_weight_names

    b, cfg = s.bundle, s.bundle.index["lm"]["config"]
    head = next(n for n in s.plan.graph["nodes"] if n["op"] == "LMHead")
    row_of = dict(b.read_constants())[head["inputs"][1]]

    def experts(layer):
        entry = b.moe[layer]
        blocks = [entry.decode(e, "q8", b.read_payloads(entry.pids(e, "q8"))) for e in range(entry.n_experts)]
        return np.stack([np.concatenate([k[0], k[1]]) for k in blocks]), np.stack([k[2].T for k in blocks])

    state = model.state_dict()
    for hf, canon in hf_weight_names(cfg, state).items():
        layer, _, part = canon.partition(".moe.experts.")
        if part:
            w = experts(layer + ".moe")[part == "down"]
        elif canon in b.tensors:
            w = b.read_weight(canon, "q8")
            w = w[row_of] if canon == head["attrs"]["weight"] else w
        else:
            continue  # norms, router: inline float constants
        state[hf] = torch.from_numpy(np.ascontiguousarray(w))
    q = copy.deepcopy(model)
    q.load_state_dict(state)
    return q


def test_8_bit_runs_the_stored_8_bit_weights(built):
    """At 8 bits the session computes what transformers computes over the bundle's decoded q8 tensors
    and experts (to float rounding), and stays close to the float model."""
    model, _, bundle = built["mixtral"]
    seq = prompt_ids() + transformers_greedy(model, prompt_ids(), NEW)[0]
    with session(bundle, "8") as s:
        q8, st = LanguageModel(s).forward(seq, 0, keep=0)
        exact = q8_model(s, model)(torch.tensor([seq])).logits[0].detach().numpy()
    assert all(L["tiers"] == ["q8"] for L in st["moe"]["layers"].values())
    assert np.abs(q8 - exact).max() <= 1e-4 * np.abs(exact).max()
    f = model(torch.tensor([seq])).logits[0].detach().numpy()
    assert 0 < np.abs(q8 - f).max() <= 0.2 * np.abs(f).max()
    assert (q8.argmax(-1) == f.argmax(-1)).mean() >= 0.85


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_a_decoded_token_reads_exactly_its_experts(built, family):
    """Under a budget too small to keep an expert, every decode step reads the stored payloads of
    exactly the experts its token is routed to; those are top_k / n_experts of all expert bytes."""
    bundle = built[family][2]
    prompt = prompt_ids(2)
    with session(bundle, "8") as s:
        free = s.generate(prompt_ids=prompt, max_new_tokens=NEW, stop_at_eos=False)
    with session(bundle, "8", memory_budget="4KB") as s:
        tight = s.generate(prompt_ids=prompt, max_new_tokens=NEW, stop_at_eos=False)
        lm, stored = LanguageModel(s), s.bundle.table["stored"]
        lm.forward(prompt, 0)
        for i, t in enumerate(tight.token_ids[:4]):
            _, st = lm.forward([t], len(prompt) + i)
            want = 0
            for name, L in st["moe"]["layers"].items():
                entry = s.bundle.moe[name]
                picked = np.flatnonzero(L["usage"]).tolist()
                assert len(picked) == TOP_K and L["tiers"] == ["q8"]
                want += sum(int(stored[p]) for e in picked for p in entry.pids(e, "q8"))
            assert st["moe"]["expert_bytes_read"] == want
    assert tight.token_ids == free.token_ids
    for r in (free, tight):
        assert r.stats["expert_bytes_per_token"] == r.stats["expert_bytes_total"] * TOP_K / EXPERTS
    # without a budget the experts stay cached after the prompt: decoding reads fewer
    assert tight.stats["expert_bytes_read_per_token"] > free.stats["expert_bytes_read_per_token"]


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_ort_engine_agrees_with_numpy(built, family):
    bundle = built[family][2]
    prompt = prompt_ids(3)
    runs = {}
    for engine in ("numpy", "ort"):
        with session(bundle, "8", engine=engine) as s:
            runs[engine] = s.generate(prompt_ids=prompt, max_new_tokens=NEW, stop_at_eos=False)
    assert runs["ort"].token_ids == runs["numpy"].token_ids
    assert runs["ort"].stats["ort_nodes"] > 0 and runs["numpy"].stats["ort_nodes"] == 0
    # the MoE op stays in NumPy: it still routes and reads its experts per token
    assert runs["ort"].stats["expert_bytes_per_token"] == runs["numpy"].stats["expert_bytes_per_token"] > 0


def test_generate_json_reports_expert_bytes(built):
    r = cli("generate", built["qwen2_moe"][2], "--prompt-ids", "5,6,7", "--max-new-tokens", "3", "--bits", "4", "--json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["expert_bytes_per_token"] == j["expert_bytes_total"] * TOP_K / EXPERTS
    assert j["expert_bytes_read_per_token"] is not None and len(j["token_ids"]) == 3
    assert j["policy"]["bits"] == "4"


def test_a_dense_model_reports_no_expert_bytes(tmp_path):
    from lm_fixtures import tiny_model

    from nadoo.compiler.lm_compile import compile_lm_source

    bundle = tmp_path / "llama.ndc"
    compile_lm_source(lm_source_from_model(tiny_model("llama", num_hidden_layers=1)), bundle, quiet=True)
    with session(bundle, "8") as s:
        st = s.generate(prompt_ids=[5, 6], max_new_tokens=2, stop_at_eos=False).stats
    assert st["expert_bytes_per_token"] is st["expert_bytes_read_per_token"] is st["expert_bytes_total"] is None


# ------------------------------------------------------------------ refused configurations
def test_a_tensor_spelled_twice_is_refused(built, tmp_path):
    # Mixtral's router under both of its names, or an expert both stacked and numbered: neither wins
    import shutil

    from safetensors.torch import load_file, save_file

    folder = built["mixtral"][1]
    state = load_file(str(folder / "model.safetensors"))
    router = state["model.layers.0.block_sparse_moe.gate.weight"].clone()
    stacked = torch.zeros(EXPERTS, 96, 64)
    for name, extra, msg in [("twice", {"model.layers.0.mlp.gate.weight": router}, "are both layers.0.moe.router"),
                             ("stacked", {"model.layers.1.mlp.experts.gate_up_proj": stacked}, "both stacked")]:
        d = tmp_path / name
        shutil.copytree(folder, d)
        save_file({**state, **extra}, str(d / "model.safetensors"))
        with pytest.raises(CompileError, match=msg):
            load_lm_source(d)


def test_unsupported_moe_configs_are_one_error():
    with pytest.raises(CompileError, match="not supported yet"):
        config_from_hf(tf.Qwen3MoeConfig(num_hidden_layers=1))
    with pytest.raises(CompileError, match="clip_qkv"):
        config_from_hf(tf.OlmoeConfig(num_hidden_layers=1, clip_qkv=8.0))
    good = config_from_hf(tf.MixtralConfig(num_hidden_layers=2, num_local_experts=4))
    good.update(add_bos=False)
    check_config(good)
    for bad, msg in [({"top_k": 5}, "exceeds"), ({"layers": [True]}, "each of the 2 layers"),
                     ({"shared_intermediate": 0}, "shared_intermediate")]:
        with pytest.raises(CompileError, match=msg):
            check_config({**good, "moe": {**good["moe"], **bad}})
    with pytest.raises(CompileError, match="moe block"):
        check_config({**good, "moe": None})
    # a Qwen2-MoE whose every layer is dense is a dense decoder
    assert config_from_hf(tf.Qwen2MoeConfig(num_hidden_layers=2, mlp_only_layers=[0, 1]))["ffn"] == "dense"
