"""`nadoo compile` for decoder language models: LMSource → a nadoo graph with the KV cache as explicit
state → calibration on text → chunked, quantized tensors → one .ndc bundle with the tokenizer.

The graph (format_spec/NDC-v1.md §4.6) takes input_ids and position_ids [1, n] and logits_to_keep [1]
and returns logits [1, k, vocab] for the last k positions (all when k = 0): `nadoo.ChunkedGather`
for the embedding, `Mul` by the embedding scale, per layer `RMSNormalization`, `nadoo.ChunkedLinear`
q/k/v, one fused `nadoo.Attention` (q/k norms, rotary tables from inv_freq constants, grouped-query
sharing, exact sliding window, the layer's KV cache in the plan's state), o, the sandwich norms
where the family has them, the gated MLP act(gate)·up → down as one `nadoo.GatedFFN` (neurons
reordered by calibration, compiler/gated_ffn.py), then the final norm and the LM head
— over the same chunked tensor as the embedding when the two are tied.

Gemma's norms scale by (1 + w); the offset is added here, once, in float32, which is what the
reference computes at run time, so the stored scale rounds the same way.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from nadoo.runtime import __version__
from nadoo.runtime.engine import Plan
from nadoo.runtime.errors import CompileError, NadooError
from nadoo.runtime.files import read_text
from nadoo.runtime.kv_cache import SequenceState
from nadoo.runtime.tiers import compile_layouts

from .calibrate import LayerStats, dense_builders
from .gated_ffn import DownStats, down_bounds, down_group, down_layout, reorder_neurons
from .lm_tokenizer import compact_tables
from .moe import MoECalibration, write_moe
from .pipeline import (CompileOptions, CompileReport, _bounds, _entry, _progress, _quant_kwargs, _raw, check_layout_options,
                       _write_constants, _write_weights)
from .rewrite import Weight
from .writer import BundleWriter

__all__ = ["compile_lm", "compile_lm_source", "is_lm_source", "lm_graph", "lm_moe_layers", "SYNTHETIC_WINDOWS"]

SYNTHETIC_WINDOWS = 4  # random-token windows when no --calib-text is given
INT64_MAX = np.iinfo(np.int64).max


def is_lm_source(path) -> bool:
    """A Hugging Face model folder (config.json) or a GGUF file: compiled as a language model."""
    from .lm_gguf import is_gguf

    p = Path(path)
    return (p.is_dir() and (p / "config.json").is_file()) or (p.is_file() and is_gguf(p))


# ------------------------------------------------------------------ the graph
class _Graph:
    def __init__(self):
        self.nodes: list[dict] = []
        self.consts: dict[str, np.ndarray] = {}

    def add(self, op: str, inputs: list, out: str, domain: str = "", **attrs) -> str:
        self.nodes.append({"op": op, "domain": domain, "name": out, "inputs": list(inputs), "outputs": [out],
                           "attrs": attrs})
        return out

    def const(self, name: str, a) -> str:
        self.consts[name] = np.asarray(a)
        return name


def lm_graph(src, head: str, layout=None) -> tuple[dict, dict, list[Weight]]:
    """(graph, inline constants, chunked weights) of a decoder; the LM head node reads tensor `head`
    ("embed" for a tied head in the bundle; the compiler's calibration passes a linear alias).
    `layout` (compiler/lm_head.py): the head's rows stored in its order and the head a `nadoo.LMHead`
    (routable by vocabulary chunk); None: a plain `nadoo.ChunkedLinear` head in token order."""
    c, w = src.config, src.weights
    g = _Graph()
    weights: list[Weight] = []
    gemma = c["norm_style"] == "gemma"

    def scale(name):
        return g.const(name, (w[name] + np.float32(1.0)).astype(np.float32) if gemma else w[name])

    def norm(x, name, out):
        return g.add("RMSNormalization", [x, scale(name)], out, axis=-1, epsilon=float(c["norm_eps"]))

    def linear(x, name, out):
        weights.append(Weight(name, "linear", w[name], out, x, out))
        bias = [g.const(name + "_bias", w[name + "_bias"])] if name + "_bias" in w else []
        return g.add("ChunkedLinear", [x, *bias], out, domain="nadoo", weight=name)

    def gated_mlp(x, p):
        # One op: act(gate·x) ⊙ up·x → down, down stored transposed and chunked by input neuron
        # groups, so activation sparsity reads only the groups a token uses (compiler/gated_ffn.py).
        out = p + "down.out"
        weights.append(Weight(p + "gate", "linear", w[p + "gate"], out, x, p + "gate.out"))
        weights.append(Weight(p + "up", "linear", w[p + "up"], out, x, p + "up.out"))
        weights.append(Weight(p + "down", "ffn_down", np.ascontiguousarray(w[p + "down"].T), out, p + "gated", out))
        biases = [g.const(p + t + "_bias", w[p + t + "_bias"]) if p + t + "_bias" in w else ""
                  for t in ("gate", "up", "down")]
        while biases and not biases[-1]:
            biases.pop()
        return g.add("GatedFFN", [x, *biases], out, domain="nadoo", gate=p + "gate", up=p + "up", down=p + "down",
                     activation=c["activation"])

    def moe_ffn(x, i):
        # The routed experts are one nadoo.MoE node: its experts are stored as chunk groups
        # (lm_moe_layers, write_moe), so a token reads only the experts its router picks.
        m, p = c["moe"], f"layers.{i}.moe"
        y = g.add("MoE", [x, g.const(p + ".router", w[p + ".router"])], p + ".out", domain="nadoo", moe=p,
                  n_experts=m["n_experts"], gated=1, top_k=m["top_k"], activation=c["activation"],
                  softmax_order=m["softmax_order"], normalize=int(m["normalize"]))
        if not m.get("shared_intermediate"):
            return y
        # Qwen2-MoE's shared expert: a dense gated MLP on every token, scaled by sigmoid(x·g).
        s = gated_mlp(x, p + ".shared.")
        gate = g.add("MatMul", [x, g.const(p + ".shared_gate.t", np.ascontiguousarray(w[p + ".shared_gate"].T))],
                     p + ".shared_gate.out")
        s = g.add("Mul", [g.add("Sigmoid", [gate], p + ".shared_gate.sigmoid"), s], p + ".shared.scaled")
        return g.add("Add", [y, s], p + ".sum")

    def qk_full_norm(t, name):  # OLMoE: q/k normalised over the whole projection, before the heads split
        return norm(t, name, name + ".out")

    tied_rows = layout is not None and c["tied_head"]  # the embedding's rows are the head's, reordered
    weights.append(Weight("embed", "gather", w["embed"][layout.order] if tied_rows else w["embed"], "embed",
                          "input_ids", "embed"))
    row_map = [g.const("lm_head.row_of", layout.row_of)] if layout is not None else []
    x = g.add("ChunkedGather", ["input_ids", *row_map[:tied_rows]], "embed", domain="nadoo", weight="embed")
    if c["embed_scale"] != 1.0:
        x = g.add("Mul", [x, g.const("embed_scale", np.float32(c["embed_scale"]))], "embed.scaled")
    for i, kind in enumerate(c["layer_types"]):
        p = f"layers.{i}."
        h = norm(x, p + "attn_norm", p + "attn_norm.out")
        q, k, v = (linear(h, p + f"attn.{t}", p + f"attn.{t}.out") for t in "qkv")
        full = c["qk_norm_full"]
        if full:
            q, k = qk_full_norm(q, p + "attn.q_norm"), qk_full_norm(k, p + "attn.k_norm")
        qk_norms = [scale(p + f"attn.{t}_norm") for t in "qk"] if c["qk_norm"] and not full else []
        window = c["sliding_window"] if kind == "sliding" else 0
        a = g.add("Attention", [q, k, v, "position_ids", f"rope.{kind}.inv_freq", *qk_norms], p + "attn.out",
                  domain="nadoo", heads=c["heads"], kv_heads=c["kv_heads"], head_dim=c["head_dim"],
                  scale=float(c["attn_scale"]), max_positions=c["max_positions"], epsilon=float(c["norm_eps"]),
                  window=window, softcap=float(c["attn_softcap"] or 0.0))
        a = linear(a, p + "attn.o", p + "attn.o.out")
        if c["sandwich_norm"]:
            a = norm(a, p + "post_attn_norm", p + "post_attn_norm.out")
        x = g.add("Add", [x, a], p + "attn.residual")
        h = norm(x, p + "mlp_norm", p + "mlp_norm.out")
        routed = c["ffn"] == "moe" and c["moe"]["layers"][i]
        m = moe_ffn(h, i) if routed else gated_mlp(h, p + "mlp.")
        if c["sandwich_norm"]:
            m = norm(m, p + "post_mlp_norm", p + "post_mlp_norm.out")
        x = g.add("Add", [x, m], p + "mlp.residual")
    for kind in c["rope"]:
        g.const(f"rope.{kind}.inv_freq", w[f"rope.{kind}.inv_freq"])
    # Only the last logits_to_keep positions reach the head: a decode step needs one row of logits.
    start = g.add("Neg", ["logits_to_keep"], "logits.start")
    x = g.add("Slice", [x, start, g.const("logits.end", np.array([INT64_MAX])), g.const("logits.axis", np.array([1]))],
              "logits.rows")
    x = norm(x, "final_norm", "final_norm.out")
    out = "logits" if c["final_softcap"] is None or layout is not None else "logits.raw"
    if head != "embed":  # a tied head in the bundle is the embedding's own tensor, stored once
        rows = w["embed"] if c["tied_head"] else w["head"]
        weights.append(Weight(head, "linear", rows[layout.order] if layout is not None else rows, "head", x, out))
    if layout is not None:  # the softcap is applied inside: rows a routed head does not compute stay -inf
        g.add("LMHead", [x, *row_map, g.const("lm_head.basis", layout.basis), g.const("lm_head.mean", layout.mean)],
              out, domain="nadoo", weight=head, softcap=float(c["final_softcap"] or 0.0))
    else:
        g.add("ChunkedLinear", [x], out, domain="nadoo", weight=head)
    if c["final_softcap"] is not None and layout is None:
        cap = g.const("final_softcap", np.float32(c["final_softcap"]))
        t = g.add("Tanh", [g.add("Div", [out, cap], "logits.div")], "logits.tanh")
        g.add("Mul", [t, cap], "logits")
    graph = {
        "opset": {"": 23, "nadoo": 1},
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [1, "sequence"]},
                   {"name": "position_ids", "dtype": "int64", "shape": [1, "sequence"]},
                   {"name": "logits_to_keep", "dtype": "int64", "shape": [1]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, "kept", c["vocab"]]}],
        "nodes": g.nodes,
        "constants": sorted(g.consts),
    }
    return graph, g.consts, weights


def lm_moe_layers(src) -> list:
    """The MoE nodes' experts (compiler/moe.py MoELayer, stacked [E, F, H] / [E, H, F]), in graph order."""
    from .moe import MoELayer

    c, w = src.config, src.weights
    if c["ffn"] != "moe":
        return []
    m, out = c["moe"], []
    for i, routed in enumerate(m["layers"]):
        if not routed:
            continue
        p = f"layers.{i}.moe"
        stack = lambda t: np.stack([w[f"{p}.experts.{e}.{t}"] for e in range(m["n_experts"])])  # noqa: E731
        out.append(MoELayer(p, p + ".out", stack("gate"), stack("up"), stack("down"), m["top_k"], c["activation"],
                            m["softmax_order"], m["normalize"]))
    return out


def lm_feeds(ids, keep: int = 1, start: int = 0) -> dict:
    ids = np.asarray(ids, np.int64).reshape(1, -1)
    return {"input_ids": ids, "position_ids": np.arange(start, start + ids.shape[1], dtype=np.int64)[None],
            "logits_to_keep": np.array([keep], np.int64)}


# ------------------------------------------------------------------ calibration
def calibration_windows(src, opts: CompileOptions) -> tuple[list[list[int]], str]:
    """Token windows of --calib-len from --calib-text (at most calib_windows, spread over the text; each
    starts with BOS when the model expects one), else a few random-token windows. (windows, note)."""
    c = src.config
    n = min(int(opts.calib_len), c["max_positions"])
    if n < 2:
        raise CompileError("--calib-len must be at least 2 tokens")
    bos = c["bos_id"] if c["add_bos"] else None
    if opts.calib_text is None:
        rng = np.random.default_rng(0)
        wins = [rng.integers(0, c["vocab"], n).tolist() for _ in range(SYNTHETIC_WINDOWS)]
        note = f"SYNTHETIC ({SYNTHETIC_WINDOWS} windows of {n} random tokens; pass --calib-text for a real profile)"
    else:
        if src.tokenizer_json is None:
            raise CompileError("--calib-text needs the model's tokenizer, and this source has none")
        from nadoo.runtime.tokenizer import Tokenizer

        text = read_text(opts.calib_text, "calibration text", CompileError)
        try:
            ids = Tokenizer(src.tokenizer_json, bos_id=c["bos_id"], add_bos=c["add_bos"]).encode(text)
        except NadooError as e:
            raise CompileError(str(e)) from None
        total = len(ids) // n
        if total == 0:
            raise CompileError(f"{opts.calib_text}: {len(ids)} tokens, fewer than one --calib-len window of {n}")
        picks = np.unique(np.linspace(0, total - 1, min(total, max(1, opts.calib_windows))).round().astype(int))
        wins = [ids[i * n:(i + 1) * n] for i in picks]
        note = f"{len(wins)} windows of {n} tokens from {opts.calib_text}"
    if bos is not None:
        wins = [[bos] + w[1:] for w in wins]
    return wins, note


def _calibrate(graph, consts, weights, windows, quiet, moe_cal=None) -> tuple[dict, Plan]:
    """Dense float run over every window: per weight its input moments (importance, GPTQ Hessian)
    and output activity (per expert, in `moe_cal`: routing counts and input moments). The LM head
    sees every position (logits_to_keep 0). Returns the stats and the float plan (for the stored sample)."""
    stats = {w.name: DownStats(w) if w.kind == "ffn_down" else LayerStats(w, False, None) for w in weights}
    ops = dense_builders({w.name: w for w in weights}, stats)
    if moe_cal is not None:
        ops.update(moe_cal.builders())
    plan = Plan(graph, consts, custom_ops=ops, state=SequenceState())
    with _progress("calibrating ", quiet)(windows) as it:
        for win in it:
            plan.run(lm_feeds(win, keep=0))
    return stats, plan


def _head_layout(src, stats, opts: CompileOptions):
    """The head's routed layout from its calibration input moments; the calibration statistics of
    the head and of a tied embedding reordered to match (their chunk profiles follow the stored rows)."""
    from .lm_head import head_layout

    c, w = src.config, src.weights
    st = stats["head"]
    moment = st.hessian()  # E[h hᵀ] over every calibration position (a linear layer's statistics keep it)
    layout = head_layout(w["embed"] if c["tied_head"] else w["head"], moment, opts.embedding_rows, opts.lm_head_sketch)
    st.out.permute(layout.order)
    if c["tied_head"] and stats["embed"].lookups is not None:
        stats["embed"].lookups = stats["embed"].lookups[layout.order]
    return layout


# ------------------------------------------------------------------ compile
_NOT_FOR_LMS = (("calib", "a language model calibrates on text: use --calib-text FILE"),
                ("input_shapes", "--input-shape applies to torch models only"),
                ("model_class", "--model-class applies to state_dict files only"),
                ("prune_tau", "--prune-tau is not supported for language models yet"))


def compile_lm(model_path, out_path, opts: CompileOptions | None = None, quiet: bool = False) -> CompileReport:
    """Compile a GGUF file or a Hugging Face folder into a bundle."""
    from .lm_source import load_lm_source

    opts = opts or CompileOptions()
    for field, msg in _NOT_FOR_LMS:
        if getattr(opts, field):
            raise CompileError(msg)
    t0 = time.perf_counter()
    src = load_lm_source(model_path, allow_pickle=opts.allow_pickle)
    kind = "gguf" if Path(model_path).is_file() else "hf_folder"
    return compile_lm_source(src, out_path, opts, quiet, source=os.path.basename(os.fspath(model_path)),
                             source_kind=kind, t0=t0)


def compile_lm_source(src, out_path, opts: CompileOptions | None = None, quiet: bool = False, *,
                      source: str = "transformers model", source_kind: str = "transformers", t0=None) -> CompileReport:
    opts = opts or CompileOptions()
    t0 = time.perf_counter() if t0 is None else t0
    check_layout_options(opts)
    c = src.config
    windows, calib_note = calibration_windows(src, opts)
    notes = [] if opts.calib_text else ["warning: no --calib-text given; the activity profile comes from random tokens"]

    # Calibrate with the head as a linear tensor of its own name ("head"), also when it is tied: its
    # input moments are what the shared tensor's quantization should weigh.
    cal_graph, consts, cal_weights = lm_graph(src, head="head")
    moe_layers = lm_moe_layers(src)
    moe_cal = MoECalibration(moe_layers) if moe_layers else None
    stats, plan = _calibrate(cal_graph, consts, cal_weights, windows, quiet, moe_cal)
    sample_in = lm_feeds(windows[0], keep=1)
    (sample_logits,) = plan.run(sample_in)
    del plan
    layout = _head_layout(src, stats, opts)
    graph, consts, weights = lm_graph(src, head="embed" if c["tied_head"] else "head", layout=layout)
    rows_per = {"gather": opts.embedding_rows}

    def n_chunks(wt):  # an untied head is chunked like an embedding (vocabulary rows), so it can be routed
        per = opts.embedding_rows if wt.name == "head" else rows_per.get(wt.kind)
        return opts.chunks if per is None else -(-wt.rows // per)

    bounds = {wt.name: down_bounds(wt.rows) if wt.kind == "ffn_down" else _bounds(wt.rows, n_chunks(wt))
              for wt in weights}
    reorder_neurons(weights, stats, consts, bounds, block=opts.group_size)
    # LM layers are not routed yet (activation None in the stats): no layer is marked routable.
    layers = {w.name: stats[w.name].summary(np.asarray(bounds[w.name])) for w in weights}
    alias = {"embed": "head"} if c["tied_head"] else {}

    def quant_args(w):
        st = stats[alias.get(w.name, w.name)]
        kw = _quant_kwargs(st.w, stats, {w.name: st.w} if w.kind == "ffn_down" else {}, opts)
        if w.name in alias:
            # A tied table is also read row by row as the embedding, whose error the head's Hessian
            # does not see; and GPTQ over its 262144 rows (Gemma 3) costs ~230 s per tier against ~30 s
            # for the clipping search. So: the search, weighted by the head's input importance.
            kw.pop("hessian", None)
        return (st.importance() if st.w.kind == "linear" else None), kw

    layouts = compile_layouts(opts.keep_float, opts.nested, opts.codec, opts.tiers)
    tier_bytes = {layout.key: 0 for layout in layouts}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with BundleWriter(out_path, alignment=opts.alignment) as wr:
        graph_pid = wr.add_json(graph)
        const_entry = _write_constants(wr, consts)
        profile_pid = wr.add_json({"samples": len(windows), "source": "calibration text" if opts.calib_text else "synthetic",
                                   "layers": layers, **({"moe": moe_cal.profile()} if moe_cal else {})})
        sample = {"inputs": [_raw(wr, k, v) for k, v in sample_in.items()], "outputs": [_raw(wr, "logits", sample_logits)]}
        tok_pid = wr.add_payload(src.tokenizer_json.encode("utf-8"), compress="always") if src.tokenizer_json else None
        tables_pid = None
        if src.tokenizer_json:
            texts = [read_text(opts.calib_text, "calibration text", CompileError)] if opts.calib_text else []
            tables, tok_note = compact_tables(src.tokenizer_json, texts)
            notes.append(tok_note)
            tables_pid = wr.add_payload(tables, compress="always") if tables is not None else None
        per_tensor = {w.name: _entry(w, bounds[w.name], opts, layers[w.name]) for w in weights}
        for name, fmt in (src.source_formats or {}).items():
            if name in per_tensor:  # NDC 1.4, optional: the format the source file stored the tensor in
                per_tensor[name]["source_format"] = str(fmt)
        for w in weights:
            if w.kind == "ffn_down":
                per_tensor[w.name]["group_size"] = down_group(layouts, opts.group_size)
        _write_weights(wr, [[w] for w in weights], per_tensor, layouts, tier_bytes, quiet, quant_args,
                       lambda g, layout: down_layout(layout) if g[0].kind == "ffn_down" else layout)
        entries = [per_tensor[w.name] for w in weights]
        moe_entries, moe_bytes = write_moe(wr, moe_layers, moe_cal, opts.group_size, layouts, opts.codec)
        for t, nb in moe_bytes.items():
            tier_bytes[t] += nb
        dense_bytes = src.nbytes
        index = {
            "format": "ndc",
            "producer": {"name": "nadoo", "version": __version__},
            "model": {"source": source, "source_kind": source_kind, "family": c["family"]},
            "graph": graph_pid,
            "constants": const_entry,
            "profile": profile_pid,
            "sample": sample,
            "tensors": entries,
            "stats": {"dense_fp32_weight_bytes": dense_bytes, "kept_params_ratio": 1.0, "prune_tau": 0.0,
                      "calibration_samples": len(windows)},
            "lm": {"config": c, "tokenizer": tok_pid, "chat_template": src.chat_template,
                   **({"tokenizer_tables": tables_pid} if tables_pid is not None else {}),
                   "generation": {"bos_id": c["bos_id"], "eos_ids": c["eos_ids"], "pad_id": c["pad_id"],
                                  "add_bos": c["add_bos"]}},
        }
        if moe_entries:  # NDC 1.1 index key (§4.5)
            index["moe"] = moe_entries
        if opts.bits_per_weight:  # mixed precision under a budget (NDC 1.1 "alloc"), by the quantizer's own
            # error per layer (a language model has no measured sensitivity yet: compiler/sensitivity.py runs
            # graphs of calibration samples); a chunk a tier takes exactly (a GGUF's own grid) costs nothing there
            from .allocate import store_allocation

            notes.append(store_allocation(index, lambda p: wr.stored_length(p) if p >= 0 else 0, opts.bits_per_weight))
        wr.finish(index)
    if src.tokenizer_json is None:
        notes.append("note: the source has no tokenizer; generate with --prompt-ids")
    return CompileReport(
        path=out_path, seconds=time.perf_counter() - t0, tensors=len(entries),
        chunks=sum(len(e["bounds"]) - 1 for e in entries), bundle_bytes=os.path.getsize(out_path),
        dense_fp32_weight_bytes=dense_bytes, tier_bytes=tier_bytes, kept_params_ratio=1.0, routable=[],
        calibration=calib_note, notes=[f"language model: {c['family']}, {c['layers']} layers, vocabulary {c['vocab']}"
                                       + (", LM head tied to the embedding" if c["tied_head"] else "")
                                       + (f", {len(moe_layers)} MoE layers x {c['moe']['n_experts']} experts "
                                          f"(top-{c['moe']['top_k']})" if moe_layers else "")] + notes)
