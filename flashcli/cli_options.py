"""The command line's shared parts: options every model command takes, and how they are read
and checked (before any model is loaded)."""

from __future__ import annotations

import os
import sys

import click

from .errors import FlashError


class BadInput(FlashError):
    """An option or input that cannot be run (checked before any model is loaded)."""


def utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{where}: the prompt is not UTF-8 text (byte {e.start})") from None


def read_source(source: str) -> bytes:
    """The bytes of a file the user named, or of standard input for "-"."""
    if source == "-":
        return sys.stdin.buffer.read()
    try:
        with open(source, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise BadInput(f"{source}: no such file") from None
    except IsADirectoryError:
        raise BadInput(f"{source}: a directory, not a file") from None


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def machine_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None


def sparsity_option(text: str | None) -> float | None | str:
    """auto -> None (calibrated thresholds), off -> "off", a float in [0, 1) -> share skipped."""
    if text is None or text == "auto":
        return None
    if text == "off":
        return "off"
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise BadInput(f"--sparsity {text!r}: use auto, off, or the share of neurons to skip per token, in [0, 1)")
    return value


def model_options(f):
    """Options shared by every command that runs a model."""
    f = click.option(
        "--ablation",
        type=click.Choice(["naive", "hybrid", "predictor", "window", "bundling", "all"]),
        default=None,
        help="Flash configuration of the paper's ablation table (default: all techniques).",
    )(f)
    f = click.option(
        "--reader",
        type=click.Choice(["direct", "mmap"]),
        default=None,
        help="How neurons are read: O_DIRECT (default) or mmap.",
    )(f)
    f = click.option(
        "--window",
        type=click.IntRange(min=0),
        default=None,
        help="Drop neurons unused for this many tokens (default 0: keep while the budget has room).",
    )(f)
    f = click.option(
        "--sparsity",
        default=None,
        help="auto (calibrated), off (every neuron), or the share of neurons to skip per token.",
    )(f)
    f = click.option("--no-predictor", is_flag=True, help="Read every neuron (same as --sparsity off).")(f)
    f = click.option(
        "--dram-budget",
        default=None,
        help="Memory the model may occupy: 512M, 4G, 4GiB, 1.5G (K/M/G: 1024-based, KB/MB/GB: "
        "1000-based) or 50% of the model file.",
    )(f)
    f = click.option("--verbose", "-v", is_flag=True, help="Print the budget plan and more on stderr.")(f)
    f = click.option(
        "--threads", "-t", type=click.IntRange(min=1), default=None, help="Compute threads (default: all cores)."
    )(f)
    f = click.option(
        "--ctx",
        "n_ctx",
        type=click.IntRange(min=16),
        default=None,
        help="Context length in tokens (default: what the prompt and -n need).",
    )(f)
    return f


def budget_option(text: str | None, model: str) -> int | None:
    from .budget import format_size, parse_size

    if text is None:
        return None
    try:
        budget = parse_size(text, os.path.getsize(model))
    except ValueError as e:
        raise BadInput(f"--dram-budget: {e}") from None
    memory = machine_memory()
    if memory and budget > memory:
        click.echo(
            f"flashcli: warning: --dram-budget {format_size(budget)} is more than this machine's memory "
            f"({format_size(memory)})",
            err=True,
        )
    return budget


def flash_options(sparsity, no_predictor, window, reader, ablation):
    from dataclasses import replace

    from .flash import ABLATIONS, FlashOptions

    options = ABLATIONS[ablation] if ablation else FlashOptions()
    skip = sparsity_option(sparsity)
    if no_predictor or skip == "off":
        options = replace(options, predictor=False)
    elif skip is not None:
        options = replace(options, sparsity=skip)
    if window is not None:
        options = replace(options, window=window)
    if reader:
        options = replace(options, reader=reader)
    return options


def load_verbose(model, opened, options, verbose: bool):
    """The loaded model(s), the plan printed with --verbose."""
    from .loader import load

    loaded = load(model, options, opened)
    engine = loaded.model
    if engine.layout == "rows" and isinstance(options.flash.sparsity, float):
        loaded.close()
        raise BadInput(
            f"{model}: --sparsity {options.flash.sparsity}: this file computes every neuron (rows "
            f"layout, {engine.cfg.ffn_activation} activations): no per-token sparsity to set"
        )
    if verbose:
        for line in (engine.plan.lines() if engine.plan else []) + loaded.notes:
            click.echo(f"flashcli: {line}", err=True)
    return loaded


def load_options(model: str, opts: dict, **fields):
    """The loader's options from the model options (model_options) a command received, and
    the command's own fields (n_ctx, draft, ...)."""
    from .loader import LoadOptions

    flash = flash_options(opts["sparsity"], opts["no_predictor"], opts["window"], opts["reader"], opts["ablation"])
    base = {
        "dram_budget": budget_option(opts["dram_budget"], model),
        "threads": opts["threads"],
        "n_ctx": opts["n_ctx"],
    }
    return LoadOptions(**(base | {"flash": flash} | fields))


def plan_stats(engine) -> dict:
    """The budget and its plan, for --stats-json (a flash engine's; none for a dense one)."""
    plan = engine.plan
    return {} if plan is None else {"dram_budget_bytes": plan.budget, "budget_plan": plan.as_dict()}
