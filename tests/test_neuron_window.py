"""Neuron windowing (runtime/chunked/neuron_window.py) on a ReLU Llama (which compiles to what
transformers computes): under a memory budget each
gated MLP holds the down-projection groups the last W tokens used. Same tokens with and without the
window; the groups and bytes a decoded token reads equal what a window over the needs computed from
transformers' own activations predicts, and fall with W; no effect without a budget; one-line errors."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from lm_fixtures import check_float_bundle_greedy, tiny_model  # noqa: E402

import nadoo.runtime as nd  # noqa: E402
from nadoo.compiler.lm_compile import compile_lm_source  # noqa: E402
from nadoo.compiler.lm_source import lm_source_from_model  # noqa: E402
from nadoo.compiler.pipeline import CompileOptions  # noqa: E402
from nadoo.runtime.errors import InputError  # noqa: E402

VOCAB, NEURONS, GROUP = 128, 512, 32
PROMPT = [5, 17, 33, 9, 70, 2, 44, 81]
NEW = 12
BUDGET = "64KB"  # far below the model: without a window every group a token needs is read


def relu_llama():
    """Random weights with a trained-like ReLU sparsity: in 3 of the 16 neuron groups the gate's bias is 0
    (those neurons fire about half the time), elsewhere -4 (about one in a thousand)."""
    model = tiny_model("llama", vocab=VOCAB, intermediate_size=NEURONS, hidden_act="relu", mlp_bias=True)
    hot = np.zeros(NEURONS, bool)
    for g in (2, 7, 11):
        hot[g * GROUP:(g + 1) * GROUP] = True
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.bias.copy_(torch.from_numpy(np.where(hot, 0.0, -4.0).astype(np.float32)))
    return model


@pytest.fixture(scope="module")
def relu_bundle(tmp_path_factory):
    model = relu_llama()
    path = tmp_path_factory.mktemp("relu") / "relu.ndc"
    compile_lm_source(lm_source_from_model(model), path, CompileOptions(keep_float=True), quiet=True)
    return model, path


def decode(path, bits="float", budget=BUDGET, **pol):
    """Greedy NEW tokens after PROMPT on the NumPy engine: the GenerationResult."""
    with nd.Session(path, policy=nd.Policy(bits=bits, **pol), memory_budget=budget, engine="numpy") as s:
        return s.generate(prompt_ids=PROMPT, max_new_tokens=NEW, stop_at_eos=False)


def needs_and_sizes(model, path, token_ids):
    """Per MLP: for every position of the generation's inputs (prompt, then the decoded tokens fed
    back) the set of down's groups with a nonzero input, from transformers' own activations in the
    bundle's neuron order (recovered by matching the bundle's float gate rows to the source's); and
    the stored bytes of each float chunk of down."""
    seq = torch.tensor([PROMPT + token_ids[:-1]])
    acts = {}
    hooks = [layer.mlp.down_proj.register_forward_hook(lambda m, inp, out, i=i: acts.__setitem__(i, inp[0][0].numpy()))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(seq)
    for h in hooks:
        h.remove()
    needs, sizes = {}, {}
    with nd.Session(path, policy=nd.Policy(bits="float"), engine="numpy") as s:
        for i, op in enumerate(o for o in s.ops if type(o).__name__ == "GatedFFN"):
            ours = op.env.store.full(op.gate, op.tiers_g)
            src = model.model.layers[i].mlp.gate_proj.weight.detach().numpy()
            perm = [int(np.flatnonzero((src == row).all(1))[0]) for row in ours]
            nz = np.logical_or.reduceat(acts[i][:, perm] != 0, np.arange(0, NEURONS, GROUP), axis=1)
            needs[op.down.name] = [set(np.flatnonzero(r).tolist()) for r in nz]
            sizes[op.down.name] = [sum(int(s.bundle.table["stored"][p]) for p in op.down.chunk_pids("f32", g))
                                   for g in range(op.down.n_chunks)]
    return needs, sizes


def predicted_decode_bytes(needs, sizes, window: int) -> int:
    """Down bytes the decode steps read when a token finds held the groups of the `window` tokens before it."""
    total = 0
    for name, per_pos in needs.items():
        for t in range(len(PROMPT), len(per_pos)):
            held = set().union(*per_pos[max(0, t - window):t]) if window else set()
            total += sum(sizes[name][g] for g in per_pos[t] - held)
    return total


def test_a_relu_llama_compiles_to_the_same_function(relu_bundle):
    model, path = relu_bundle
    check_float_bundle_greedy(model, path, PROMPT, 6)  # tokens and logits equal transformers'


def test_bytes_read_per_token_follow_the_window(relu_bundle):
    model, path = relu_bundle
    base = decode(path)
    needs, sizes = needs_and_sizes(model, path, base.token_ids)
    steps = NEW - 1
    got, held = {}, {}
    for w in (0, 1, 2, 4):
        r = base if w == 0 else decode(path, neuron_window=w)
        assert r.token_ids == base.token_ids
        got[w] = r.stats["ffn_down_bytes_read_per_token"] * steps
        held[w] = r.stats["ffn_window_bytes"]
        assert got[w] == pytest.approx(predicted_decode_bytes(needs, sizes, w), rel=1e-9), w
        assert r.stats["ffn_bytes_read_per_token"] > r.stats["ffn_down_bytes_read_per_token"]  # gate and up too
    assert got[0] > got[1] > got[4] and held[0] == 0 < held[1] <= held[4]
    all_down = sum(sum(v) for v in sizes.values())
    assert got[0] < 0.5 * all_down * steps  # most groups are idle: a ReLU's exact zeros are not read


@pytest.mark.parametrize("sparsity", [0.0, 0.4])
def test_the_window_changes_no_token(relu_bundle, sparsity):
    _, path = relu_bundle
    ref = decode(path, bits="8", ffn_sparsity=sparsity)
    for w in (1, 8):
        r = decode(path, bits="8", ffn_sparsity=sparsity, neuron_window=w)
        assert r.token_ids == ref.token_ids
        assert r.stats["ffn_down_bytes_read_per_token"] < ref.stats["ffn_down_bytes_read_per_token"]
    assert ref.token_ids == decode(path, bits="8", budget=None, ffn_sparsity=sparsity).token_ids


def test_without_a_budget_the_window_holds_nothing(relu_bundle):
    _, path = relu_bundle
    r = decode(path, budget=None, neuron_window=4)
    assert r.stats["ffn_window_bytes"] == 0 and r.token_ids == decode(path, budget=None).token_ids


def cli(*args):
    return subprocess.run([sys.executable, "-m", "nadoo.runtime.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_cli_reports_the_window(relu_bundle):
    import json

    _, path = relu_bundle
    ids = ",".join(map(str, PROMPT))
    out = {}
    for w in (0, 2):
        r = cli("generate", path, "--prompt-ids", ids, "--max-new-tokens", "6", "--no-eos", "--bits", "8",
                "--memory-budget", BUDGET, "--neuron-window", w, "--json")
        assert r.returncode == 0, r.stderr
        out[w] = json.loads(r.stdout)
    assert out[0]["token_ids"] == out[2]["token_ids"]
    assert out[0]["ffn_window_bytes"] == 0 < out[2]["ffn_window_bytes"]
    assert out[2]["ffn_down_bytes_read_per_token"] < out[0]["ffn_down_bytes_read_per_token"]
    assert out[2]["ffn_zero_share"] > 0.5  # most of this model's neurons are idle


def test_bad_window_is_one_error(relu_bundle):
    _, path = relu_bundle
    for bad in (-1, 1.5, "2"):
        with pytest.raises(InputError, match="--neuron-window"):
            nd.Policy(neuron_window=bad)
    for bad in ("-2", "abc"):
        r = cli("generate", path, "--prompt-ids", "5", "--neuron-window", bad)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("nadoo: error:"), r.stderr
