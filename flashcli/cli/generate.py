"""`flashcli generate MODEL -p PROMPT`: one prompt's text streamed to stdout (--json: one object
per token, then the stats), its figures on stderr (--stats-json: to a file)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import click

from .options import BadInput, load_options, load_verbose, plan_stats, rss_bytes


def run(
    model: str,
    text: str,
    sampler,
    max_tokens: int,
    chat: bool,
    draft: str,
    draft_max: int,
    as_json: bool,
    stats_json,
    quiet: bool,
    verbose: bool,
    opts: dict,
):
    """The generation of one prompt (`opts`: the model options, cli_options.model_options)."""
    from ..decoding.generate import stream_generate
    from ..decoding.loader import check
    from ..engine.tokenizer import Tokenizer
    from ..flash.budget import prompt_batches
    from .stats_output import (  # imports the engine: its code is baseline, not the model's memory
        format_stats,
        write_json,
    )

    opened = check(model)
    cfg_ctx = opened[1].context_length
    n_ctx = opts["n_ctx"]
    tokenizer = Tokenizer(model)
    baseline = rss_bytes()  # interpreter, libraries, tokenizer: reported beside the budget
    prompt_text = tokenizer.apply_chat_template(text) if chat else text
    prompt_tokens = len(tokenizer.encode(prompt_text, special=chat))
    needed = prompt_tokens + max_tokens
    if needed > (n_ctx or cfg_ctx):
        raise BadInput(
            f"the prompt and -n {max_tokens} need {needed} tokens, more than the context "
            f"({n_ctx or cfg_ctx}): shorten the prompt or lower -n"
        )
    context = n_ctx or min(needed + 16 + draft_max, cfg_ctx)
    options = load_options(model, opts, opened, baseline, verbose, draft=draft, max_draft=draft_max, n_ctx=context)
    # one prompt: no pass has more of its tokens than it has (budget.prompt_batches)
    options = replace(
        options,
        flash=replace(options.flash, prompt_batches=prompt_batches(options.flash.prompt_batches, prompt_tokens)),
    )
    loaded = load_verbose(model, opened, options, verbose)
    engine = loaded.model
    stats = {}
    for record in stream_generate(
        engine,
        tokenizer,
        text,
        sampler,
        max_tokens,
        chat=chat,
        drafter=loaded.drafter,
        max_draft=draft_max,
        pass_cost=loaded.pass_cost,
    ):
        if as_json and record.token is not None:
            sys.stdout.write(json.dumps({"token": record.token, "text": record.text}) + "\n")
        elif record.text and not as_json:
            sys.stdout.write(record.text)
        sys.stdout.flush()
        if record.finish_reason:
            stats = record.stats.as_dict() | {"finish_reason": record.finish_reason, "baseline_rss_bytes": baseline}
            stats |= plan_stats(engine)
    if as_json:
        sys.stdout.write(json.dumps({"done": True, **stats}) + "\n")
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    if not quiet:
        click.echo(format_stats(stats), err=True)
    if stats_json:
        write_json(stats_json, stats)
