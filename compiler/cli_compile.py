"""`nadoo compile`: the compiler's command, added to the `nadoo` command line (runtime/cli.py) by
`add_compile_command`. This module imports only click and the standard library at import time; the
compiler itself (torch, onnx) is imported when the command runs, so `nadoo run` starts without it.
"""
from __future__ import annotations

import math
import os

import click

from nadoo.runtime.errors import NadooError


def add_compile_command(group: click.Group, friendly) -> None:
    """Register `compile` on `group`, its errors reported the CLI's way (`friendly`: one line, exit 2)."""
    group.add_command(_command(friendly))


def _command(friendly):
    @click.command("compile")
    @click.argument("model", type=click.Path(dir_okay=True))
    @click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Bundle to write (.ndc).")
    @click.option("--calib", type=click.Path(), help="Calibration data: .npz keyed by input name (first axis = samples) or a folder of <input>.npy.")
    @click.option("--chunks", default=16, show_default=True, help="Chunks per linear/conv weight (groups of output rows).")
    @click.option("--embedding-rows", default=64, show_default=True, help="Rows per chunk of an embedding table.")
    @click.option("--group-size", default=64, show_default=True, help="Quantization group size along the input dimension.")
    @click.option("--keep-float", is_flag=True, help="Also store float32 weights, so a dense float run equals the source model.")
    @click.option("--prune-tau", default=0.0, show_default=True, help="Boundary pruning: drop |w| < tau*max|W| per layer; empty chunks are never read.")
    @click.option("--input-shape", multiple=True, help="For torch models without --calib: NAME=1,64 (repeatable) or 1,64 for one input.")
    @click.option("--model-class", help="For a state_dict file: the module class as package.module:ClassName.")
    @click.option("--allow-pickle", is_flag=True, help="Trust the model file: pickled modules, .pt2 archives with pickled or unusual content, TorchScript that writes files. This RUNS CODE from the file: only for files you trust.")
    @click.option("--route-threshold", default=0.95, show_default=True, help="A layer in front of ReLU/GELU is routable when, per sample, this share of its output energy lies in the top half of its chunks.")
    @click.option("--min-elements", default=1024, show_default=True, help="Weights smaller than this stay inline (not chunked).")
    @click.option("--bits-per-weight", type=float, default=None, callback=lambda c, p, v: _bits_per_weight(v), help="Also store a mixed-precision allocation (one tier per chunk) within this average bits/weight budget (scales included); run it with --bits alloc.")
    @click.option("--quant-method", type=click.Choice(["gptq", "search", "rtn"]), default="gptq", show_default=True, help="gptq: error feedback through the calibration inputs' second moments + clipping search; search: clipping search only; rtn: plain min/max.")
    @click.option("--tiers", default="8,4,3,2", show_default=True, callback=lambda c, p, v: _tiers(v), help="Quantized tiers to store, as bit widths from 8, 6, 5, 4, 3, 2 (e.g. 8,6,5,4,3,2: 6 and 5 bits are stored only when asked for).")
    @click.option("--nested", is_flag=True, help="Store 8/4 bits as nested bit-planes of one 8-bit quantization (~8.5 bits/weight for both; a b-bit read reads b bits per weight).")
    @click.option("--no-awq", is_flag=True, help="Do not apply activation-aware per-channel scaling before quantizing (on by default for models other than language models; exact: a float run is unchanged).")
    @click.option("--calib-text", type=click.Path(dir_okay=False), help="Language models: calibration text (UTF-8), tokenized with the model's tokenizer.")
    @click.option("--calib-len", default=128, show_default=True, type=click.IntRange(2), help="Language models: tokens per calibration window.")
    @click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
    @friendly
    def compile_cmd(model, out, calib, chunks, embedding_rows, group_size, keep_float, prune_tau, input_shape,
                    model_class, allow_pickle, route_threshold, min_elements, bits_per_weight, quant_method, tiers,
                    nested, no_awq, calib_text, calib_len, quiet):
        """Compile MODEL (.onnx, TorchScript .pt, torch.export .pt2, state_dict + --model-class; a language
        model as a .gguf file or a Hugging Face folder with config.json) into a bundle."""
        from nadoo.runtime.errors import CompileError
        from nadoo.runtime.files import open_regular, refuse_overwrite

        if not os.path.isdir(model):
            os.close(open_regular(model, "model file", CompileError))  # a FIFO would block the loaders forever
        refuse_overwrite(out, {"model file": model, "calibration data": calib, "calibration text": calib_text}, "-o")
        try:
            from nadoo.compiler.pipeline import CompileOptions, compile_model
            from nadoo.compiler.calib_data import parse_input_shapes
            from nadoo.compiler.lm_compile import compile_lm, is_lm_source
        except ImportError as e:
            raise NadooError(f"the compiler needs the compile extra (pip install 'nadoo[compile]'): {e}") from None
        opts = CompileOptions(calib=calib, chunks=chunks, embedding_rows=embedding_rows, group_size=group_size,
                              keep_float=keep_float, prune_tau=prune_tau, min_elements=min_elements,
                              input_shapes=parse_input_shapes(list(input_shape)) if input_shape else None,
                              model_class=model_class, allow_pickle=allow_pickle, route_threshold=route_threshold,
                              bits_per_weight=bits_per_weight, quant_method=quant_method, nested=nested,
                              tiers=tiers, calib_text=calib_text, calib_len=calib_len, awq=not no_awq)
        if is_lm_source(model):
            report = compile_lm(model, out, opts, quiet=quiet)
        elif calib_text:
            raise CompileError("--calib-text is for language models (a .gguf file or a model folder)")
        else:
            report = compile_model(model, out, opts, quiet=quiet)
        click.echo(report.summary())


    def _tiers(value):
        from nadoo.runtime.tiers import parse_tiers
        try:
            return parse_tiers(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None

    def _bits_per_weight(value):
        # the allocation picks among the 8/4/3/2-bit tiers (with their scales): below 2 nothing fits, and
        # 0 or nan would silently mean "no allocation"
        if value is not None and not (math.isfinite(value) and 2 <= value <= 32):
            raise click.BadParameter(f"{value} is not a number of bits per weight in [2, 32]")
        return value

    return compile_cmd
