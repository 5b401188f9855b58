"""Mixed precision under a budget: one tier per chunk, minimising the summed error, never
exceeding a byte budget.

Method: per chunk, its tiers sorted by bytes are reduced to the lower convex hull of (bytes, error)
(a tier that costs more but is not better per byte is never picked). Every chunk starts at its
cheapest tier; the possible upgrades (one hull step of one chunk) are taken in order of error
reduction per extra byte, and the allocation for budget B is the longest *prefix* of that one fixed
sequence that fits. Hence the budget is never exceeded, and a larger budget only extends the prefix,
so the error never grows with the budget (monotone). Pure function, no I/O.
"""
from __future__ import annotations

import heapq

from nadoo.runtime.errors import CompileError
from nadoo.runtime.tiers import QUANT_TIERS, layouts_of


def allocate(costs: list[dict], errors: list[dict], budget_bytes: float) -> list[str] | None:
    """costs[c], errors[c]: {tier: bytes}, {tier: error} of chunk c (same tier keys).
    Returns the tier per chunk, or None when even the cheapest tiers exceed the budget."""
    hulls = []
    for cost, err in zip(costs, errors):
        tiers = sorted(cost, key=lambda t: (cost[t], err[t]))
        hull = []
        for t in tiers:
            if hull and err[t] >= err[hull[-1]]:
                continue  # costs at least as much, not better
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                # b is above the chord a→t: upgrading straight a→t is at least as good per byte
                if (err[a] - err[b]) * (cost[t] - cost[a]) <= (err[a] - err[t]) * (cost[b] - cost[a]):
                    hull.pop()
                else:
                    break
            hull.append(t)
        hulls.append(hull)
    pick = [0] * len(hulls)
    total = sum(costs[c][h[0]] for c, h in enumerate(hulls))
    if total > budget_bytes:
        return None

    def step(c):
        h, i = hulls[c], pick[c]
        a, b = h[i], h[i + 1]
        db = costs[c][b] - costs[c][a]
        de = errors[c][a] - errors[c][b]
        return (-(de / db) if db > 0 else float("-inf"), c)

    heap = [step(c) for c, h in enumerate(hulls) if len(h) > 1]
    heapq.heapify(heap)
    while heap:
        _, c = heapq.heappop(heap)
        h, i = hulls[c], pick[c]
        extra = costs[c][h[i + 1]] - costs[c][h[i]]
        if total + extra > budget_bytes:
            break  # the prefix ends here: this keeps the result monotone in the budget
        total += extra
        pick[c] = i + 1
        if pick[c] + 1 < len(h):
            heapq.heappush(heap, step(c))
    return [h[i] for h, i in zip(hulls, pick)]


def bundle_allocation(entries: list[dict], payload_bytes, bits_per_weight: float,
                      measured: dict | None = None) -> dict:
    """Allocation over a compiled index's tensor entries. error of a chunk = its stored out_err
    (relative output-error energy of its layer) × its share of the layer's rows, so every layer
    counts equally; with `measured` ({name: {tier: end-to-end output error of that tensor alone at
    that tier}}, compiler/sensitivity.py) a tensor's measured error is split over its chunks in
    proportion to those proxies instead, and a tier not measured gets its proxies times the tensor's
    gain (measured / proxy at a measured tier), so layers count by what their error does at the output.
    bytes = the chunk's payload bytes (codes + scales + mins). Budget = bits_per_weight/8
    bytes per weight over all chunked weights. Returns {"bits_per_weight", "tiers": {name: [tier]}}."""
    costs, errs, owner = [], [], []
    n_weights = 0
    for e in entries:
        layouts = layouts_of(e)  # nested planes: a b-bit read costs every plane it needs
        qt = [t for t in QUANT_TIERS if t in layouts and t in e.get("errors", {})]
        if not qt:
            continue
        rows = e["shape"][0]
        k = 1
        for d in e["shape"][1:]:
            k *= d
        n_weights += rows * k
        b = e["bounds"]
        proxy = {t: [e["errors"][t]["out_err"][c] * (b[c + 1] - b[c]) / rows for c in range(len(b) - 1)] for t in qt}
        meas = {t: v for t, v in (measured or {}).get(e["name"], {}).items() if t in proxy}
        gain = next((v / sum(proxy[t]) for t, v in meas.items() if sum(proxy[t]) > 0), None)
        for c in range(len(b) - 1):
            costs.append({t: sum(payload_bytes(p) for p in layouts[t][0].chunk_pids(layouts[t][1], t, c)) for t in qt})
            errs.append({t: _chunk_error(proxy[t], c, b, meas.get(t), gain) for t in qt})
            owner.append((e["name"], c))
    tiers = allocate(costs, errs, bits_per_weight / 8 * n_weights)
    if tiers is None:
        cheapest = sum(min(c.values()) for c in costs) * 8 / max(n_weights, 1)
        raise CompileError(f"--bits-per-weight {bits_per_weight}: even the cheapest stored tiers need "
                           f"{cheapest:.2f} bits/weight")
    out: dict = {}
    for (name, _c), t in zip(owner, tiers):
        out.setdefault(name, []).append(t)
    used = sum(cost[t] for cost, t in zip(costs, tiers))
    return {"bits_per_weight": bits_per_weight, "achieved_bits_per_weight": 8 * used / max(n_weights, 1),
            "tiers": out}


def _chunk_error(proxy: list[float], c: int, bounds: list[int], measured: float | None,
                 gain: float | None = None) -> float:
    """Chunk c's error: the tensor's measured error at this tier split by the proxies (by rows when
    they are all 0); unmeasured: its proxy times the tensor's gain, or the bare proxy."""
    if measured is None:
        return proxy[c] * gain if gain is not None else proxy[c]
    total = sum(proxy)
    if total > 0:
        return measured * proxy[c] / total
    return measured * (bounds[c + 1] - bounds[c]) / (bounds[-1] - bounds[0])


def store_allocation(index: dict, payload_bytes, bits_per_weight: float, measured: dict | None = None) -> str:
    """bundle_allocation over `index["tensors"]`, written into the index (NDC 1.1 "alloc", and each
    allocated tensor's own `alloc` list, which the reader checks against its stored tiers); returns the
    compile note."""
    alloc = bundle_allocation(index["tensors"], payload_bytes, bits_per_weight, measured)
    index["alloc"] = alloc
    for e in index["tensors"]:
        if e["name"] in alloc["tiers"]:
            e["alloc"] = alloc["tiers"][e["name"]]
    return (f"allocation at <= {bits_per_weight} bits/weight: {alloc['achieved_bits_per_weight']:.3f} bits/weight "
            f"(run with --bits alloc)")
