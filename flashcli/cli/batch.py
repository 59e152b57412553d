"""`flashcli generate MODEL --batch FILE`: many prompts through one model, decoded together
(batching.py). Output: JSON Lines on stdout, one object per input line, in input order (or as
each finishes with --unordered); a line that cannot run gets {"id", "error"} and the others go
on; the exit status is 1 if any line failed. Ctrl-C writes what finished, then exits 130.
Progress goes to stderr only when it is a terminal.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace

import click

from .options import BadInput, load_options, load_verbose, plan_stats, read_source, rss_bytes

MAX_PARALLEL = 64  # the default's cap


@dataclass(frozen=True)
class Defaults:
    """The command line's options, every prompt's defaults."""

    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    chat: bool


@dataclass(frozen=True, kw_only=True)
class BatchOptions:
    """How the batch runs: sequences a pass (None: as many as the budget holds), output order,
    whether a pass's tokens are multiplied as one batch (batching.run_batch), and drafting
    (batch_drafting.py): ngram drafts, auto and off do not."""

    parallel: int | None = None
    unordered: bool = False
    batched_products: bool = False
    draft: str = "auto"
    draft_max: int = 8


class OrderedWriter:
    """JSON Lines to stdout: objects in input order, each as soon as those before it are out
    (or each as it comes, `unordered`)."""

    def __init__(self, unordered: bool):
        self.unordered, self.done, self.next, self.written = unordered, {}, 0, 0

    def add(self, index: int, obj: dict):
        if self.unordered:
            self._write(obj)
            return
        self.done[index] = obj
        while self.next in self.done:
            self._write(self.done.pop(self.next))
            self.next += 1

    def flush_all(self):
        """Everything finished, in input order (Ctrl-C: gaps where lines had not finished)."""
        for index in sorted(self.done):
            self._write(self.done.pop(index))

    def _write(self, obj: dict):
        sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
        sys.stdout.flush()
        self.written += 1


def run_checked(
    model, source, defaults, batch: BatchOptions, opts: dict, verbose, quiet, stats_json, prompted, as_json
):
    """--batch from generate's options (`opts`: the model options; `prompted`: whether a prompt
    was given too), checked before anything loads."""
    if prompted:
        raise BadInput("give prompts either with --batch or with -p / --prompt-file, not both")
    if as_json:
        raise BadInput("--json is for one prompt: --batch writes JSON Lines already")
    if batch.draft not in ("auto", "off", "ngram"):
        raise BadInput(f"--draft {batch.draft}: --batch drafts by n-gram lookup (ngram) or not at all (auto, off)")
    options = load_options(model, opts, verbose=verbose)
    return run(model, source, defaults, options, batch, verbose, quiet, stats_json)


def run(model: str, source: str, defaults: Defaults, options, batch: BatchOptions, verbose, quiet, stats_json):
    """The --batch command. `options`: the loader's (budget, threads, flash options, n_ctx)."""
    from ..decoding.batch_drafting import BatchDrafts
    from ..decoding.batch_input import parse
    from ..decoding.batching import BatchStats, Request, run_batch
    from ..decoding.generate import peak_rss_bytes
    from ..decoding.loader import check, most_sequences
    from ..decoding.sampling import make_sampler
    from ..engine.tokenizer import Tokenizer
    from ..flash.budget import format_size
    from .stats_output import write_json

    lines = parse(read_source(source))
    if not lines:
        raise BadInput(f"{source}: no prompts (one per line, or JSON Lines)")
    opened = check(model)
    tokenizer = Tokenizer(model)
    limit = options.n_ctx or opened[1].context_length
    requests = []
    for line in lines:
        if line.error is None:
            o = {**vars(defaults), **line.options}
            text = tokenizer.apply_chat_template(line.prompt) if o["chat"] else line.prompt
            tokens = tokenizer.encode(text, special=o["chat"])
            if len(tokens) + o["max_tokens"] > limit:
                line.error = (
                    f"the prompt ({len(tokens)} tokens) and max_tokens {o['max_tokens']} need "
                    f"{len(tokens) + o['max_tokens']} tokens, more than the context ({limit})"
                )
                continue
            sampler = make_sampler(o["temperature"], o["top_k"], o["top_p"], o["seed"])
            requests.append(Request(line.index, line.id, tokens, o["max_tokens"], sampler))
    parallel = batch.parallel
    writer = OrderedWriter(batch.unordered)
    failed = [line for line in lines if line.error is not None]
    for line in failed:
        writer.add(line.index, line.error_object())
    stats = {"prompts": len(lines), "failed": len(failed), "generated_tokens": 0}
    if requests:
        baseline = rss_bytes()
        context = options.n_ctx or max(len(r.tokens) + r.max_tokens for r in requests)
        options = replace(options, n_ctx=context)
        most = most_sequences(opened, options, MAX_PARALLEL if parallel is None else parallel)
        if parallel is not None and most < parallel:
            raise BadInput(
                f"--parallel {parallel} does not fit --dram-budget {format_size(options.dram_budget)} with "
                f"contexts of {context} tokens: at most {most} sequences fit"
            )
        n = min(parallel or most, len(requests))
        loaded = load_verbose(model, opened, replace(options, sequences=n), verbose)
        engine = loaded.model
        if verbose:
            click.echo(f"flashcli: {n} sequences per pass, contexts of {context} tokens", err=True)
        batch_stats = BatchStats()
        # auto does not draft in a batch: drafting into the reads' wait cost 19% at 8 sequences
        # of the 1.5B at 50% (BENCHMARKS.md); ngram drafts always
        drafts = BatchDrafts(batch.draft_max) if batch.draft == "ngram" else None
        progress = _Progress(len(requests)) if sys.stderr.isatty() and not quiet else None
        try:
            for result in run_batch(engine, tokenizer, requests, n, batch_stats, batch.batched_products, drafts):
                writer.add(result.index, result.as_dict())
                if progress:
                    progress.update(batch_stats)
        except KeyboardInterrupt:
            writer.flush_all()
            click.echo(f"\nflashcli: {writer.written} of {len(lines)} lines written", err=True)
            raise
        finally:
            if progress:
                progress.end()
        stats |= _stats(engine, batch_stats, n, baseline, peak_rss_bytes())
        stats["batched_products"] = batch.batched_products
        loaded.close()
    writer.flush_all()
    if not quiet and requests:
        click.echo(_format(stats), err=True)
    if stats_json:
        write_json(stats_json, stats)
    if failed:
        raise BadInput(f'{len(failed)} of {len(lines)} prompts failed (their lines have an "error")')


def _stats(engine, s, parallel: int, baseline: int, peak: int) -> dict:
    seconds = s.seconds
    out = {
        "generated_tokens": s.generated,
        "prompt_tokens": s.prompt_tokens,
        "total_s": seconds,
        "tokens_per_s": s.generated / seconds if seconds > 0 else 0.0,
        "parallel": parallel,
        "passes": s.passes,
        "tokens_per_pass": s.tokens_in_passes / max(s.passes, 1),
        "drafted_tokens": s.drafted,
        "accepted_tokens": s.accepted,
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline,
    }
    t = engine.telemetry()  # the engine's own (a flash one's): per pass of all sequences
    out |= {k: t[k] for k in ("ms_per_token", "io_wait_ms_per_pass", "bytes_read_per_pass") if k in t}
    out |= {k: v for k, v in t.items() if k.startswith("gpu")}  # --gpu: its memory, copies, compute
    bytes_read = engine.bytes_read
    out["bytes_read"] = bytes_read
    out["bytes_read_per_token"] = bytes_read / max(s.generated, 1)
    return out | plan_stats(engine)


def _format(stats: dict) -> str:
    return (
        "flashcli: {prompts} prompts ({failed} failed), {generated_tokens} tokens generated in {total_s:.1f} s: "
        "{tokens_per_s:.1f} tok/s; {parallel} sequences, {passes} passes, drafted tokens taken "
        "{accepted_tokens}/{drafted_tokens}; read {mb:.1f} MB per generated token; "
        "peak RSS {rss:.0f} MiB (baseline {base:.0f} MiB)"
    ).format(
        mb=stats["bytes_read_per_token"] / 1e6,
        rss=stats["peak_rss_bytes"] / 2**20,
        base=stats["baseline_rss_bytes"] / 2**20,
        **stats,
    )


class _Progress:
    """One line on a terminal's stderr, rewritten: prompts done / total, tokens/s."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def update(self, s):
        self.done += 1
        rate = s.generated / s.seconds if s.seconds > 0 else 0.0
        click.echo(f"\rflashcli: {self.done}/{self.total} prompts, {rate:.1f} tok/s", err=True, nl=False)

    def end(self):
        if self.done:
            click.echo("", err=True)
