"""The command line's shared parts: options every model command takes, and how they are read
and checked (before any model is loaded)."""

from __future__ import annotations

import os
import sys

import click

from ..errors import FlashError


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


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """The prompt from -p TEXT, -p - (stdin), --prompt-file PATH, or piped stdin."""
    if prompt is not None and prompt_file is not None:
        raise BadInput("give the prompt either with -p or with --prompt-file, not both")
    if prompt_file is not None:
        text = utf8(read_source(prompt_file), prompt_file)
    elif prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        text = utf8(read_source("-"), "standard input")
    elif prompt is None:
        raise BadInput("no prompt: give -p TEXT, -p -, --prompt-file PATH or pipe text on stdin")
    else:
        text = prompt
    if not text.strip():
        raise BadInput("the prompt is empty")
    return text


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
        "1000-based), 50% of the model file, or auto (the default: none where the model fits the "
        "memory this process may use, else what is left there beside the interpreter).",
    )(f)
    f = click.option(
        "--memory-limit",
        default=None,
        help="Memory the whole process may use, the interpreter included (a container's limit): "
        "the budget is what is left beside the measured baseline. Instead of --dram-budget.",
    )(f)
    f = click.option(
        "--gpu-budget",
        default=None,
        help="--gpu: GPU memory the weights may occupy (as --dram-budget; default: all of them); "
        "the last layers' matrices stream from host memory, once per pass.",
    )(f)
    f = click.option("--gpu", is_flag=True, help="Run on the NVIDIA GPU (a CUDA build: make setup GPU=cuda).")(f)
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


def sampling_options(f):
    """How the next token is drawn: generate's and chat's (sampling.make_sampler)."""
    f = click.option("--seed", type=int, default=None, help="Random seed for sampling.")(f)
    f = click.option(
        "--top-p",
        type=click.FloatRange(min=0.0, max=1.0, min_open=True),
        default=1.0,
        show_default=True,
        help="Nucleus sampling mass, in (0, 1].",
    )(f)
    f = click.option(
        "--top-k",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Keep the k most likely tokens (0: all).",
    )(f)
    return click.option(
        "--temperature", "--temp", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="0 is greedy."
    )(f)


def draft_max_option(f):
    return click.option(
        "--draft-max",
        type=click.IntRange(min=1, max=16),
        default=8,
        show_default=True,
        help="Tokens drafted per pass at most.",
    )(f)


def budget_option(text: str | None, model: str) -> int | None:
    """The budget in bytes; None for auto."""
    from ..flash.budget import format_size, parse_size

    if text is None or text == "auto":
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

    from ..flash.flash_model import ABLATIONS, FlashOptions

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
    from ..decoding.loader import load

    loaded = load(model, options, opened)
    engine = loaded.model
    if engine.layout == "rows" and isinstance(options.flash.sparsity, float):
        loaded.close()
        raise BadInput(
            f"{model}: --sparsity {options.flash.sparsity}: this file computes every neuron (rows "
            f"layout, {engine.cfg.ffn_activation} activations): no per-token sparsity to set"
        )
    if verbose and getattr(engine, "device", None) is not None:
        t = engine.device.telemetry()
        click.echo(f"flashcli: gpu: {t['gpu']}, {t['gpu_resident_bytes'] / 2**20:.0f} MiB resident", err=True)
    if verbose:
        for line in (engine.plan.lines() if engine.plan else []) + loaded.notes:
            click.echo(f"flashcli: {line}", err=True)
    return loaded


def load_options(model: str, opts: dict, opened=None, baseline: int | None = None, verbose: bool = False, **fields):
    """The loader's options from the model options (model_options) a command received, and
    the command's own fields (n_ctx, draft, ...). Without a --dram-budget (or with auto), the
    budget fits the memory this process may use (auto_dram_budget); `baseline`: this process's
    memory before the model is loaded (now, if not given)."""
    from ..decoding.loader import LoadOptions

    flash = flash_options(opts["sparsity"], opts["no_predictor"], opts["window"], opts["reader"], opts["ablation"])
    base = {"threads": opts["threads"], "n_ctx": opts["n_ctx"], "flash": flash} | fields
    if opts.get("gpu") or opts.get("gpu_budget") is not None:
        return gpu_options(model, opts, opened, base)
    budget = budget_option(opts["dram_budget"], model)
    if budget is not None and opts["memory_limit"] is not None:
        raise BadInput("give either --dram-budget (the model's memory) or --memory-limit (the whole process's)")
    if budget is None:
        baseline = rss_bytes() if baseline is None else baseline
        budget = auto_dram_budget(model, opened, opts["memory_limit"], baseline, verbose, base)
    return LoadOptions(dram_budget=budget, **base)


def gpu_options(model: str, opts: dict, opened, base: dict):
    """--gpu: the whole model resident on the GPU, its graphs there (gpu.py)."""
    from ..decoding.loader import LoadOptions, check
    from ..engine.gpu import cuda
    from ..flash.budget import parse_size

    if not opts.get("gpu"):
        raise BadInput("--gpu-budget goes with --gpu")
    cuda()  # NoGpu (one line, exit 2) before anything is loaded
    if opts["dram_budget"] is not None or opts["memory_limit"] is not None:
        raise BadInput("--gpu runs the model from GPU memory: --dram-budget and --memory-limit are for the CPU")
    gf, cfg = opened or check(model)
    if cfg.ffn_layout is not None:
        raise BadInput(f"{model}: a converted file: --gpu runs the source GGUF")
    budget = None
    if opts["gpu_budget"] is not None:
        try:
            budget = parse_size(opts["gpu_budget"], os.path.getsize(model))
        except ValueError as e:
            raise BadInput(f"--gpu-budget: {e}") from None
    return LoadOptions(dram_budget=None, gpu=True, gpu_budget=budget, **(base | {"draft": "off"}))


def auto_dram_budget(model: str, opened, memory_limit: str | None, baseline: int, verbose: bool, fields: dict):
    """None where the model's plan with everything resident fits the room (--memory-limit, or
    the memory this process may use) beside the baseline and a margin; else what is left there."""
    from ..decoding.loader import check
    from ..flash.budget import parse_size
    from ..flash.flash_model import plan_for
    from ..flash.memory import auto_budget, explicit_room, process_room

    gf, cfg = opened or check(model)
    needed = plan_for(
        gf,
        cfg,
        None,
        fields["n_ctx"],
        fields["flash"],
        fields.get("all_logits", False),
        sequences=fields.get("sequences", 1),
    ).total
    if memory_limit is not None:
        try:
            room = explicit_room(parse_size(memory_limit), "--memory-limit")
        except ValueError as e:
            raise BadInput(f"--memory-limit: {e}") from None
    else:
        room = process_room()
    chosen = auto_budget(needed, baseline, room)
    if verbose:
        click.echo(f"flashcli: {chosen.describe()}", err=True)
    return chosen.budget


def plan_stats(engine) -> dict:
    """The budget and its plan, for --stats-json (a flash engine's; none for a dense one)."""
    plan = engine.plan
    return {} if plan is None else {"dram_budget_bytes": plan.budget, "budget_plan": plan.as_dict()}
