"""The `onnxopt` command line (click). The CLI owns the console: progress bars and logs go to
stderr, results to stdout; bad input ends with one `error:` line and exit code 2."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from onnxopt import __version__
from onnxopt.errors import GenerationError, UserError

logger = logging.getLogger("onnxopt")

# Loggers of libraries we drive that are chatty at INFO/WARNING about things users cannot act on.
_QUIET_LOGGERS = (
    "onnxscript",
    "onnx_ir",
    "torch.onnx",
    "torch.onnx._internal.exporter._registration",
    "transformers",
    "accelerate",
)


class _Group(click.Group):
    """Turns UserError into `error: <line>` and exit code 2; `--debug` keeps the traceback.

    click's own usage errors (unknown option, `--top-k abc`) get the same one-line form instead of
    click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # bare `onnxopt` / `onnxopt cmd`: show the help
            click.echo(e.ctx.get_help(), err=True)
            sys.exit(e.exit_code)
        except click.UsageError as e:
            hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            click.echo(f"error: {_one_line(e.format_message())}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"error: {_one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {_one_line(str(e))}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def _one_line(message: str) -> str:
    """The error as one line: a wrapped library message (ORT, a GGUF reader) may span several."""
    return " | ".join(line.strip() for line in message.splitlines() if line.strip())


def _setup_logging(verbose: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logger.setLevel(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "debug" if debug else "error")
    # Weights are never fetched from a hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxopt")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("-v", "--verbose", is_flag=True, help="Log what each stage does.")
@click.pass_context
def main(ctx, debug, verbose):
    """onnxopt: turn a causal LM into a fast, portable ONNX model package, and run it.

    \b
    Examples:
      onnxopt demo
      onnxopt export smollm2-135m -o smollm2
      onnxopt optimize smollm2 -o smollm2-opt
      onnxopt generate smollm2 "What is the capital of France?" --chat
      onnxopt inspect smollm2
    """
    ctx.obj = {"debug": debug}
    _setup_logging(verbose, debug)


# -- export -------------------------------------------------------------------------------------------


@main.command()
@click.argument("src")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Package directory to write.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option(
    "--random-init",
    type=click.Choice(["tiny", "llama-1b", "llama-8b"]),
    help="Write a random-weight checkpoint of this real shape to SRC first, then export it (benchmarks).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def export(src, out, dtype, random_init, overwrite):
    """Export SRC to a model package with KV-cache inputs and outputs.

    SRC is a Hugging Face directory, a .gguf file, a directory exported by optimum
    (`--task text-generation-with-past`, taken as is), or the alias smollm2-135m.

    \b
    Examples:
      onnxopt export smollm2-135m -o smollm2
      onnxopt export ./Qwen2-0.5B -o qwen2 --dtype fp16
      onnxopt export ./optimum-out -o pkg
      onnxopt export ./llama1b-ckpt --random-init llama-1b -o llama1b --dtype fp16
    """
    from onnxopt.export import export as do_export

    do_export(src, out, dtype=dtype, overwrite=overwrite, random_init=random_init)
    click.echo(f"wrote {out}", err=True)


# -- optimize ---------------------------------------------------------------------------------------


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Package directory to write.")
@click.option(
    "--target", type=click.Choice(["cpu", "cuda", "portable"]), default="cpu", show_default=True,
    help="cpu: ORT contrib ops, custom ops decomposed; cuda: the same fusions, onnxopt.SwiGLU kept for the "
    "CUDA runtime; portable: standard ONNX opset 23 only, for any ONNX runtime.",
)
@click.option(
    "--dtype", type=click.Choice(["fp32", "fp16"]), default=None,
    help="Weights, activations and KV cache (norms, softmax and rotary angles stay fp32; logits are fp32). "
    "Default: fp16 for --target cuda, else the package's dtype.",
)
@click.option(
    "--verify/--no-verify", default=True, show_default=True,
    help="Compare the fused graph's logits with the unfused one's on random inputs; write nothing on a mismatch.",
)
@click.option(
    "--full-logits", is_flag=True,
    help="Keep logits for every position ([B,S,V], which perplexity needs); default: each row's last one ([B,1,V]).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def optimize(package, out, target, dtype, verify, full_logits, as_json, overwrite):
    """Fuse the graph of PACKAGE for a target (and dtype) into a new package.

    Prints per pass the matches and time, nodes per decoder layer before and after, and the
    expected fusions that did not fire.

    \b
    Examples:
      onnxopt optimize smollm2 -o smollm2-opt
      onnxopt optimize smollm2 -o smollm2-opt --json --overwrite
      onnxopt optimize smollm2 -o smollm2-ppl --full-logits
      onnxopt optimize smollm2 -o smollm2-cuda --target cuda            # fp16, SwiGLU kept
      onnxopt optimize smollm2 -o smollm2-onnx --target portable --dtype fp16
    """
    from onnxopt.optimize import optimize as do_optimize

    report = do_optimize(
        package, out, target=target, dtype=dtype, verify=verify, overwrite=overwrite, full_logits=full_logits
    )
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else report.format_text())
    click.echo(f"wrote {out}", err=True)


# -- eval / calibrate / quantize (calibration/, onnxopt/evaluate.py, onnxopt/quantize.py) -------------


@main.command("eval")
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="UTF-8 text file to score.")
@click.option("--max-tokens", type=int, default=16384, show_default=True, help="Score the first N tokens of DATA.")
@click.option("--window", type=int, default=None, help="Tokens per forward pass [default: 1024, or the context if shorter].")
@click.option("--stride", type=int, default=None, help="Tokens between window starts [default: 512, or half the window].")
@click.option("--json", "as_json", is_flag=True, help='Print {"ppl", "tokens"} as one JSON object.')
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda: each window as the CUDA runtime's prefill, the numerics a GPU deployment computes "
                   "(an fp16 package optimized with --target cuda --full-logits; the `gpu` extra).")
def eval_(package, data, max_tokens, window, stride, as_json, device):
    """Perplexity of PACKAGE on DATA over strided sliding windows (each token scored once, with at
    least WINDOW - STRIDE tokens of context). Needs logits for every position.

    \b
    Examples:
      onnxopt eval smollm2 --data ../shared/data/prideprejudice.txt
      onnxopt eval smollm2 --data book.txt --max-tokens 4096 --window 512 --stride 256 --json
      onnxopt eval smollm2-cuda-fp8 --data book.txt --device cuda
    """
    from onnxopt.evaluate import evaluate

    result = evaluate(package, data, max_tokens=max_tokens, window=window, stride=stride, device=device)
    if as_json:
        click.echo(json.dumps(result.to_json()))
    else:
        click.echo(f"ppl {result.ppl:.4f} over {result.tokens} tokens")


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--data", required=True, multiple=True, type=click.Path(path_type=Path), help="Text file(s) to calibrate on (repeatable; .jsonl: chat messages).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Calibration table (JSON) to write.")
@click.option("--samples", type=int, default=128, show_default=True, help="Token windows to run.")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Tokens per window.")
@click.option("--resume", is_flag=True, help="Continue OUTPUT after its last saved window.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def calibrate(package, data, out, samples, seq_len, resume, overwrite):
    """Run token windows of DATA through PACKAGE and write activation statistics of every weight
    MatMul's input (min/max, per-channel abs-mean and mean square, |x| histogram) to a table.

    \b
    Examples:
      onnxopt calibrate smollm2 --data ../shared/data/emma.txt -o smollm2.calib.json
      onnxopt calibrate smollm2 --data ../shared/data/emma.txt -o smollm2.calib.json --resume
    """
    from onnxopt.calibration.table import calibrate as do_calibrate

    table = do_calibrate(package, data, out=out, num_samples=samples, seq_len=seq_len, resume=resume, overwrite=overwrite)
    click.echo(f"wrote {out} ({table['samples_done']} samples x {table['seq_len']} tokens, {len(table['tensors'])} tensors)", err=True)


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Package directory to write.")
@click.option("--scheme", required=True, type=click.Choice(["int8-wo", "int4-wo", "int8", "fp8"]),
              help="Weight-only MatMulNBits (8 or 4 bits), or static W8A8 in int8 or float8 E4M3.")
@click.option("--method", type=click.Choice(["rtn", "awq", "smoothquant", "gptq"]), default=None,
              help="rtn or awq for -wo; smoothquant or gptq (GPTQ weight rounding, a second calibration pass) for int8 and fp8 [default: rtn for -wo, gptq for int8 and fp8].")
@click.option("--hessian-samples", type=int, default=32, show_default=True,
              help="gptq: calibration windows (of the table's data, at most its count) for the input second moments.")
@click.option("--weight-only-input", "weight_only_inputs", multiple=True, metavar="TENSOR",
              help="W8A8: the MatMuls reading this input tensor stay weight-only int8 (repeatable; mixed precision, recorded in the manifest).")
@click.option("--outlier-channels", type=click.IntRange(min=0), default=None,
              help="W8A8: per MatMul input, this many channels of largest calibrated max|x| skip the 8-bit product and are multiplied in float beside it (LLM.int8()-style; 0: none) [default: 32 for fp8, at most an eighth of the narrowest MatMul input; 0 for int8].")
@click.option("--act-order", is_flag=True, help="gptq: round input channels in order of decreasing E[x^2].")
@click.option("--act-range", type=click.Choice(["minmax", "mse"]), default="minmax", show_default=True,
              help="int8: activation ranges from min-max, or MSE-clipped from a second pass over the smoothed graph.")
@click.option("--outlier-limit", type=float, default=None,
              help="W8A8: MatMul inputs whose max|x| exceeds this many times their 99.99th percentile stay weight-only int8 (0: none) [default: 32 for int8, none for fp8].")
@click.option("--alpha", default=None, help="SmoothQuant migration strength 0..1 (0: no smoothing), or `auto`: searched per MatMul input (int8) [default: 0.9 for int8, 0 for fp8].")
@click.option("--block-size", type=click.Choice(["32", "128"]), default="32", show_default=True, help="Input channels per quantization block.")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration table from `onnxopt calibrate` (awq, int8, fp8).")
@click.option("--calib-data", multiple=True, type=click.Path(path_type=Path), help="Calibrate on this text first (awq, int8, fp8; repeatable).")
@click.option("--eval-data", required=True, type=click.Path(path_type=Path), help="Held-apart text for the perplexity gate.")
@click.option("--max-ppl-increase", type=float, default=None, help="Percent; default 0.5 (int8-wo), 10 (int4-wo), 2 (int8), 1 (fp8).")
@click.option("--max-tokens", type=int, default=16384, show_default=True, help="Tokens of EVAL_DATA the gate scores.")
@click.option("--lm-head", type=click.Choice(["int8", "keep", "scheme"]), default="int8", show_default=True, help="LM head: 8 bits, fp32, or the scheme's bits.")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=4, show_default=True, help="MatMulNBits compute type (4: int8 activations, fastest on CPU).")
@click.option("--force", is_flag=True, help="Write the package even when it misses the gate (recorded in the manifest).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest's quantization record as JSON.")
def quantize(package, out, scheme, method, hessian_samples, weight_only_inputs, outlier_channels, act_order, act_range, outlier_limit, alpha, block_size, calib, calib_data, eval_data, max_ppl_increase, max_tokens,
             lm_head, accuracy_level, force, overwrite, as_json):
    """Quantize PACKAGE (weight-only MatMulNBits, or static W8A8 Q/DQ in int8 with SmoothQuant or in
    float8 E4M3, weights rounded by GPTQ by default, or to nearest with --method smoothquant) and write OUTPUT if its
    perplexity on EVAL_DATA rises by at most --max-ppl-increase percent over PACKAGE's (the gate;
    recorded in the manifest).

    \b
    Examples:
      onnxopt quantize smollm2 --scheme int8-wo --eval-data ../shared/data/prideprejudice.txt -o smollm2-int8
      onnxopt quantize smollm2 --scheme int4-wo --method awq --calib-data ../shared/data/emma.txt \\
          --eval-data ../shared/data/prideprejudice.txt -o smollm2-int4
      onnxopt quantize smollm2 --scheme int8 --alpha 0.5 --calib smollm2.calib.json \\
          --eval-data ../shared/data/prideprejudice.txt -o smollm2-w8a8
      onnxopt quantize smollm2 --scheme fp8 --calib smollm2.calib.json \\
          --eval-data ../shared/data/prideprejudice.txt -o smollm2-fp8
    """
    from onnxopt.quantize import SCHEME_DEFAULT
    from onnxopt.quantize import quantize as do_quantize

    record = do_quantize(
        package, out, scheme=scheme, method=method, block_size=int(block_size), calib=calib, calib_data=list(calib_data),
        eval_data=eval_data, max_ppl_increase=max_ppl_increase, max_tokens=max_tokens, lm_head=lm_head,
        accuracy_level=accuracy_level, force=force, overwrite=overwrite, alpha=_alpha(alpha), act_range=act_range,
        outlier_limit=SCHEME_DEFAULT if outlier_limit is None else outlier_limit, hessian_samples=hessian_samples,
        act_order=act_order, weight_only_inputs=list(weight_only_inputs),
        outlier_channels=SCHEME_DEFAULT if outlier_channels is None else outlier_channels,
    )
    gate = record["gate"]
    if as_json:
        click.echo(json.dumps(record, indent=2))
    else:
        click.echo(f"{scheme} {record['method']} block {block_size}: ppl {gate['ppl_parent']:.4f} -> {gate['ppl']:.4f} "
                   f"({gate['delta_pct']:+.2f}%, limit {gate['max_ppl_increase_pct']}%)"
                   + (" FORCED past the gate" if gate["forced"] else ""))
    click.echo(f"wrote {out}", err=True)


def _alpha(text: str | None) -> float | str | None:
    if text is None:
        from onnxopt.quantize import SCHEME_DEFAULT

        return SCHEME_DEFAULT  # the scheme's default (onnxopt/quantize.py, DEFAULT_ALPHA)
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--alpha {text!r}: give a number between 0 and 1, or auto") from None


# -- generate ----------------------------------------------------------------------------------------


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--chat", is_flag=True, help="Wrap PROMPT as a user message in the model's chat template.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0 is off.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="1 is off.")
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True, help="1 is off.")
@click.option("--seed", type=int, default=None, help="Seed for sampling (reproducible output).")
@click.option("--stop", multiple=True, help="Stop when this string appears (repeatable).")
@click.option("--stream/--no-stream", default=True, show_default=True, help="Print text as it is generated.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the text, token ids and speed.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda: ORT CUDA EP + CuPy sampling, decode as one CUDA graph (needs the `gpu` extra).")
def generate(package, prompt, chat, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, stream,
             as_json, device):
    """Generate a completion of PROMPT with the model package PACKAGE ("-" reads PROMPT from stdin).

    \b
    Examples:
      onnxopt generate smollm2 "What is the capital of France?" --chat
      onnxopt generate smollm2 "Once upon a time" --temperature 0.8 --top-p 0.95 --seed 1
      onnxopt generate smollm2 "List three colours:" --max-new-tokens 32 --json
      onnxopt generate smollm2-opt "Once upon a time" --device cuda
    """
    import onnxopt

    if prompt == "-":
        prompt = sys.stdin.read()
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed)
    from onnxopt.runtime import SamplingParams

    # Validated before loading the model, so a typo costs no load time.
    SamplingParams(**sampling)
    if max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens {max_new_tokens}: must be >= 1")
    gen = onnxopt.load(package, device=device)
    kwargs = dict(chat=chat, max_new_tokens=max_new_tokens, stop=stop, **sampling)
    if as_json:
        result = gen.generate(prompt, **kwargs)
        click.echo(json.dumps(result.to_json(), ensure_ascii=False))
        return
    if stream:
        run = gen.stream(prompt, **kwargs)
        for piece in run:
            click.echo(piece, nl=False)
        result = run.result
        click.echo()
    else:
        result = gen.generate(prompt, **kwargs)
        click.echo(result.text)
    click.echo(
        f"[{result.new_tokens} tokens, {result.tokens_per_second:.1f} tok/s, {result.finish_reason}]", err=True
    )


# -- inspect -----------------------------------------------------------------------------------------


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(package, as_json):
    """Show a model package: dims, graph inputs and outputs, op histogram, file sizes.

    \b
    Example:
      onnxopt inspect smollm2 --json
    """
    from onnxopt.inspect_package import describe, format_text

    info = describe(package)
    click.echo(json.dumps(info, indent=2) if as_json else format_text(info))


# -- demo --------------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    return Path(os.environ.get("ONNXOPT_CACHE") or Path.home() / ".cache" / "onnxopt")


@main.command()
@click.option("--question", default="What is the capital of France?", show_default=True)
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
def demo(question, max_new_tokens):
    """Export SmolLM2-135M-Instruct and optimize it for the CPU once (cached in $ONNXOPT_CACHE or
    ~/.cache/onnxopt), then answer a chat question through the optimized ONNX graph, streaming."""
    import onnxopt
    from onnxopt.sources import DEFAULT_MODEL

    exported = _cache_dir() / f"{DEFAULT_MODEL}-fp32"
    optimized = _cache_dir() / f"{DEFAULT_MODEL}-fp32-cpu"
    package = _cached_package(optimized)
    if package is None:
        if _cached_package(exported) is None:
            click.echo(f"exporting {DEFAULT_MODEL} to {exported} (once; about two minutes)", err=True)
            onnxopt.export(DEFAULT_MODEL, exported, overwrite=True)
        click.echo(f"optimizing it for the CPU into {optimized} (once; under a minute)", err=True)
        onnxopt.optimize(exported, optimized, target="cpu", overwrite=True)
        package = optimized
    gen = onnxopt.load(package)
    click.echo(f"> {question}")
    run = gen.stream(question, chat=True, max_new_tokens=max_new_tokens)
    for piece in run:
        click.echo(piece, nl=False)
    click.echo()
    r = run.result
    click.echo(f"[{r.new_tokens} tokens, {r.tokens_per_second:.1f} tok/s on {gen.session.get_providers()[0]}]", err=True)


def _cached_package(path: Path):
    """The verified ModelPackage at `path`, or None when it is missing or unusable (then rebuilt)."""
    from onnxopt.errors import PackageError
    from onnxopt.package import ModelPackage

    if not path.exists():
        return None
    from onnxopt.runtime.kv_cache import unsupported_interface

    try:
        package = ModelPackage(path)
        problem = unsupported_interface(package.io)  # e.g. optimized by an older onnxopt
        if problem:
            raise PackageError(f"{path}: {problem}")
    except PackageError as e:
        click.echo(f"cached package unusable ({e}); building it again", err=True)
        return None
    click.echo(f"using cached package {path}", err=True)
    return package


if __name__ == "__main__":  # pragma: no cover
    main()
