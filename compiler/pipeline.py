"""`nadoo compile`: load → ONNX graph → rewrite weight ops → calibrate → chunk → prune → quantize → write.

Each step is its own module; this file only wires them together and reports progress.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from nadoo.runtime import __version__
from nadoo.runtime.errors import CompileError
from nadoo.runtime.format import MAX_GROUP_SIZE
from nadoo.runtime.qcodec import ZP_GROUPS
from nadoo.runtime.tiers import CODECS, DEFAULT_CODEC, DEFAULT_TIERS, compile_layouts

from .calib_data import load_calibration, synthetic_calibration
from .calibrate import IMPORTANCE_KINDS, calibrate, dense_builders
from .encoder_attention import fuse_encoder_attention
from .ffn import coactivation_order, fit_sketch, fuse_ffn
from .moe import MoECalibration, extract_moe, verify_moe_graph, write_moe
from .rewrite import Weight, inline_reasons, rewrite_weight_ops
from .sensitivity import Sensitivity
from .write_tiers import _progress, _write_weights  # noqa: F401  (lm_compile imports them from here)
from .writer import BundleWriter


@dataclass
class CompileOptions:
    calib: str | None = None
    chunks: int = 16  # chunks per linear/conv weight
    embedding_rows: int = 64  # rows per chunk of an embedding table
    group_size: int = 64
    keep_float: bool = False
    prune_tau: float = 0.0
    min_elements: int = 1024  # weights smaller than this stay inline
    input_shapes: dict | None = None
    model_class: str | None = None
    allow_pickle: bool = False
    synthetic_samples: int = 32
    route_threshold: float = 0.95  # routable if this share of per-sample energy sits in the top half of chunks
    fuse_ffn: bool = True  # Linear → activation → Linear becomes one neuron-group op
    fuse_attention: bool = True  # an encoder's self-attention subgraph becomes one EncoderAttention op
    reorder: bool = True  # co-activation reordering of FFN neurons before chunking
    sketch_rank: int = 32  # rank of the FFN top-k predictor
    calib_batch: int = 16
    alignment: int = 64
    quant_method: str = "gptq"  # "gptq" (error feedback + clipping search) | "search" | "rtn"
    bits_per_weight: float | None = None  # store a mixed-precision allocation under this budget
    nested: bool = False  # q8/q4/q2 as nested bit-planes of one 8-bit quantization (NDC 1.1 `nested`)
    calib_text: str | None = None  # language models: calibration text, tokenized (compiler/lm_compile.py)
    calib_len: int = 128  # tokens per calibration window of a language model
    calib_windows: int = 32  # at most this many windows, spread over the text
    codec: str = DEFAULT_CODEC  # separate quantized tiers: "zp" (integer zero points, NDC 1.2) | "minmax" (1.1)
    tiers: tuple = DEFAULT_TIERS  # quantized tiers to store, of those the codec has (e.g. ("q8", "q5", "q4"))
    lm_head_sketch: float = 0.3  # language models: the routed head's basis, a share of the hidden size
    awq: bool = True  # activation-aware per-channel scaling of linear inputs before quantizing (compiler/awq.py)


@dataclass
class CompileReport:
    path: str
    seconds: float
    tensors: int
    chunks: int
    bundle_bytes: int
    dense_fp32_weight_bytes: int
    tier_bytes: dict
    kept_params_ratio: float
    routable: list
    calibration: str
    prune_tau: float = 0.0
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        mb = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
        lines = [
            f"wrote {self.path}: {self.tensors} chunked tensors, {self.chunks} chunks, {mb(self.bundle_bytes)} "
            f"({self.bundle_bytes / max(self.dense_fp32_weight_bytes, 1):.2f}x the {mb(self.dense_fp32_weight_bytes)} of fp32 weights) "
            f"in {self.seconds:.1f} s",
            "bytes per tier: " + ", ".join(f"{t} {mb(b)}" for t, b in self.tier_bytes.items()),
            f"calibration: {self.calibration}; routable layers: {len(self.routable)}"
            + (f" ({', '.join(self.routable[:4])}{', …' if len(self.routable) > 4 else ''})" if self.routable else ""),
        ]
        if self.kept_params_ratio < 1 and self.prune_tau > 0:
            lines.append(f"boundary pruning kept {self.kept_params_ratio:.1%} of the chunked parameters")
        return "\n".join(lines + self.notes)


def _bounds(rows: int, n: int) -> list[int]:
    n = max(1, min(n, rows))
    return [round(i * rows / n) for i in range(n + 1)]


def check_layout_options(opts: CompileOptions) -> None:
    """The chunking and quantization options every compile (models, language models) checks first."""
    if opts.group_size < 1 or opts.chunks < 1 or opts.embedding_rows < 1:
        raise CompileError("--group-size, --chunks and --embedding-rows must be positive")
    if opts.group_size > MAX_GROUP_SIZE:
        raise CompileError(f"--group-size must be at most {MAX_GROUP_SIZE} (the format's cap)")
    if opts.codec not in CODECS:
        raise CompileError(f"unknown quantization codec {opts.codec!r} ({' or '.join(CODECS)})")
    if not opts.nested and not any(t in CODECS[opts.codec] for t in opts.tiers):
        raise CompileError(f"the {opts.codec} codec stores none of the tiers {', '.join(opts.tiers) or '(none)'} "
                           f"(it has {', '.join(CODECS[opts.codec])})")
    if opts.codec == "zp" and opts.group_size not in ZP_GROUPS:
        raise CompileError(f"--group-size must be one of {', '.join(map(str, ZP_GROUPS))} for the zp codec "
                           f"(got {opts.group_size})")


def compile_model(model_path: str, out_path: str, opts: CompileOptions | None = None, quiet: bool = False) -> CompileReport:
    from .load import load_model
    from .onnx_to_graph import onnx_to_graph

    opts = opts or CompileOptions()
    check_layout_options(opts)
    if not 0 <= opts.prune_tau < 1:
        raise CompileError("--prune-tau must be in [0, 1)")
    t0 = time.perf_counter()
    notes = []
    calib = load_calibration(opts.calib) if opts.calib else None
    loaded = load_model(model_path, example_inputs=calib, input_shapes=opts.input_shapes,
                        model_class=opts.model_class, allow_pickle=opts.allow_pickle)
    if calib is not None:
        calib = load_calibration(opts.calib, loaded.input_specs)
        calib_note = f"{len(next(iter(calib.values())))} samples from {opts.calib}"
    else:
        calib = synthetic_calibration(loaded.input_specs, n=opts.synthetic_samples)
        calib_note = f"SYNTHETIC ({opts.synthetic_samples} random samples; pass --calib for a real activity profile)"
        notes.append("warning: no --calib given; the activity profile comes from random inputs")
    graph, consts = onnx_to_graph(loaded.onnx_model)
    ref_graph, ref_consts = graph, consts
    # Every float constant of the source graph is a weight (chunked or inline): the dense reference.
    dense_bytes = 4 * sum(int(a.size) for a in consts.values() if a.dtype.kind == "f")
    if opts.fuse_attention:
        graph, consts, n_fused = fuse_encoder_attention(graph, consts, {k: v[:2] for k, v in calib.items()})
        if n_fused:
            notes.append(f"encoder attention: {n_fused} layers fused into EncoderAttention (verified on the sample)")
    graph, consts, weights = rewrite_weight_ops(graph, consts, opts.min_elements)
    # expert weights leave the constants; each expert becomes a chunk group (compiler/moe.py)
    graph, consts, moe_layers = extract_moe(graph, consts)
    moe_cal = MoECalibration(moe_layers)
    ffns = []
    if opts.fuse_ffn:
        graph, weights, ffns = fuse_ffn(graph, consts, weights)
    bounds = {w.name: _bounds(w.rows, -(-w.rows // opts.embedding_rows) if w.kind == "gather" else opts.chunks)
              for w in weights}

    n = len(next(iter(calib.values())))
    with _progress("calibrating ", quiet)(range(0, n, opts.calib_batch)) as it:
        stats = calibrate(graph, consts, weights, calib, opts.calib_batch, progress=lambda _: it,
                          extra_ops=moe_cal.builders())
    if moe_layers:  # the exported graph must compute what the torch model computes
        s_in = {k: np.ascontiguousarray(v[:2]) for k, v in calib.items()}
        err = verify_moe_graph(graph, consts, weights, moe_cal, s_in, _reference_outputs(loaded, ref_graph, ref_consts, s_in))
        notes.append(f"MoE: {len(moe_layers)} layers x {moe_layers[0].n_experts} experts (top-{moe_layers[0].top_k}); "
                     f"exported graph matches the source model (relative error {err:.1e})")
    if opts.awq and not moe_layers:  # exact rescaling (every tier computes the source's function)
        from .awq import apply_awq

        graph, awq_notes = apply_awq(graph, consts, weights, stats, opts.group_size, opts.codec)
        notes += awq_notes
    for f in ffns:
        _prepare_ffn(f, stats[f["up"].name], consts, graph, bounds, opts)
    layers = {}
    for w in weights:
        if w.kind == "ffn_down":
            continue
        layers[w.name] = stats[w.name].summary(np.asarray(bounds[w.name]), route_threshold=opts.route_threshold)
    for f in ffns:
        up = f["up"].name
        layers[f["down"].name] = {"kind": "ffn_down", "group_of": up, "routable": layers[up]["routable"],
                                  **ffn_sparsity_curve(f, stats[up], consts)}

    # The stored sample: first calibration sample and the *source* model's fp32 output for it.
    sample_in = {k: np.ascontiguousarray(v[:1]) for k, v in calib.items()}
    sample_out = _reference_outputs(loaded, ref_graph, ref_consts, sample_in)

    kept, total = 0, 0
    for w in weights:
        if opts.prune_tau > 0:
            cut = opts.prune_tau * float(np.abs(w.array).max())
            w.array = np.where(np.abs(w.array) < cut, np.float32(0), w.array)
        kept += int(np.count_nonzero(w.array))
        total += w.array.size

    layouts = compile_layouts(opts.keep_float, opts.nested, opts.codec, opts.tiers)
    tier_bytes = {layout.key: 0 for layout in layouts}
    entries = []
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with BundleWriter(out_path, alignment=opts.alignment) as wr:
        graph_pid = wr.add_json(graph)
        const_entry = _write_constants(wr, consts, inline_reasons(graph, consts, opts.min_elements))
        profile_pid = wr.add_json({"samples": n, "source": "synthetic" if opts.calib is None else "calibration file",
                                   "layers": layers, **({"moe": moe_cal.profile()} if moe_layers else {})})
        sample = {
            "inputs": [_raw(wr, k, v) for k, v in sample_in.items()],
            "outputs": [_raw(wr, k, v) for k, v in sample_out.items()],
        }
        # An FFN's up and down chunks are written interleaved (up_i, down_i, ...) per tier, so a
        # neuron group is one contiguous range: one positioned read serves both halves.
        downs = {f["up"].name: f["down"] for f in ffns}
        groups = [[w] + ([downs[w.name]] if w.name in downs else []) for w in weights if w.kind != "ffn_down"]
        per_tensor: dict[str, dict] = {w.name: _entry(w, bounds[w.name], opts, layers[w.name]) for w in weights}
        # the allocation minimises measured output error (compiler/sensitivity.py); MoE graphs keep the proxy
        probe = Sensitivity(graph, consts, weights, calib) if opts.bits_per_weight and not moe_layers else None
        _write_weights(wr, groups, per_tensor, layouts, tier_bytes, quiet,
                       lambda w: (stats[w.name].importance() if w.kind in IMPORTANCE_KINDS else None,
                                  _quant_kwargs(w, stats, downs, opts)), probe=probe)
        entries = [per_tensor[w.name] for w in weights]
        moe_entries, moe_bytes = write_moe(wr, moe_layers, moe_cal, opts.group_size, layouts, opts.codec)
        for t, nb in moe_bytes.items():
            tier_bytes[t] += nb
        index = {
            "format": "ndc",
            "producer": {"name": "nadoo", "version": __version__},
            "model": {"source": os.path.basename(os.fspath(model_path)), "source_kind": loaded.source_kind},
            "graph": graph_pid,
            "constants": const_entry,
            "profile": profile_pid,
            "sample": sample,
            "tensors": entries,
            "stats": {"dense_fp32_weight_bytes": dense_bytes, "kept_params_ratio": kept / max(total, 1),
                      "prune_tau": opts.prune_tau, "calibration_samples": n},
        }
        if opts.bits_per_weight:  # mixed precision under a budget (NDC 1.1 key "alloc")
            from .allocate import store_allocation

            notes.append(store_allocation(index, lambda p: wr.stored_length(p) if p >= 0 else 0, opts.bits_per_weight,
                                          probe.errors if probe is not None else None))
        if moe_entries:  # NDC 1.1 index key, ignored by readers that do not know it
            index["moe"] = moe_entries
        wr.finish(index)
    return CompileReport(
        path=out_path, seconds=time.perf_counter() - t0, tensors=len(entries),
        chunks=sum(len(e["bounds"]) - 1 for e in entries), bundle_bytes=os.path.getsize(out_path),
        dense_fp32_weight_bytes=dense_bytes, tier_bytes=tier_bytes, kept_params_ratio=kept / max(total, 1),
        routable=[k for k, v in layers.items() if v["routable"] and v["kind"] != "ffn_down"], calibration=calib_note, prune_tau=opts.prune_tau,
        notes=notes + list(loaded.warnings),
    )


def _entry(w: Weight, bounds: list[int], opts: CompileOptions, layer: dict) -> dict:
    a = np.abs(w.array.reshape(w.rows, -1))
    return {
        "name": w.name, "kind": w.kind, "shape": list(w.array.shape), "group_size": opts.group_size,
        "bounds": bounds, "tiers": {}, "errors": {}, "routable": layer["routable"],
        "absmax": float(a.max()), "chunk_absmax": np.maximum.reduceat(a.max(1), bounds[:-1]).astype(float).tolist(),
        "kept_ratio": float(np.count_nonzero(a) / a.size), "prune_tau": opts.prune_tau,
    }


def _quant_kwargs(w: Weight, stats: dict, downs: dict, opts: CompileOptions) -> dict:
    """Quantizer options for one weight: GPTQ needs the second moment of the weight's input."""
    if opts.quant_method not in ("gptq", "search", "rtn"):
        raise CompileError(f"unknown quantization method {opts.quant_method!r} (gptq, search or rtn)")
    method = "rtn" if opts.quant_method == "rtn" else "search"
    if opts.quant_method != "gptq":
        return {"method": method}
    if w.kind == "ffn_down":
        up = next((u for u, d in downs.items() if d is w), None)
        st = stats.get(up)
        h = st.down_hessian() if st is not None and hasattr(st, "down_hessian") else None
        return {"method": method, **({"down_hessian": h} if h is not None else {})}
    st = stats.get(w.name)
    if w.kind in ("linear", "ffn_up", "conv") and st is not None and hasattr(st, "hessian"):
        h = st.hessian()
        if h is not None:
            # a conv's error feedback also at 8 bits: BatchNorm CNNs amplify 8-bit weight noise (README
            # "Model zoo"), and its patches are short (compiler/conv_moment.py)
            return {"method": method, "hessian": h, **({"feedback_at_8": True} if w.kind == "conv" else {})}
    return {"method": method}


def _input_moment(st) -> np.ndarray:
    """E[xᵀx] of an FFN's input: the calibration Hessian when recorded, else from the row subsample."""
    H = st.hessian() if hasattr(st, "hessian") else None
    if H is None:
        x = np.concatenate(st.x_rows).astype(np.float64)
        H = x.T @ x / max(len(x), 1)
    return H


def _prepare_ffn(f: dict, st, consts: dict, graph: dict, bounds: dict, opts: CompileOptions) -> None:
    """Reorder an FFN's neurons by co-activation (exact permutation) and attach its predictor."""
    up, down = f["up"], f["down"]
    n_chunks = len(bounds[up.name]) - 1
    if opts.reorder and st.h_rows:
        perm = coactivation_order(np.concatenate(st.h_rows), n_chunks)
        up.array = np.ascontiguousarray(up.array[perm])
        down.array = np.ascontiguousarray(down.array[perm])
        if f["bias"]:
            consts[f["bias"]] = np.ascontiguousarray(consts[f["bias"]].reshape(-1)[perm])
        st.permute(perm)
    node = f["node"]
    names = [f"{up.name}.sketch_p", f"{up.name}.sketch_q", f"{up.name}.down_energy"]
    if st.x_rows and opts.sketch_rank > 0:
        P, Q = fit_sketch(_input_moment(st), up.array, opts.sketch_rank)
        # float16 halves the predictor's bytes (read at open); it only ranks groups, so its precision is ample
        consts[names[0]], consts[names[1]] = P.astype(np.float16), Q.astype(np.float16)
    else:
        names[0] = names[1] = ""
    consts[names[2]] = np.einsum("rn,rn->r", down.array, down.array).astype(np.float32)
    node["inputs"] = node["inputs"][:3] + names
    graph["constants"] = sorted(set(graph["constants"]) | {x for x in names if x})


def ffn_sparsity_curve(f: dict, st, consts: dict) -> dict:
    """The activation-sparsity curve of a fused FFN (runtime/ffn_sparsity.py) from its calibration
    input subsample, in the stored (reordered) neuron order."""
    from nadoo.runtime.activations import activation
    from nadoo.runtime.ffn_sparsity import PROFILE_KEY, calibration_curve

    if not st.x_rows:
        return {}
    z = np.concatenate(st.x_rows).astype(np.float32) @ f["up"].array.T
    if f["bias"]:
        z += consts[f["bias"]].reshape(-1)
    return {PROFILE_KEY: calibration_curve(activation(f["activation"])(z), f["down"].array)}


def _write_constants(wr: BundleWriter, consts: dict, reasons: dict | None = None) -> dict | None:
    """The constants table; `reasons`: why a large float constant was not chunked (§4, inline_reason)."""
    if not consts:
        return None
    blob, table = bytearray(), []
    for name in sorted(consts):
        a = np.asarray(consts[name])  # not ascontiguousarray: that turns 0-d into 1-d
        if a.dtype.name not in ("float32", "float16", "float64", "int8", "int16", "int32", "int64", "uint8",
                                "uint16", "uint32", "uint64", "bool"):
            raise CompileError(f"constant {name} has unsupported dtype {a.dtype}")
        blob += b"\0" * (-len(blob) % 16)  # 16-byte aligned so numpy views are aligned
        table.append({"name": name, "dtype": a.dtype.name, "shape": list(a.shape), "offset": len(blob),
                      **({"inline_reason": reasons[name]} if reasons and name in reasons else {})})
        blob += a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
    return {"payload": wr.add_payload(bytes(blob)), "tensors": table}


def _raw(wr: BundleWriter, name: str, a: np.ndarray) -> dict:
    a = np.asarray(a)
    return {"name": name, "dtype": a.dtype.name, "shape": list(a.shape), "payload": wr.add_array(a)}


def _reference_outputs(loaded, graph, consts, inputs: dict) -> dict:
    """The source model's fp32 output: torch for torch sources, else the ONNX graph itself."""
    names = [o["name"] for o in graph["outputs"]]
    if loaded.torch_module is not None:
        out = loaded.run_torch(inputs)
        return {k: np.asarray(out[k], np.float32) if np.asarray(out[k]).dtype.kind == "f" else np.asarray(out[k]) for k in names}
    from nadoo.runtime.engine import Plan

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = Plan(graph, consts).run(inputs)
    return dict(zip(names, outs))


__all__ = ["CompileOptions", "CompileReport", "check_layout_options", "compile_model", "dense_builders"]
