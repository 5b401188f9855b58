"""The tier table and the two tier layouts (runtime/tiers.py): sizes, payload ids, pack/decode."""

import numpy as np
import pytest

from nadoo.runtime import qcodec
from nadoo.runtime.errors import BundleError
from nadoo.runtime.format import TIERS as INDEX_TIERS
from nadoo.runtime.tiers import (BITS_TO_TIER, DEFAULT_TIERS, NEAREST, NESTED, QUANT_TIERS, SEPARATE, TIER_BITS, TIERS,
                                 compile_layouts, layouts_of, tier_within)


def test_table_covers_every_index_tier_once():
    assert TIERS == INDEX_TIERS
    assert set(TIER_BITS) == set(TIERS) and set(SEPARATE) == set(TIERS)
    assert [TIER_BITS[t] for t in TIERS] == sorted(TIER_BITS.values(), reverse=True)
    assert set(QUANT_TIERS) == set(TIERS) - {"f32"} and set(NESTED.serves) == {"q8", "q4"}
    assert set(BITS_TO_TIER.values()) == set(TIERS)
    for t, order in NEAREST.items():  # itself first, every tier once, float32 only as the last resort
        assert order[0] == t and sorted(order) == sorted(TIERS) and order[-1] == "f32"


@pytest.mark.parametrize("budget,want", [(16, "q8"), (8, "q8"), (7.9, "q6"), (5.5, "q5"), (4, "q4"), (3, "q3"),
                                         (2.9, "q2"), (1, "q2")])
def test_tier_within_budget(budget, want):
    assert tier_within(budget) == want


@pytest.mark.parametrize("budget,want", [(7.9, "q4"), (5.5, "q4"), (8, "q8"), (1, "q2")])
def test_tier_within_budget_counts_only_stored_tiers(budget, want):
    # a bundle compiled with the default tiers has no q6/q5: 7.9 bits/weight must not pick a tier it lacks
    assert tier_within(budget, ("q8", "q4", "q3", "q2")) == want


def _grouped(rng, R, K, G, bits):
    ng = -(-K // G)
    codes = rng.integers(0, 1 << bits, (R, K)).astype(np.uint8)
    s = rng.uniform(0.01, 1, (R, ng)).astype(np.float16)
    m = rng.uniform(-1, 1, (R, ng)).astype(np.float16)
    return codes, s, m


@pytest.mark.parametrize("tier", TIERS)
def test_separate_tier_pack_decode_and_sizes(tier):
    rng = np.random.default_rng(1)
    R, K, G = 5, 40, 16
    layout = SEPARATE[tier]
    if layout.quantized:
        codes, s, m = _grouped(rng, R, K, G, layout.bits)
        payloads = layout.pack(codes, s, m, G)
        want = qcodec.dequantize(payloads[0], R, K, G, layout.bits)
    else:
        want = rng.standard_normal((R, K)).astype(np.float32)
        payloads = layout.pack(want)
    assert [len(p) for p in payloads] == layout.payload_sizes(R, K, G)
    assert layout.nbytes(tier, R, K, G) == len(payloads[0])
    np.testing.assert_array_equal(layout.decode(tier, payloads, R, K, G), want)


def test_nested_reads_a_prefix_of_planes():
    rng = np.random.default_rng(2)
    R, K, G = 6, 50, 16
    q8, s, m = _grouped(rng, R, K, G, 8)
    planes = NESTED.pack(q8, s, m, G)
    sizes = NESTED.payload_sizes(R, K, G)
    assert [len(p) for p in planes] == sizes
    for tier, n in (("q2", 1), ("q4", 2), ("q8", 3)):
        assert NESTED.read_count(tier) == n and NESTED.nbytes(tier, R, K, G) == sum(sizes[:n])
        np.testing.assert_array_equal(NESTED.decode(tier, planes[:n], R, K, G),
                                      qcodec.dequantize_nested(planes[:n], R, K, G, TIER_BITS[tier]))
    with pytest.raises(BundleError):  # a 4-bit read from plane A alone is refused, not guessed
        NESTED.decode("q4", planes[:1], R, K, G)


def test_layouts_of_an_index_entry():
    entry = {"tiers": {"f32": [3, -1]}, "nested": {"planes": [[0, -1], [1, -1]]}}
    lay = layouts_of(entry)
    assert list(lay) == ["f32", "q4"]  # two planes serve q4, not q8; plane A alone serves nothing
    assert lay["f32"][0] is SEPARATE["f32"] and lay["q4"][0] is NESTED
    assert lay["q4"][0].chunk_pids(lay["q4"][1], "q4", 0) == [0, 1]
    assert lay["f32"][0].chunk_pids(lay["f32"][1], "f32", 0) == [3]
    assert all(layout.chunk_pids(ids, t, 1) == [] for t, (layout, ids) in lay.items())  # empty chunk


def test_record_round_trips_through_layouts_of():
    entry = {"tiers": {}}
    for layout, ids in zip(compile_layouts(keep_float=True, nested=True), ([[7]], [[1], [2], [3]])):
        layout.record(entry, ids)
    assert entry == {"tiers": {"f32": [7]}, "nested": {"planes": [[1], [2], [3]]}}
    assert {t: layout.chunk_pids(ids, t, 0) for t, (layout, ids) in layouts_of(entry).items()} == \
        {"f32": [7], "q8": [1, 2, 3], "q4": [1, 2]}
    assert [lay.key for lay in compile_layouts(False, False)] == list(DEFAULT_TIERS)
    assert [lay.key for lay in compile_layouts(False, False, tiers=("q2", "q5", "q8"))] == ["q8", "q5", "q2"]
