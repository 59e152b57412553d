"""Command line: parses and checks options, calls library functions. Only this module prints.

stdout carries only the answer; progress, stats and warnings go to stderr. Errors (library
errors, bad options, bad input) become one line on stderr and exit status 1 (2 for usage),
here, at a single boundary.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from dataclasses import replace

import click

from ..errors import FlashError
from .options import (
    BadInput,
    draft_max_option,
    load_options,
    load_verbose,
    model_options,
    read_prompt,
    sampling_options,
    utf8,
)

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process it killed


@click.group()
@click.version_option(package_name="flashcli")
def cli():
    """Run GGUF language models larger than your RAM, reading FFN weights from SSD."""


@cli.command()
@click.argument("model")
@click.option("-p", "--prompt", default=None, help="Prompt text, or - for stdin (default: piped stdin).")
@click.option("--prompt-file", "-f", default=None, help="Read the prompt from this UTF-8 file.")
@click.option(
    "-n", "--max-tokens", type=click.IntRange(min=1), default=256, show_default=True, help="Tokens to generate at most."
)
@sampling_options
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines on stdout: one object per token, then the stats.")
@click.option(
    "--stats-json", type=click.Path(dir_okay=False), default=None, help="Write run statistics as JSON to PATH."
)
@click.option("--quiet", "-q", is_flag=True, help="No stats on stderr.")
@click.option(
    "--draft",
    default="auto",
    show_default=True,
    help="Speculative decoding: a draft model's PATH, auto (a smaller model of the same family beside "
    "MODEL, where the budget makes it pay), ngram (lookup in the prompt and output), or off. With --batch: "
    "ngram drafts for greedy prompts, auto and off do not.",
)
@click.option(
    "--batch",
    default=None,
    metavar="FILE",
    help='Prompts, one per line or JSON Lines ({"id", "prompt", options}), - for stdin: JSON Lines '
    "out, one object per prompt. The options above are every prompt's defaults.",
)
@click.option(
    "--parallel",
    type=click.IntRange(min=1),
    default=None,
    help="--batch: sequences decoded together (default: as many as --dram-budget holds, 64 at most).",
)
@click.option("--unordered", is_flag=True, help="--batch: write each result as it finishes, not in input order.")
@click.option(
    "--batched-products",
    is_flag=True,
    help="--batch: multiply a pass's tokens as one batch on ggml's batched kernels: faster, but a text may "
    "then differ from the one its prompt gets alone.",
)
@draft_max_option
@model_options
def generate(
    model,
    prompt,
    prompt_file,
    max_tokens,
    temperature,
    top_k,
    top_p,
    seed,
    chat,
    as_json,
    stats_json,
    quiet,
    draft,
    batch,
    parallel,
    unordered,
    batched_products,
    draft_max,
    verbose,
    **opts,
):
    """Generate text from MODEL (a .gguf or converted .flash.gguf file) after a prompt."""
    if batch is not None:
        from .batch import BatchOptions, Defaults, run_checked

        defaults = Defaults(max_tokens, temperature, top_k, top_p, seed, chat)
        how = BatchOptions(
            parallel=parallel, unordered=unordered, batched_products=batched_products, draft=draft, draft_max=draft_max
        )
        prompted = prompt is not None or prompt_file is not None
        return run_checked(model, batch, defaults, how, opts, verbose, quiet, stats_json, prompted, as_json)
    if parallel is not None or unordered or batched_products:
        raise BadInput("--parallel, --unordered and --batched-products go with --batch FILE")
    from ..decoding.sampling import make_sampler
    from .generate import run

    text = read_prompt(prompt, prompt_file)
    sampler = make_sampler(temperature, top_k, top_p, seed)
    run(model, text, sampler, max_tokens, chat, draft, draft_max, as_json, stats_json, quiet, verbose, opts)


@cli.command()
@click.argument("model")
@click.option("--system", default=None, help="A system message that opens the conversation.")
@click.option(
    "-n", "--max-tokens", type=click.IntRange(min=1), default=512, show_default=True, help="Tokens per reply."
)
@sampling_options
@click.option("--draft", default="auto", show_default=True, help="As generate's: PATH, auto, ngram or off.")
@draft_max_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per reply (text and figures), not streamed.")
@model_options
def chat(model, system, max_tokens, temperature, top_k, top_p, seed, draft, draft_max, as_json, verbose, **opts):
    """A conversation with MODEL: the chat template applied per turn, the KV cache kept between
    turns. At a terminal: Ctrl-C stops a reply, /reset, /stats, /exit or Ctrl-D. Piped: one turn
    per line in, one reply per turn out."""
    from ..decoding.sampling import make_sampler
    from .chat import run

    sampler = make_sampler(temperature, top_k, top_p, seed)
    run(model, sampler, system, max_tokens, draft, draft_max, as_json, verbose, opts)


@cli.command()
@click.argument("model")
@click.option(
    "--file", "-f", "text_file", type=click.Path(dir_okay=False, exists=True), required=True, help="Text to score."
)
@click.option(
    "--window-tokens", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens per evaluation window."
)
@click.option(
    "--max-tokens", type=click.IntRange(min=2), default=None, help="Score at most this many tokens of the text."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@model_options
def perplexity(
    model,
    text_file,
    window_tokens,
    max_tokens,
    as_json,
    verbose,
    **opts,
):
    """Perplexity of MODEL on a text file: windows of --window-tokens tokens, each from an empty
    state, every token after a window's first scored (as llama.cpp's logits would score them).
    Under a --dram-budget too small for such windows, the largest window that fits is used."""
    from ..decoding.loader import check
    from ..decoding.perplexity import fit_window
    from ..decoding.perplexity import perplexity as measure
    from ..engine.tokenizer import Tokenizer

    with open(text_file, "rb") as f:
        text = utf8(f.read(), text_file)
    opened = check(model)
    options = load_options(model, opts, opened, verbose=verbose, all_logits=True)
    tokenizer = Tokenizer(model)
    tokens = tokenizer.encode(text)[: max_tokens or None]

    def load(w):
        return load_verbose(model, opened, replace(options, n_ctx=max(w, options.n_ctx or 0)), verbose).model

    engine, fitted = fit_window(load, window_tokens)
    if verbose and fitted < window_tokens:
        click.echo(
            f"flashcli: windows of {window_tokens} tokens do not fit --dram-budget {opts['dram_budget']}: "
            f"scoring in windows of {fitted} tokens",
            err=True,
        )
    result = measure(engine, tokens, window=fitted)
    result["window_requested"] = window_tokens
    result.update(engine.telemetry())
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens")


@cli.command()
@click.argument("model")
@click.option("-o", "--output", default=None, help="Output path (default: MODEL with .flash.gguf).")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option(
    "--layout",
    type=click.Choice(["auto", "rows", "bundles", "draft"]),
    default="auto",
    show_default=True,
    help="FFN layout: bundles (neurons read on demand; ReLU models), rows (tensors streamed; "
    "SwiGLU/GeGLU); auto picks by the activation; draft writes MODEL.draft.gguf, a lean draft "
    "for speculative decoding (made by auto too, for a smaller model of the family beside MODEL).",
)
@click.option(
    "--down-type",
    default="auto",
    show_default=True,
    help="Bundles: the down columns' type: auto (Q8_0, floats kept), source, or a ggml type (f16, q5_1...).",
)
@click.option(
    "--calibration-tokens",
    type=click.IntRange(min=256),
    default=4096,
    show_default=True,
    help="Tokens of shipped calibration text to fit the predictors on (bundles).",
)
@click.option("--threads", "-t", type=click.IntRange(min=1), default=None, help="Compute threads (default: all cores).")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
def convert(model, output, force, layout, down_type, calibration_tokens, threads, quiet):
    """Lay MODEL's FFN out for flash generation: writes MODEL.flash.gguf."""
    from converters.convert import convert as run_convert
    from converters.lean_draft import make_beside, make_lean_draft

    log = None if quiet else (lambda msg: click.echo(f"flashcli: {msg}", err=True))
    if layout == "draft":
        written, seconds = make_lean_draft(model, output, force=force, log=log)
        if log:
            log(f"wrote {written} in {seconds:.1f} s")
        click.echo(str(written))
        return
    result = run_convert(
        model,
        output,
        force=force,
        layout=layout,
        down_type=down_type,
        calibration_tokens=calibration_tokens,
        threads=threads,
        log=log,
        progress=None if not quiet else False,
    )
    if not quiet:
        click.echo(
            f"flashcli: wrote {result.output} ({result.layout} layout, {result.output_bytes / 2**20:.1f} MiB "
            f"from {result.input_bytes / 2**20:.1f} MiB) in {result.seconds:.1f} s",
            err=True,
        )
    if result.layout == "rows":
        make_beside(model, log)
    click.echo(str(result.output))


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(model, as_json):
    """Describe MODEL: shape, and for a converted file its FFN layout and predictor quality."""
    from .info import describe, format_description

    desc = describe(model)
    click.echo(json.dumps(desc, indent=2) if as_json else format_description(desc))


def _fail(message: str, code: int = EXIT_ERROR):
    click.echo(f"flashcli: error: {' '.join(str(message).split())}", err=True)
    sys.exit(code)


class Terminated(BaseException):
    """SIGTERM (`kill`, a container or a service stopping): unwound as Ctrl-C is, so that what
    cleans up on the way out (a conversion's unfinished file) runs."""


def _terminate(signum, frame):
    raise Terminated


def main(argv=None):
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        cli.main(args=argv, prog_name="flashcli", standalone_mode=False)
    except FlashError as e:
        _fail(e, getattr(e, "exit_code", EXIT_ERROR))
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("flashcli: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Terminated:
        click.echo("flashcli: terminated", err=True)
        sys.exit(EXIT_TERMINATED)
    except click.ClickException as e:  # bad options: one line, not click's usage block
        _fail(e.format_message(), e.exit_code if isinstance(e, click.UsageError) else EXIT_ERROR)
    except BrokenPipeError:
        # the reader of our stdout went away (e.g. `| head`): not an error worth a trace
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_ERROR)
    except ValueError as e:
        _fail(e)
    except MemoryError:
        _fail("out of memory: lower --dram-budget or free memory")
    except OSError as e:
        _fail(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
