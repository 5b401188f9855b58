"""What is inside a bundle: the facts `nadoo info` prints (text) or emits (--json), gathered once."""

from __future__ import annotations

from collections import Counter

import numpy as np

from .chunked import REGISTRY
from .format import CODECS
from .reader import Bundle
from .tiers import FLOAT_TIER, TIERS


def bundle_facts(b: Bundle) -> dict:
    """Everything here comes from validated objects (reader + runtime/schema.py): no key is missing,
    no value has the wrong type."""
    ix = b.index
    t = b.table
    graph = b.graph() if ix.get("graph") is not None else None
    facts = {
        "path": b.path,
        "format_version": f"{b.preamble.major}.{b.preamble.minor}",
        "producer": ix.get("producer", {}),
        "model": ix.get("model", {}),
        "bundle_bytes": b.file_size,
        "payload_count": int(len(t)),
        "alignment": b.preamble.alignment,
        "dense_fp32_weight_bytes": b.stats.dense_fp32_weight_bytes,
        "stats": b.stats.raw,
    }
    if graph is not None:
        ops = Counter(f"{n.domain + '.' if n.domain else ''}{n.op}" for n in graph.nodes)
        facts["graph"] = {
            "inputs": [i.to_json() for i in graph.inputs],
            "outputs": [o.to_json() for o in graph.outputs],
            "node_count": len(graph.nodes),
            "ops": dict(sorted(ops.items())),
        }
    consts = b.constants_table
    facts["inline_constants"] = {
        "count": len(consts.tensors) if consts else 0,
        "bytes": int(t["raw"][consts.payload]) if consts else 0,
        # (1.1) the large float constants the compiler left inline, each with its recorded reason
        "not_chunked": [{"name": c.name, "shape": list(c.shape), "elements": c.count, "reason": c.reason}
                        for c in (consts.tensors if consts else ()) if c.reason is not None],
    }
    rows = []
    for e in b.tensors.values():
        tiers = {}
        for tier in TIERS:
            if tier not in e.tiers:
                continue
            # every payload a read of the tier takes (nested planes: all the planes it reads)
            live = np.asarray([p for i in range(e.n_chunks) for p in e.chunk_pids(tier, i)], np.int64)
            stored = int(t["stored"][live].sum()) if len(live) else 0
            raw = int(t["raw"][live].sum()) if len(live) else 0
            codecs = sorted({CODECS[int(c)] for c in t["codec"][live]}) if len(live) else []
            err = e.errors.get(tier, {})
            tiers[tier] = {
                "stored_bytes": stored,
                "raw_bytes": raw,
                "codecs": codecs,
                "compression": round(stored / raw, 4) if raw else 1.0,
                "mse_mean": float(np.mean(err["mse"])) if err.get("mse") else None,
                "out_err_mean": float(np.mean(err["out_err"])) if err.get("out_err") else None,
            }
        empty = int(np.sum(next(iter(e.tiers.values())) < 0))
        rows.append({
            "name": e.name,
            "kind": e.kind,
            "shape": list(e.shape),
            "chunks": e.n_chunks,
            "empty_chunks": empty,
            "group_size": e.group_size,
            "routable": e.meta.get("routable"),
            "kept_ratio": e.meta.get("kept_ratio"),
            "tiers": tiers,
        })
    facts["tensors"] = rows
    profile = b.read_profile()
    if profile is not None:
        facts["profile"] = profile
    for cls in REGISTRY.values():  # op families with facts of their own
        facts.update(cls.describe(b, profile) or {})
    return facts


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def format_facts(f: dict) -> str:
    out = []
    p = f.get("producer", {})
    out.append(f"{f['path']}: NDC {f['format_version']}, {_human(f['bundle_bytes'])}, {f['payload_count']} payloads, "
               f"alignment {f['alignment']}")
    if p:
        out.append(f"producer: {p.get('name', '?')} {p.get('version', '')}".rstrip())
    m = f.get("model") or {}
    if m:
        out.append("model: " + ", ".join(f"{k}={v}" for k, v in m.items()))
    if f.get("dense_fp32_weight_bytes"):
        out.append(f"dense fp32 weights: {_human(f['dense_fp32_weight_bytes'])}; bundle is "
                   f"{f['bundle_bytes'] / f['dense_fp32_weight_bytes']:.2f}x that")
    g = f.get("graph")
    if g:
        sig = lambda xs: ", ".join(f"{x['name']}:{x['dtype']}{x['shape']}" for x in xs)
        out.append(f"graph: {g['node_count']} nodes; inputs {sig(g['inputs'])}; outputs {sig(g['outputs'])}")
        out.append("  ops: " + ", ".join(f"{k} ×{v}" for k, v in g["ops"].items()))
    c = f["inline_constants"]
    out.append(f"inline constants: {c['count']} tensors, {_human(c['bytes'])}")
    for r in c["not_chunked"]:
        out.append(f"  {r['name']} {'x'.join(map(str, r['shape']))} ({r['elements']} elements): {r['reason']}")
    tiers = [t for t in TIERS if any(t in r["tiers"] for r in f["tensors"])]
    if f["tensors"]:
        head = f"{'tensor':<40} {'kind':<7} {'shape':<16} {'chunks':>6} {'route':>5} " + " ".join(f"{t:>10}" for t in tiers)
        out.append("")
        out.append(head)
        for r in f["tensors"]:
            name = r["name"] if len(r["name"]) <= 40 else "…" + r["name"][-39:]
            route = {True: "yes", False: "no", None: "-"}[r["routable"]]
            chunks = f"{r['chunks']}" + (f"-{r['empty_chunks']}" if r["empty_chunks"] else "")
            cells = " ".join(f"{_human(r['tiers'][t]['stored_bytes']) if t in r['tiers'] else '-':>10}" for t in tiers)
            out.append(f"{name:<40} {r['kind']:<7} {'x'.join(map(str, r['shape'])):<16} {chunks:>6} {route:>5} {cells}")
        errs = [t for t in tiers if t != FLOAT_TIER]
        if errs:
            out.append("")
            out.append("tier error (importance-weighted relative output error, mean over chunks):")
            for r in f["tensors"]:
                cells = "  ".join(
                    f"{t}={r['tiers'][t]['out_err_mean']:.2e}" for t in errs
                    if t in r["tiers"] and r["tiers"][t]["out_err_mean"] is not None
                )
                if cells:
                    out.append(f"  {r['name']}: {cells}")
    prof = f.get("profile")
    if prof:
        out.append("")
        out.append(format_profile(prof))
    for cls in REGISTRY.values():
        text = cls.format_description(f)
        if text:
            out += ["", text]
    return "\n".join(out)


def format_profile(prof: dict) -> str:
    out = [f"calibration: {prof.get('samples', '?')} samples ({prof.get('source', 'calibration set')})"]
    for name, layer in prof.get("layers", {}).items():
        act = np.asarray(layer.get("chunk_activity", []), dtype=float)
        if act.size == 0:
            continue
        share = np.sort(act)[::-1] / max(act.sum(), 1e-30)
        half = int(np.searchsorted(np.cumsum(share), 0.5) + 1)
        out.append(
            f"  {name}: routable={'yes' if layer.get('routable') else 'no'}; "
            f"top {half}/{act.size} chunks carry half the activity; "
            f"mean active fraction {np.mean(layer.get('chunk_active_frac', [0])):.2f}"
        )
    return "\n".join(out)
