"""The quantizing stage of a compile: every chunk group of every weight encoded at every tier layout
(separate tiers, nested bit-planes, the transposed zero-point layout of a gated MLP's down projection)
and written as payloads, with their ids and sizes recorded in the tensors' index entries. Shared by
compiler/pipeline.py and compiler/lm_compile.py; `_progress` is the compile's one progress bar.
"""
from __future__ import annotations

import contextlib

import numpy as np

from nadoo.runtime.tiers import NestedTiers, SeparateTier, TierLayout, TransposedZeroPointTier, ZeroPointTier

from .rewrite import Weight
from .writer import BundleWriter


def _progress(label: str, quiet: bool):
    import click

    def wrap(items):
        if quiet:
            return contextlib.nullcontext(items)
        return click.progressbar(items, label=label, file=click.get_text_stream("stderr"))
    return wrap


def _write_weights(wr: BundleWriter, groups: list[list[Weight]], per_tensor: dict, layouts: list[TierLayout],
                   tier_bytes: dict, quiet: bool, quant_args, layout_of=None, probe=None) -> None:
    """Every layout of every chunk group, recorded in the tensors' index entries `per_tensor`; the
    stored bytes are added up in `tier_bytes[layout.key]`. quant_args(w) -> (importance, quantizer
    kwargs) of weight w; layout_of(group, layout) -> the layout that group is written in instead (same
    tier). probe: a :class:`~.sensitivity.Sensitivity` measuring each quantized tensor."""
    work = [(g, layout if layout_of is None else layout_of(g, layout)) for g in groups for layout in layouts]
    with _progress("quantizing  ", quiet)(work) as it:
        for group, layout in it:
            imps, qkw = zip(*[quant_args(w) for w in group])
            entries = [per_tensor[w.name] for w in group]
            tier_bytes[layout.key] += _write_layout(wr, group, entries, layout, list(imps), list(qkw), probe)


def _encode_separate(layout: SeparateTier, m: np.ndarray, bounds: list[int], group_size: int, imp, kw: dict):
    if not layout.quantized:  # float32 chunks are packed when written: no whole copy of a large matrix
        return lambda c: (layout.pack(m[bounds[c]:bounds[c + 1]]), {})
    from .quantize import quantize_chunks

    # 8-bit linear layers are already at cos 0.9999 without error feedback: save the compile time
    if layout.bits == 8 and not kw.get("feedback_at_8"):
        kw = {k: v for k, v in kw.items() if k not in ("hessian", "down_hessian")}
    kw = {k: v for k, v in kw.items() if k != "feedback_at_8"}
    out = [([p], {layout.key: err})
           for p, err in quantize_chunks(m, bounds, layout.bits, group_size, imp, codec=layout.codec, **kw)]
    return out.__getitem__


def _encode_nested(layout: NestedTiers, m: np.ndarray, bounds: list[int], group_size: int, imp, kw: dict):
    from .quantize_nested import quantize_nested

    kw = {k: v for k, v in kw.items() if k != "feedback_at_8"}
    return quantize_nested(m, bounds, group_size, imp, **kw).__getitem__


def _encode_transposed(layout: TransposedZeroPointTier, m: np.ndarray, bounds: list[int], group_size: int, imp,
                       kw: dict):
    from .quantize import quantize_chunks_transposed

    # groups along the input axis: the textbook GPTQ with the input's second moment (not at 8 bits, as
    # _encode_separate: no error feedback needed there)
    down_h = kw.get("down_hessian")
    kw = {"method": kw.get("method", "search"), **({"hessian": down_h} if down_h is not None and layout.bits < 8 else {})}
    out = [([p], {layout.key: err}) for p, err in quantize_chunks_transposed(m, bounds, layout.bits, group_size, **kw)]
    return out.__getitem__


# The quantizer of each layout kind: chunk c -> ([its payloads], {tier: errors}) of a matrix.
_ENCODERS = {SeparateTier: _encode_separate, ZeroPointTier: _encode_separate, NestedTiers: _encode_nested,
             TransposedZeroPointTier: _encode_transposed}


def _write_layout(wr: BundleWriter, group: list[Weight], entries: list[dict], layout: TierLayout, imps: list,
                  qkw: list, probe=None) -> int:
    """Write one layout of each chunk of the tensors in `group` (which share chunk bounds), interleaved:
    per chunk, payload 0 (plane A) of every tensor of the group, then payload 1, ..., so a read of a
    neuron group at any tier is one contiguous range. Each tensor is quantized whole, once (GPTQ rows
    are independent given H), then cut into chunks. Returns the stored bytes."""
    bounds = entries[0]["bounds"]
    encoded = []
    for w, e, imp, kw in zip(group, entries, imps, qkw):
        m = w.array.reshape(w.rows, -1)
        encoded.append(_ENCODERS[type(layout)](layout, m, bounds, layout.group(m.shape[1], e["group_size"]), imp, kw)
                       if m.any() else None)
    if probe is not None and layout.quantized:
        for w, e, enc in zip(group, entries, encoded):
            if enc is not None:
                probe.probe(w, layout, enc, bounds, layout.group(w.row_len, e["group_size"]))
    ids = [[[] for _ in range(layout.n_payloads)] for _ in group]
    errs = [{t: {"mse": [], "out_err": []} for t in layout.serves} if layout.quantized else {} for _ in group]
    nbytes = 0
    for c, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        live = [bool(w.array.reshape(w.rows, -1)[lo:hi].any()) for w in group]
        for j in (j for j, f in enumerate(live) if not f):  # all pruned away: empty in every payload list
            for p in ids[j]:
                p.append(-1)
            for er in errs[j].values():
                er["mse"].append(0.0)
                er["out_err"].append(0.0)
        chunk = {j: encoded[j](c) for j, f in enumerate(live) if f}
        for p in range(layout.n_payloads):
            for j, (payloads, _) in chunk.items():
                pid = wr.add_payload(payloads[p])
                ids[j][p].append(pid)
                nbytes += wr.stored_length(pid)
        for j, (_, chunk_errs) in chunk.items():
            for t, er in chunk_errs.items():
                errs[j][t]["mse"].append(er["mse"])
                errs[j][t]["out_err"].append(er["out_err"])
    for e, i, er in zip(entries, ids, errs):
        layout.record(e, i)
        e["errors"].update(er)
    return nbytes
