"""`nadoo info` facts for MoE layers: experts, stored bytes per tier, calibration usage per expert."""

from __future__ import annotations


def moe_facts(b, profile: dict | None) -> list[dict]:
    usage = (profile or {}).get("moe", {})
    out = []
    for i, (name, e) in enumerate(b.moe.items()):
        u = usage.get(name, {})
        out.append({
            "index": i, "name": name, "n_experts": e.n_experts, "top_k": e.top_k, "hidden": e.hidden,
            "intermediate": e.intermediate, "gated": e.gated, "activation": e.activation,
            "softmax_order": e.softmax_order, "normalize": e.normalize,
            "expert_bytes": {t: e.expert_bytes(t) for t in e.tiers},
            "calibration_tokens": u.get("tokens"),
            "expert_frequency": u.get("expert_frequency"),  # share of tokens routed to each expert
            "mean_weight": u.get("mean_weight"),
        })
    return out


def format_moe(layers: list[dict]) -> str:
    out = ["mixture of experts (share of calibration tokens routed to each expert):"]
    for L in layers:
        tiers = ", ".join(f"{t} {n / 1024:.1f} KiB" for t, n in L["expert_bytes"].items())
        out.append(f"  [{L['index']}] {L['name']}: {L['n_experts']} experts, top-{L['top_k']}, "
                   f"{'gated ' if L['gated'] else ''}{L['activation']}, {L['hidden']}x{L['intermediate']}; per expert: {tiers}")
        freq = L.get("expert_frequency")
        if freq:
            cells = " ".join(f"{e:>2}:{f:>5.1%}" for e, f in enumerate(freq))
            out.append(f"      usage over {L['calibration_tokens']} tokens  {cells}")
            never = [e for e, f in enumerate(freq) if f == 0]
            if never:
                out.append(f"      never selected in calibration: {never}")
    return "\n".join(out)
