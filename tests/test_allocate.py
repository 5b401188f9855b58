"""Mixed-precision allocator: never over budget, monotone in the budget."""
from hypothesis import given, settings, strategies as st

from nadoo.compiler.allocate import allocate

chunk = st.tuples(st.integers(1, 50), st.integers(1, 50), st.integers(1, 50),
                  st.floats(0, 10), st.floats(0, 10), st.floats(0, 10))


def _mk(chunks):
    costs = [{"q2": a, "q4": a + b, "q8": a + b + c} for a, b, c, *_ in chunks]
    errs = [{"q2": x + y + z, "q4": y + z, "q8": z} for *_, x, y, z in chunks]
    return costs, errs


@settings(max_examples=200, deadline=None)
@given(st.lists(chunk, min_size=1, max_size=20), st.floats(0, 1), st.floats(0, 1))
def test_never_over_budget_and_monotone(chunks, f1, f2):
    costs, errs = _mk(chunks)
    lo = sum(c["q2"] for c in costs)
    hi = sum(c["q8"] for c in costs)
    b1, b2 = sorted([lo + f1 * (hi - lo), lo + f2 * (hi - lo)])
    r1, r2 = allocate(costs, errs, b1), allocate(costs, errs, b2)
    for r, b in ((r1, b1), (r2, b2)):
        assert sum(c[t] for c, t in zip(costs, r)) <= b
    e1 = sum(e[t] for e, t in zip(errs, r1))
    e2 = sum(e[t] for e, t in zip(errs, r2))
    assert e2 <= e1 + 1e-9
    assert allocate(costs, errs, lo - 1) is None
    assert all(t == "q8" or e[t] == e["q8"] for e, t in zip(errs, allocate(costs, errs, hi)))


def test_end_to_end_digits_mlp_allocation(tmp_path):
    import numpy as np
    import pytest

    torch = pytest.importorskip("torch")
    from examples.models import digits_data, train_digits_mlp
    from nadoo.compiler.pipeline import CompileOptions, compile_model
    from nadoo.runtime import Policy, Session
    from nadoo.runtime.reader import Bundle

    Xtr, ytr, Xte, yte = digits_data()
    torch.jit.save(torch.jit.trace(train_digits_mlp(), torch.zeros(1, 64)), tmp_path / "m.pt")
    np.savez(tmp_path / "c.npz", input=Xtr[:128])
    compile_model(str(tmp_path / "m.pt"), str(tmp_path / "m.ndc"),
                  CompileOptions(calib=str(tmp_path / "c.npz"), chunks=8, bits_per_weight=3.0), quiet=True)
    with Bundle.open(tmp_path / "m.ndc") as b:
        alloc = b.index["alloc"]
        used = sum(b.table["raw"][b.tensors[n].tiers[t][c]] for n, ts in alloc["tiers"].items() for c, t in enumerate(ts))
        n_w = sum(int(np.prod(b.tensors[n].shape)) for n in alloc["tiers"])
        assert 8 * used / n_w <= 3.0 and {"q2", "q4"} & {t for ts in alloc["tiers"].values() for t in ts}
    acc = {}
    for bits in ("8", "alloc"):
        with Session(tmp_path / "m.ndc", Policy(bits=bits)) as s:
            acc[bits] = float(np.mean(s.run(None, {"input": Xte})[0].argmax(1) == yte))
    assert acc["alloc"] >= acc["8"] - 0.02, acc
