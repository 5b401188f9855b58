"""Measured sensitivity (compiler/sensitivity.py) and the allocator that uses it: the output error of one
tensor alone at a tier orders the tiers, is 0 for the float weights, leaves the weights as they were,
and the allocation spends its bits on the tensor whose error matters more at the output."""
import numpy as np

from nadoo.compiler.allocate import bundle_allocation
from nadoo.compiler.quantize import quantize_payload
from nadoo.compiler.rewrite import Weight
from nadoo.compiler.sensitivity import Sensitivity
from nadoo.runtime.tiers import ZERO_POINT


def _mlp(rng, K=64, H=96, O=32):
    graph = {"opset": {"": 18, "nadoo": 1}, "inputs": [{"name": "x", "dtype": "float32", "shape": ["n", K]}],
             "outputs": [{"name": "y", "dtype": "float32", "shape": ["n", O]}], "constants": [],
             "nodes": [{"op": "ChunkedLinear", "domain": "nadoo", "name": "l1", "inputs": ["x"], "outputs": ["h"],
                        "attrs": {"weight": "w1"}},
                       {"op": "Relu", "domain": "", "name": "r", "inputs": ["h"], "outputs": ["a"], "attrs": {}},
                       {"op": "ChunkedLinear", "domain": "nadoo", "name": "l2", "inputs": ["a"], "outputs": ["y"],
                        "attrs": {"weight": "w2"}}]}
    w1 = Weight("w1", "linear", (rng.standard_normal((H, K)) / 8).astype(np.float32), "l1", "x", "h")
    w2 = Weight("w2", "linear", (rng.standard_normal((O, H)) / 10).astype(np.float32), "l2", "a", "y")
    return graph, [w1, w2]


def test_measured_error_orders_tiers_and_restores_the_weight():
    rng = np.random.default_rng(0)
    graph, weights = _mlp(rng)
    x = rng.standard_normal((40, 64)).astype(np.float32)
    probe = Sensitivity(graph, {}, weights, {"x": x})
    w = weights[0]
    orig = w.array
    assert probe.measure(w, "f32", orig.copy()) == 0.0
    for tier in ("q8", "q4", "q3", "q2"):
        lay = ZERO_POINT[tier]
        p, _ = quantize_payload(orig, lay.bits, 16, codec="zp")
        probe.measure(w, tier, lay.decode(tier, [p], *orig.shape, 16))
        assert w.array is orig   # put back
    e = probe.errors["w1"]
    assert 0 < e["q8"] < e["q4"] < e["q3"] < e["q2"] < 1
    # the measurement is the end-to-end error: replacing the weight by zeros loses all of the output
    assert abs(probe.measure(w, "zero", np.zeros_like(orig)) - 1.0) < 1e-9


def _entry(name, err):
    tiers = ("q8", "q4", "q2")
    return {"name": name, "shape": [4, 64], "bounds": [0, 2, 4], "tiers": {},
            "zp": {t: [3 * i + k for k in range(2)] for i, t in enumerate(tiers)},  # ids 0-1, 3-4, 6-7
            "errors": {t: {"out_err": [err[t]] * 2} for t in tiers}}


def test_allocation_follows_measured_sensitivity():
    proxy = {"q8": 1e-4, "q4": 1e-2, "q2": 1e-1}
    entries = [_entry("a", proxy), _entry("b", proxy)]
    sizes = {0: 256, 1: 256, 3: 128, 4: 128, 6: 64, 7: 64}          # q8, q4, q2 payloads per chunk
    size = lambda p: sizes.get(p, 64)  # noqa: E731
    budget = 8 * (2 * 128 + 2 * 64) / (2 * 4 * 64)                # room for q4 on one tensor only
    measured = {"a": {"q8": 1e-6, "q4": 1e-5, "q2": 1e-4}, "b": {"q8": 1e-4, "q4": 1e-2, "q2": 0.3}}
    got = bundle_allocation(entries, size, budget, measured)["tiers"]
    assert got == {"a": ["q2", "q2"], "b": ["q4", "q4"]}
    swapped = bundle_allocation(entries, size, budget, {"a": measured["b"], "b": measured["a"]})["tiers"]
    assert swapped == {"a": ["q4", "q4"], "b": ["q2", "q2"]}


def test_one_measured_tier_scales_the_others_by_the_tensors_gain():
    proxy = {"q8": 1e-4, "q4": 1e-2, "q2": 1e-1}
    entries = [_entry("a", proxy), _entry("b", proxy)]
    sizes = {0: 256, 1: 256, 3: 128, 4: 128, 6: 64, 7: 64}
    budget = 8 * (2 * 128 + 2 * 64) / (2 * 4 * 64)
    got = bundle_allocation(entries, lambda p: sizes.get(p, 64), budget, {"a": {"q4": 1e-5}, "b": {"q4": 1e-1}})
    assert got["tiers"] == {"a": ["q2", "q2"], "b": ["q4", "q4"]}
