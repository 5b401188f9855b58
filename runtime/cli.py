"""The `nadoo` command line. Every user-caused failure prints one line and exits with code 2.

Over 400 lines on purpose: run, info, export, generate and perplexity share option sets (engine, bits,
budget, the LM options) and the one-line error handling defined here, and each command is only its
options plus a call into the runtime; `compile` is the compiler package's (compiler/cli_compile.py)."""

from __future__ import annotations

import functools
import json
import os
import sys

# Batch-1 inference is many small matrix products: on a 2-core machine a multi-threaded BLAS spends
# more time waking threads than computing (measured 15 ms vs 35 ms on MiniLM). Must be set before
# NumPy is imported; a user's explicit setting wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import click  # noqa: E402

from .errors import NadooError


def _friendly(fn):
    """Turn nadoo's errors (and the usual OS/data errors) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NadooError as e:
            click.echo(f"nadoo: error: {e}", err=True)
            sys.exit(2)
        except (OSError, ValueError, MemoryError) as e:
            click.echo(f"nadoo: error: {type(e).__name__}: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("nadoo: interrupted", err=True)
            sys.exit(130)

    return wrapper


class _OneLineGroup(click.Group):
    """Click's own usage errors (missing argument, bad option value) print three lines ("Usage: ...",
    "Try ...", "Error: ..."); here they are one line and exit 2, like every other error."""

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        try:
            rv = super().main(args, prog_name or "nadoo", standalone_mode=False, **extra)
        except click.UsageError as e:
            where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.echo(f"nadoo: error: {' '.join(e.format_message().split())}{where}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"nadoo: error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(2)
        except click.Abort:  # Ctrl-C outside a command
            click.echo("nadoo: interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nadoo")
def main():
    """nadoo: compile models into chunked .ndc bundles and run them reading only what an input needs."""


@main.command()
@click.argument("bundle", type=click.Path(dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print the same facts as one JSON object.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Draw the calibration activity heatmap to this PNG.")
@_friendly
def info(bundle, as_json, plot):
    """Show what is inside BUNDLE and how the model behaved during calibration."""
    from .files import refuse_overwrite
    from .info import bundle_facts, format_facts
    from .reader import Bundle

    refuse_overwrite(plot, {"bundle": bundle}, "--plot")
    with Bundle.open(bundle) as b:
        facts = bundle_facts(b)
    if plot:
        from .plot import plot_profile

        plot_profile(facts, plot)
    if as_json:
        click.echo(json.dumps(facts, indent=1, default=_jsonable))
    else:
        click.echo(format_facts(facts))
        if plot:
            click.echo(f"wrote {plot}")


def _parse_topk(text):
    if text is None:
        return None
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither a chunk count nor a fraction") from None


def _load_inputs(path, session) -> dict:
    from .errors import InputError
    from .files import load_arrays

    arrays = load_arrays(path, "input file", InputError)
    if isinstance(arrays, dict):
        return arrays
    names = [i.name for i in session.get_inputs()]
    if len(names) != 1:  # an .npy, whatever its name
        raise InputError(f"{path} holds one array; this model takes {names} (use an .npz keyed by input name)")
    return {names[0]: arrays}


_BITS_FOR = click.option("--bits-for", multiple=True, metavar="PATTERN=BITS",
                         help="Precision of the tensors whose names match PATTERN (shell-style; `nadoo info` lists "
                              "them) over --bits, e.g. --bits 4 --bits-for embed=8; repeatable, the first match wins.")


def _engine_options(fn):
    """--engine, --threads, --ort-int8: which engine runs the dense part of the plan (runtime/ort_engine.py)."""
    fn = click.option("--ort-int8", is_flag=True, help="ORT engine: 4/8/2-bit linear layers with int8 activations "
                      "(MatMulNBits accuracy_level 4): faster, activations rounded per block as llama.cpp's "
                      "quantized products do; default: exact float products.")(fn)
    fn = click.option("--threads", type=click.IntRange(1), help="ORT engine: intra-op threads of ONNX Runtime "
                      "(default: ORT's own, one per core).")(fn)
    return click.option("--engine", type=click.Choice(["auto", "numpy", "ort"]), default="auto", show_default=True,
                        help="ort: dense layers and standard operators in ONNX Runtime, per-input selection, "
                             "attention state and budgeted streaming in NumPy; auto: ort where onnxruntime "
                             "and onnx are installed, else numpy.")(fn)


def _ffn_sparsity(fn):
    """--ffn-sparsity / --ffn-fallback / --neuron-window, passed to the command as one `ffn` dict of Policy fields."""
    import functools

    @click.option("--ffn-sparsity", default=0.0, show_default=True, type=float,
                  help="Language models: model-wide share (0..0.9) of MLP neurons skipped per token by calibrated "
                       "per-layer activation thresholds; 0 = dense.")
    @click.option("--ffn-fallback", default=0.05, show_default=True, type=float,
                  help="With --ffn-sparsity: a token whose layer has fewer than this share of neurons below the "
                       "threshold computes that layer dense.")
    @click.option("--neuron-window", default=0, show_default=True, type=int,
                  help="Under --memory-budget: each gated MLP keeps the down-projection neuron groups the last N "
                       "tokens used (beside the budget; --json: ffn_window_bytes), so a token reads only the groups "
                       "it needs that are not held. Without a budget every weight stays resident anyway: no effect.")
    @functools.wraps(fn)
    def wrapper(*args, ffn_sparsity, ffn_fallback, neuron_window, **kw):
        return fn(*args, ffn={"ffn_sparsity": ffn_sparsity, "ffn_fallback": ffn_fallback,
                              "neuron_window": neuron_window}, **kw)
    return wrapper


def _encoder_attention(fn):
    """--attention / --attention-blocks / --block of `run`, passed as one `encoder_attention` dict of
    block_attention.BlockAttentionPolicy fields."""
    import functools

    @click.option("--attention", "enc_attention", type=click.Choice(["dense", "blocks"]), default="dense",
                  show_default=True, help="Encoders (EncoderAttention layers): dense reads every key; blocks reads, "
                  "per query block, its own block, the first block and the best-scored key blocks (min/max key "
                  "bounds), --attention-blocks of them in all.")
    @click.option("--attention-blocks", type=float, help="With --attention blocks: share of the key blocks each "
                  "query block reads, in (0, 1] (1 = dense).")
    @click.option("--block", type=int, help="With --attention blocks: positions per block (default 32).")
    @functools.wraps(fn)
    def wrapper(*args, enc_attention, attention_blocks, block, **kw):
        return fn(*args, encoder_attention={"kind": enc_attention, "share": attention_blocks, "block": block}, **kw)
    return wrapper


@main.command()
@click.argument("bundle", type=click.Path(dir_okay=True))
@click.option("--input", "input_path", type=click.Path(), help="Inputs: .npz keyed by graph input name, or .npy for a single-input model. Without it, the sample stored at compile time is run and checked against the source model's output.")
@click.option("--output", "output_path", type=click.Path(dir_okay=False), help="Write the outputs to this .npz.")
@click.option("--policy", type=click.Choice(["dense", "topk"]), default="dense", show_default=True, help="dense: every chunk; topk: only the most active chunks of routable layers.")
@click.option("--bits", type=click.Choice(["8", "6", "5", "4", "3", "2", "float", "auto", "alloc", "source"]), default="8", show_default=True, help="Weight precision; float needs a bundle compiled with --keep-float; auto: hot chunks 8, warm 4, cold 2 bits; alloc: the allocation stored by compile --bits-per-weight; source: each tensor at the precision its GGUF file stored it (Q8_0 at 8 bits, Q5_0 at 5, ...).")
@click.option("--topk", "topk", help="With --policy topk: chunks kept per routable layer, a count (4) or a fraction (0.5).")
@click.option("--predictor", type=click.Choice(["auto", "sketch", "static", "oracle"]), default="auto", show_default=True, help="How topk ranks chunks: sketch = low-rank predictor stored in the bundle (per input); static = calibration profile; oracle = exact product (reads all, for measuring recall); auto = sketch where available.")
@click.option("--tau", default=0.0, show_default=True, help="Boundary pruning at run time: |w| < tau*max|W| dropped; chunks below it never read.")
@click.option("--fallback", default=0.0, show_default=True, help="Run a routable layer dense when its calibration concentration is below this (0..1).")
@click.option("--memory-budget", help="Hard bound on cached (decoded) weight bytes, e.g. 16MB.")
@click.option("--repeat", default=1, show_default=True, help="Run this many times (warm runs reuse the cache); stats are for the last run.")
@click.option("--json", "as_json", is_flag=True, help="Print the run statistics as one JSON object.")
@click.option("--stats", is_flag=True, help="Print the run statistics as a table.")
@click.option("--disable-experts", help="MoE: never route to these experts, LAYER:EXPERT,... (routing renormalized over the rest).")
@click.option("--only-experts", help="MoE: in each named layer route only to these experts, LAYER:EXPERT,...")
@click.option("--prefetch", is_flag=True, help="MoE: load the next layer's likely experts (its router on this layer's input) ahead of use.")
@_BITS_FOR
@_ffn_sparsity
@_encoder_attention
@_engine_options
@_friendly
def run(bundle, input_path, output_path, policy, bits, topk, predictor, tau, fallback, memory_budget, repeat, as_json, stats,
        disable_experts, only_experts, prefetch, bits_for, ffn, engine, threads, ort_int8, encoder_attention):
    """Run BUNDLE (NumPy, dense parts in ONNX Runtime with --engine ort), reading only the chunks the policy selects."""
    import time

    import numpy as np

    from .files import refuse_overwrite
    from .policy import Policy
    from .session import Session

    refuse_overwrite(output_path, {"bundle": bundle, "input file": input_path})
    t0 = time.perf_counter()
    pol = Policy(kind=policy, bits=bits, topk=_parse_topk(topk), predictor=predictor, tau=tau, fallback=fallback,
                 disable_experts=disable_experts, only_experts=only_experts, prefetch=prefetch, bits_for=list(bits_for),
                 encoder_attention=encoder_attention, **ffn)
    with Session(bundle, policy=pol, memory_budget=memory_budget, engine=engine, threads=threads,
                 ort_int8=ort_int8) as sess:
        ref = None
        if input_path:
            feeds = _load_inputs(input_path, sess)
        else:
            s = sess.sample()
            if s is None:
                raise NadooError("bundle stores no sample input; pass --input")
            feeds, ref = s
        for _ in range(max(1, repeat)):
            outs = sess.run(None, feeds)
        st = dict(sess.last_stats)
        st["open_bytes"] = sess.open_bytes
        st["wall_s"] = time.perf_counter() - t0
        names = [o.name for o in sess.get_outputs()]
        if ref is not None:
            st["check"] = {}
            for n, y in zip(names, outs):
                r = ref.get(n)
                if r is None or r.dtype.kind != "f":
                    continue
                a, b = y.reshape(-1).astype(np.float64), r.reshape(-1).astype(np.float64)
                cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
                st["check"][n] = {"max_abs_err": float(np.max(np.abs(a - b))), "cosine": cos}
        if output_path:
            _save_npz(output_path, dict(zip(names, outs)))
    if as_json:
        click.echo(json.dumps(st, default=_jsonable))
        return
    if ref is not None:
        for n, c in st["check"].items():
            click.echo(f"sample check {n}: cosine {c['cosine']:.6f}, max |err| {c['max_abs_err']:.3g} vs the source model")
    elif not output_path:
        for n, y in zip(names, outs):
            click.echo(f"{n}: {y.dtype}{list(y.shape)} {np.array2string(y.reshape(-1)[:8], precision=4)}{' …' if y.size > 8 else ''}")
    mib = st["bytes_read"] / 2**20
    dense = st["dense_fp32_weight_bytes"] or 1
    click.echo(f"read {mib:.2f} MiB ({st['bytes_read'] / dense:.1%} of the fp32 weights), "
               f"{st['chunks_read']}/{st['chunks_total']} chunks, {st['macs'] / max(st['dense_macs'], 1):.1%} of dense MACs, "
               f"{st['latency_s'] * 1e3:.1f} ms")
    from .chunked import REGISTRY

    for line in filter(None, (cls.summary(st) for cls in REGISTRY.values())):
        click.echo(line)
    if stats:
        click.echo(format_stats(st))


_BITS = click.option("--bits", type=click.Choice(["8", "6", "5", "4", "3", "2", "float", "auto", "alloc", "source"]), default="8", show_default=True,
                     help="Weight precision, as for run.")
_BUDGET = click.option("--memory-budget", help="Hard bound on cached (decoded) weight bytes, e.g. 64MB.")
_LM_HEAD = [click.option("--lm-head", type=click.Choice(["dense", "topk"]), default="dense", show_default=True,
                         help="topk: exact logits only for the vocabulary chunks that can matter (greedy: the argmax "
                              "certified equal to the dense one; sampling: all but --lm-head-epsilon of the probability "
                              "mass; other logits -inf). Needs a bundle compiled with the routed head layout."),
            click.option("--lm-head-k", default=4, show_default=True, type=click.IntRange(1),
                         help="With --lm-head topk: chunks computed exactly before the bound decides what else to read."),
            click.option("--lm-head-epsilon", default=1e-3, show_default=True,
                         type=click.FloatRange(0, 1, min_open=True, max_open=True),
                         help="With --lm-head topk and sampling: the probability mass the unread chunks may hold at most.")]


def _lm_head_options(fn):
    for opt in reversed(_LM_HEAD):
        fn = opt(fn)
    return fn

_ATTENTION_OPTIONS = [
    click.option("--attention", type=click.Choice(["dense", "window", "pages", "sparq", "heavy", "oracle"]),
                 default="dense", show_default=True, help="Which cached keys each query reads: dense all; window sinks "
                 "+ recent (evicts); pages the best pages by their min/max bounds + sinks + recent; sparq the best keys "
                 "by exact score among candidates scored on a few coordinates + sinks + recent; heavy sinks + recent + "
                 "most attended (evicts); oracle the exact top keys (measuring)."),
    click.option("--kv-budget", type=int, help="With a sparse --attention: keys one query reads per layer."),
    click.option("--sink", type=int, help="First positions always read (default 4)."),
    click.option("--window", type=int, help="Most recent keys always read (default: window budget-sink, pages "
                 "budget/8, heavy budget/2)."),
    click.option("--page", type=int, help="With --attention pages: keys per page (default 16)."),
    click.option("--candidates", type=int, help="With --attention pages: keys the bound's pages offer (beyond sinks "
                 "and window); their keys are read and scored exactly, and the best of them are attended. sparq: "
                 "keys its first stage passes on (default 1.5 x budget)."),
    click.option("--components", type=int, help="With --attention sparq: coordinates of each key its first stage "
                 "reads (default 16)."),
    click.option("--attention-scope", type=click.Choice(["global", "all"]), default="global", show_default=True,
                 help="global: only full-attention layers (native sliding windows stay exact); all: every layer."),
    click.option("--kv-dtype", type=click.Choice(["float32", "float16", "int8"]), default="float32",
                 show_default=True, help="Storage of the KV cache (int8: one scale per key and head)."),
]


def _attention_options(fn):
    for opt in reversed(_ATTENTION_OPTIONS):
        fn = opt(fn)
    return fn


def _lm_options(fn):
    """--bits, --bits-for, --memory-budget, the attention, FFN sparsity and engine options: what generate and
    perplexity share."""
    return _BITS(_BITS_FOR(_BUDGET(_attention_options(_ffn_sparsity(_engine_options(fn))))))


def _attention_policy(attention, kv_budget, sink, window, page, candidates, components, attention_scope, kv_dtype):
    from .sparse_attention import AttentionPolicy

    return AttentionPolicy(attention, kv_budget, sink, window, page, attention_scope, kv_dtype, candidates,
                           components)


def _parse_ids(text):
    if text is None:
        return None
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of token ids") from None


@main.command()
@click.argument("bundle", type=click.Path(dir_okay=True))
@click.option("--prompt", help="Text to continue (needs the tokenizers package).")
@click.option("--prompt-ids", callback=lambda c, p, v: _parse_ids(v), help="Token ids to continue, e.g. 2,651,6037.")
@click.option("--chat", is_flag=True, help="--prompt is a user message: format it with the bundle's chat template (needs jinja2).")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1), help="Stop after this many new tokens.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0), help="0: greedy; else sample from softmax(logits / T).")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0), help="Sample among the k most likely tokens (0: all).")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True), help="Sample from the smallest set of tokens whose probability reaches p.")
@click.option("--seed", type=click.IntRange(0), help="Seed of the sampler (reproducible samples).")
@click.option("--no-eos", is_flag=True, help="Do not stop at an end-of-sequence token.")
@_lm_options
@_lm_head_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, token ids, speed, bytes read, per-layer stats) instead of streaming.")
@_friendly
def generate(bundle, prompt, prompt_ids, chat, max_new_tokens, temperature, top_k, top_p, seed, no_eos, bits, bits_for,
             memory_budget, lm_head, lm_head_k, lm_head_epsilon, as_json, ffn, engine, threads, ort_int8, **attention):
    """Continue a prompt with the language model in BUNDLE, streaming the text as it is produced."""
    from .policy import Policy
    from .session import Session

    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of --prompt and --prompt-ids")
    if chat and prompt is None:
        raise click.UsageError("--chat formats a text --prompt")
    policy = Policy(bits=bits, bits_for=list(bits_for), attention=_attention_policy(**attention), lm_head=lm_head,
                    lm_head_k=lm_head_k, lm_head_epsilon=lm_head_epsilon, **ffn)
    with Session(bundle, policy=policy, memory_budget=memory_budget, engine=engine, threads=threads,
                 ort_int8=ort_int8) as sess:
        said = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
        stream = sess.stream(**said, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p, seed=seed, stop_at_eos=not no_eos)
        for tok in stream:
            if not as_json:
                click.echo(tok.text if tok.text is not None else f" {tok.id}", nl=False)
                sys.stdout.flush()
        if as_json:
            click.echo(json.dumps(stream.result.as_dict(), default=_jsonable))
        else:
            click.echo()


@main.command()
@click.argument("bundle", type=click.Path(dir_okay=True))
@click.option("--text-file", required=True, type=click.Path(dir_okay=False), help="UTF-8 text to score.")
@click.option("--context", default=512, show_default=True, type=click.IntRange(2), help="Tokens per window.")
@click.option("--score", type=click.Choice(["half", "all"]), default="half", show_default=True, help="half: the second half of each window (as llama.cpp's perplexity tool); all: every token after the first.")
@_lm_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_friendly
def perplexity(bundle, text_file, context, score, bits, bits_for, memory_budget, as_json, ffn, engine, threads, ort_int8,
               **attention):
    """Perplexity of the language model in BUNDLE on a text file."""
    from .files import read_text
    from .generate import perplexity as ppl
    from .policy import Policy
    from .session import Session

    text = read_text(text_file, "text file")
    policy = Policy(bits=bits, bits_for=list(bits_for), attention=_attention_policy(**attention), **ffn)
    with Session(bundle, policy=policy, memory_budget=memory_budget, engine=engine, threads=threads,
                 ort_int8=ort_int8) as sess:
        r = ppl(sess, text, context=context, score=score)
    if as_json:
        click.echo(json.dumps(r, default=_jsonable))
    else:
        click.echo(f"perplexity {r['perplexity']:.4f} over {r['tokens_scored']} tokens ({r['windows']} windows of "
                   f"{context}, {score} scored) in {r['seconds']:.1f} s")


@main.command("export")
@click.argument("bundle", type=click.Path(dir_okay=True))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="ONNX file to write.")
@click.option("--bits", type=click.Choice(["8", "6", "5", "4", "3", "2", "float"]), default="8", show_default=True,
              help="Tier whose (dequantized) weights the ONNX model gets.")
@_friendly
def export_cmd(bundle, out, bits):
    """Write BUNDLE as a plain ONNX model (for ONNX Runtime, Netron, ...); needs the onnx package."""
    from .export_onnx import bundle_to_onnx, save_onnx
    from .files import refuse_overwrite
    from .reader import Bundle
    from .tiers import BITS_TO_TIER

    refuse_overwrite(out, {"bundle": bundle}, "-o")
    with Bundle.open(bundle) as b:
        model = bundle_to_onnx(b, BITS_TO_TIER[bits])
    save_onnx(model, out)
    click.echo(f"wrote {out}: {len(model.graph.node)} nodes, weights at {bits} bits (dequantized to float32)")


def format_stats(st: dict) -> str:
    rows = [f"{'layer':<48} {'chunks':>9} {'KiB read':>9} {'MACs %':>7} tiers"]
    for name, l in st["layers"].items():
        short = name if len(name) <= 48 else "…" + name[-47:]
        pct = 100 * l["macs"] / l["dense_macs"] if l["dense_macs"] else 0.0
        rows.append(f"{short:<48} {l['chunks_read']:>4}/{l['chunks_total']:<4} {l['bytes_read'] / 1024:>9.1f} {pct:>6.1f}% "
                    f"{','.join(l['tiers'])}{' (dense fallback)' if l['dense_fallback'] else ''}")
    keys = ["bytes_read", "bundle_bytes", "dense_fp32_weight_bytes", "chunks_read", "chunks_total", "macs", "dense_macs",
            "latency_s", "peak_rss_bytes", "cache_hits", "cache_misses", "cache_bytes"]
    rows.append("")
    rows += [f"{k:<24} {st[k]}" for k in keys]
    return "\n".join(rows)


def _save_npz(path, arrays: dict) -> None:
    import zipfile

    import numpy as np

    from .files import atomic_write

    # np.savez's own first parameter is called `file`, so an output of that name would clash:
    # write the archive the way it does, one .npy member per output.
    with atomic_write(path) as out, zipfile.ZipFile(out.file, "w", zipfile.ZIP_STORED) as z:
        for name, a in arrays.items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(a), allow_pickle=False)


def _jsonable(x):
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


# `nadoo compile` belongs to the compiler package (it imports nothing heavy until it runs)
from nadoo.compiler.cli_compile import add_compile_command  # noqa: E402

add_compile_command(main, _friendly)

if __name__ == "__main__":
    main()
