"""Policy.plan: the one place a chunked layer's tiers and chunks are decided (linear, conv, gather, FFN)."""

import numpy as np
import pytest

from nadoo.runtime import InputError, Policy
from nadoo.runtime.reader import TensorEntry


def _entry(name="up", chunk_absmax=(0.9, 0.1, 0.8, 0.05), routable=True, kind="ffn_up", empty=()):
    n = len(chunk_absmax)
    pids = [-1 if i in empty else i for i in range(n)]
    return TensorEntry({"name": name, "kind": kind, "shape": [2 * n, 4], "group_size": 4,
                        "bounds": list(range(0, 2 * n + 1, 2)), "tiers": {"q8": pids, "q4": pids},
                        "routable": routable, "absmax": 1.0, "chunk_absmax": list(chunk_absmax)})


PROFILE = {"chunk_activity": [1.0, 4.0, 3.0, 2.0], "concentration": 0.6, "routable": True}


def test_dense_reads_everything_but_what_tau_empties():
    e = _entry()
    p = Policy().plan(e, PROFILE)
    assert (p.mode, p.keep, p.tiers, p.dense_fallback) == ("dense", None, ["q8"] * 4, False)
    p = Policy(tau=0.2).plan(e, PROFILE)  # chunks 1 and 3 lie below 0.2·max|W|
    assert p.mode == "subset" and p.keep.tolist() == [0, 2] and p.skip.tolist() == [False, True, False, True]
    assert Policy(tau=0.95).plan(e, PROFILE).mode == "empty"
    assert Policy().plan(_entry(empty=(1,)), PROFILE).keep.tolist() == [0, 2, 3]  # stored empty


def test_static_topk_ranks_only_chunks_that_are_read():
    e = _entry()
    p = Policy("topk", topk=2, predictor="static").plan(e, PROFILE)
    assert (p.mode, p.keep.tolist(), p.k) == ("subset", [1, 2], 2)  # the two most active
    # chunk 1 is emptied by tau: the next most active takes its place, never a chunk that is not read
    p = Policy("topk", topk=2, predictor="static", tau=0.2).plan(e, PROFILE)
    assert p.keep.tolist() == [0, 2]
    assert Policy("topk", topk=4, predictor="static").plan(e, PROFILE).mode == "dense"
    # the emptiness that counts can be another tensor's (an FFN group is worthless when its down rows are)
    down = _entry("down", chunk_absmax=(0.9, 0.9, 0.01, 0.9), kind="ffn_down")
    assert Policy("topk", topk=2, predictor="static", tau=0.2).plan(e, PROFILE, skip_of=down).keep.tolist() == [1, 3]


def test_predictors_fallback_and_layers_that_never_route():
    e = _entry()
    topk = dict(kind="topk", topk=0.5)
    assert Policy(**topk).plan(e, PROFILE, predictor_available=True).mode == "predict"
    assert Policy(**topk).plan(e, PROFILE).mode == "subset"  # auto without a sketch: static
    assert Policy(**topk, predictor="sketch").plan(e, PROFILE).mode == "subset"
    p = Policy(**topk, predictor="oracle").plan(e, PROFILE)
    assert (p.mode, p.k) == ("oracle", 2)
    p = Policy(**topk, fallback=0.7).plan(e, PROFILE, predictor_available=True)  # concentration 0.6 < 0.7
    assert (p.mode, p.dense_fallback) == ("dense", True)
    assert Policy(**topk).plan(_entry(routable=False), {}).mode == "dense"
    assert Policy(**topk).plan(e, PROFILE, predictor_available=True, can_route=False).mode == "dense"


def test_tiers_and_expert_options():
    e = _entry()
    assert Policy(bits="auto").plan(e, PROFILE).tiers == ["q4", "q8", "q4", "q4"]  # q2 not stored: nearest
    with pytest.raises(InputError, match="no f32 tier"):
        Policy(bits="float").plan(e, PROFILE)
    p = Policy(disable_experts="0:1, lm.layers.1.mlp:2", only_experts=[(0, 3), (0, 1)])
    assert p.disable_experts == [(0, 1), ("lm.layers.1.mlp", 2)]
    assert p.experts_enabled(0, "lm.layers.0.mlp", 4).tolist() == [False, False, False, True]
    assert p.experts_enabled(1, "lm.layers.1.mlp", 4).tolist() == [True, True, False, True]
    for bad in ("0-3", "0:x", [(0, "3")]):
        with pytest.raises(InputError, match="expert"):
            Policy(disable_experts=bad)
    with pytest.raises(InputError, match="every expert is disabled"):
        Policy(only_experts="0:1", disable_experts="0:1").experts_enabled(0, "m", 4)
