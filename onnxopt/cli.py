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
    """Turns UserError into `error: <line>` and exit code 2; `--debug` keeps the traceback."""

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
@click.option("--target", type=click.Choice(["cpu", "cuda", "portable"]), default="cpu", show_default=True)
@click.option(
    "--verify/--no-verify", default=True, show_default=True,
    help="Compare the fused graph's logits with the unfused one's on random inputs; write nothing on a mismatch.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def optimize(package, out, target, verify, as_json, overwrite):
    """Fuse the graph of PACKAGE (ORT contrib ops, shared-buffer GroupQueryAttention) into a new package.

    Prints per pass the matches and time, nodes per decoder layer before and after, and the
    expected fusions that did not fire.

    \b
    Examples:
      onnxopt optimize smollm2 -o smollm2-opt
      onnxopt optimize smollm2 -o smollm2-opt --json --overwrite
    """
    from onnxopt.optimize import optimize as do_optimize

    report = do_optimize(package, out, target=target, verify=verify, overwrite=overwrite)
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else report.format_text())
    click.echo(f"wrote {out}", err=True)


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
def generate(package, prompt, chat, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, stream, as_json):
    """Generate a completion of PROMPT with the model package PACKAGE ("-" reads PROMPT from stdin).

    \b
    Examples:
      onnxopt generate smollm2 "What is the capital of France?" --chat
      onnxopt generate smollm2 "Once upon a time" --temperature 0.8 --top-p 0.95 --seed 1
      onnxopt generate smollm2 "List three colours:" --max-new-tokens 32 --json
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
    gen = onnxopt.load(package)
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
    try:
        package = ModelPackage(path)
    except PackageError as e:
        click.echo(f"cached package unusable ({e}); building it again", err=True)
        return None
    click.echo(f"using cached package {path}", err=True)
    return package


if __name__ == "__main__":  # pragma: no cover
    main()
