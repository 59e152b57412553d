"""Command line: parses options and calls library functions. Only this module prints.

stdout carries only the answer; progress, stats and warnings go to stderr. Library errors
(FlashError) become one line on stderr and exit status 1 here, at a single boundary.
"""

from __future__ import annotations

import json
import os
import sys

import click

from .errors import FlashError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _read_prompt(prompt: str | None) -> str:
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        text = sys.stdin.read()
    elif prompt is None:
        raise click.UsageError("no prompt: give -p TEXT, -p - or pipe text on stdin")
    else:
        text = prompt
    if not text.strip():
        raise click.UsageError("the prompt is empty")
    return text


def _write_json(path: str, obj: dict):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _format_stats(stats: dict) -> str:
    parts = [
        f"prompt {stats['prompt_tokens']} tokens ({stats['prompt_tokens_per_s']:.1f} tok/s)",
        f"generated {stats['generated_tokens']} tokens ({stats['tokens_per_s']:.1f} tok/s)",
        f"peak RSS {stats['peak_rss_bytes'] / 2**20:.0f} MiB (baseline {stats['baseline_rss_bytes'] / 2**20:.0f} MiB)",
    ]
    line = "flashcli: " + ", ".join(parts)
    if "io_ms" in stats:
        line += ("\nflashcli: per token: I/O {io_ms:.1f} ms, cache management {mem_ms:.1f} ms, FFN compute "
                 "{compute_ms:.1f} ms; read {mb:.2f} MB ({ffn_fraction_loaded_per_token:.1%} of the FFN), "
                 "predicted {ffn_fraction_predicted_per_token:.1%}, cache hit rate {cache_hit_rate:.1%}"
                 ).format(mb=stats["bytes_read_per_token"] / 1e6, **stats)
    return line


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def model_options(f):
    """Options shared by every command that runs a model."""
    f = click.option("--ablation", type=click.Choice(["naive", "hybrid", "predictor", "window", "bundling", "all"]), default=None,
                     help="Flash configuration of the paper's ablation (default: all techniques).")(f)
    f = click.option("--reader", type=click.Choice(["direct", "mmap"]), default=None,
                     help="How neurons are read: O_DIRECT (default) or mmap.")(f)
    f = click.option("--window", type=int, default=None,
                     help="Drop neurons unused for this many tokens (default 0: keep while the budget has room).")(f)
    f = click.option("--no-predictor", is_flag=True, help="Read every neuron (flash files).")(f)
    f = click.option("--dram-budget", default=None,
                     help="Memory the model may occupy, e.g. 512M, 4G, 4GiB, 1.5G (K/M/G = 1024-based; KB/MB/GB = 1000-based).")(f)
    f = click.option("--verbose", "-v", is_flag=True, help="Print the budget plan and more on stderr.")(f)
    f = click.option("--threads", "-t", type=int, default=None, help="Compute threads (default: all cores).")(f)
    f = click.option("--ctx", "n_ctx", type=int, default=None, help="Context length in tokens (default 4096 or the model's).")(f)
    return f


def _load(model, n_ctx, threads, dram_budget, no_predictor, window, reader, ablation, verbose, all_logits=False):
    from dataclasses import replace

    from .budget import parse_size
    from .engine import ABLATIONS, load
    from .flash import FlashOptions

    options = ABLATIONS[ablation] if ablation else FlashOptions()
    if no_predictor:
        options = replace(options, predictor=False)
    if window is not None:
        options = replace(options, window=window)
    if reader:
        options = replace(options, reader=reader)
    engine = load(model, parse_size(dram_budget) if dram_budget else None, threads, n_ctx, options, all_logits)
    if verbose and hasattr(engine, "plan"):
        for line in engine.plan.lines():
            click.echo(f"flashcli: {line}", err=True)
    return engine


@click.group()
@click.version_option(package_name="flashcli")
def cli():
    """Run GGUF language models larger than your RAM, reading FFN neurons from SSD."""


@cli.command()
@click.argument("model")
@click.option("-p", "--prompt", default=None, help="Prompt text, or - for stdin (default: piped stdin).")
@click.option("-n", "--max-tokens", type=int, default=256, show_default=True, help="Tokens to generate at most.")
@click.option("--temperature", "--temp", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Keep the k most likely tokens (0: all).")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option("--seed", type=int, default=None, help="Random seed for sampling.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines on stdout: one object per token, then the stats.")
@click.option("--stats-json", type=click.Path(dir_okay=False), default=None, help="Write run statistics as JSON to PATH.")
@click.option("--quiet", "-q", is_flag=True, help="No stats on stderr.")
@model_options
def generate(model, prompt, max_tokens, temperature, top_k, top_p, seed, chat, as_json, stats_json, quiet,
             threads, n_ctx, verbose, dram_budget, no_predictor, window, reader, ablation):
    """Generate text from MODEL (a .gguf or converted .flash.gguf file) after a prompt."""
    from .engine import check  # imports the engine: its code is baseline, not the model's memory
    from .generate import stream_generate
    from .sampling import make_sampler
    from .tokenizer import Tokenizer

    text = _read_prompt(prompt)
    sampler = make_sampler(temperature, top_k, top_p, seed)
    check(model)
    tokenizer = Tokenizer(model)
    baseline = _rss_bytes()  # interpreter, libraries, tokenizer: reported beside the budget
    prompt_text = tokenizer.apply_chat_template(text) if chat else text
    n_ctx = n_ctx or len(tokenizer.encode(prompt_text, special=chat)) + max_tokens + 16
    engine = _load(model, n_ctx, threads, dram_budget, no_predictor, window, reader, ablation, verbose)
    stats = {}
    for record in stream_generate(engine, tokenizer, text, sampler, max_tokens, chat=chat):
        if as_json and record.token is not None:
            sys.stdout.write(json.dumps({"token": record.token, "text": record.text}) + "\n")
        elif record.text and not as_json:
            sys.stdout.write(record.text)
        sys.stdout.flush()
        if record.finish_reason:
            stats = dict(record.stats, finish_reason=record.finish_reason, baseline_rss_bytes=baseline)
            if hasattr(engine, "plan"):
                stats["dram_budget_bytes"] = engine.plan.budget
    if as_json:
        sys.stdout.write(json.dumps({"done": True, **stats}) + "\n")
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    if not quiet:
        click.echo(_format_stats(stats), err=True)
    if stats_json:
        _write_json(stats_json, stats)


@cli.command()
@click.argument("model")
@click.option("--file", "-f", "text_file", type=click.Path(dir_okay=False, exists=True), required=True, help="Text to score.")
@click.option("--window-tokens", type=int, default=512, show_default=True, help="Tokens per evaluation window.")
@click.option("--max-tokens", type=int, default=None, help="Score at most this many tokens of the text.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@model_options
def perplexity(model, text_file, window_tokens, max_tokens, as_json, threads, n_ctx, verbose, dram_budget,
               no_predictor, window, reader, ablation):
    """Perplexity of MODEL on a text file."""
    from .perplexity import perplexity as measure
    from .tokenizer import Tokenizer

    from .engine import check

    with open(text_file, encoding="utf-8", errors="replace") as f:
        text = f.read()
    check(model)
    tokenizer = Tokenizer(model)
    tokens = tokenizer.encode(text)[: max_tokens or None]
    engine = _load(model, max(window_tokens, n_ctx or 0), threads, dram_budget, no_predictor, window, reader, ablation,
                   verbose, all_logits=True)
    result = measure(engine, tokens, window=window_tokens)
    result.update(getattr(engine, "telemetry", lambda: {})())
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens")


@cli.command()
@click.argument("model")
@click.option("-o", "--output", default=None, help="Output path (default: MODEL with .flash.gguf).")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--calibration-tokens", type=int, default=4096, show_default=True,
              help="Tokens of shipped calibration text to fit the predictors on.")
@click.option("--threads", "-t", type=int, default=None, help="Compute threads (default: all cores).")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
def convert(model, output, force, calibration_tokens, threads, quiet):
    """Re-lay MODEL's FFN as neuron bundles and fit predictors: writes MODEL.flash.gguf."""
    from .convert import convert as run_convert

    log = None if quiet else (lambda msg: click.echo(f"flashcli: {msg}", err=True))
    result = run_convert(model, output, force=force, calibration_tokens=calibration_tokens, threads=threads,
                         log=log, progress=None if not quiet else False)
    if not quiet:
        click.echo(f"flashcli: wrote {result.output} ({result.output_bytes / 2**20:.1f} MiB from "
                   f"{result.input_bytes / 2**20:.1f} MiB) in {result.seconds:.1f} s", err=True)
    click.echo(str(result.output))


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(model, as_json):
    """Describe MODEL: shape, and for a converted file the bundle layout and predictor quality."""
    from .info import describe, format_description

    desc = describe(model)
    click.echo(json.dumps(desc, indent=2) if as_json else format_description(desc))


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="flashcli", standalone_mode=False)
    except FlashError as e:
        click.echo(f"flashcli: error: {e}", err=True)
        sys.exit(EXIT_ERROR)
    except click.exceptions.Abort:
        click.echo("flashcli: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        click.echo("flashcli: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except BrokenPipeError:
        # the reader of our stdout went away (e.g. `| head`): not an error worth a trace
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_ERROR)
    except ValueError as e:
        click.echo(f"flashcli: error: {e}", err=True)
        sys.exit(EXIT_ERROR)
    except OSError as e:
        click.echo(f"flashcli: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), err=True)
        sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    main()
