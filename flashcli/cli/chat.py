"""`flashcli chat MODEL`: a conversation at a terminal, or one turn per line of piped input.

At a terminal: a prompt with line editing and history (readline), each reply streamed as it is
generated. Ctrl-C during a reply stops it there and keeps the session (a second Ctrl-C in the
same reply ends the session, for a prompt that takes long to read); Ctrl-C at the prompt drops
the line and gives a new prompt, however soon it comes (chat_prompt.py); Ctrl-D or /exit ends
the session with status 0; /reset clears the history; /stats
prints the last reply's figures. From a pipe: one turn per line, each reply then a newline on
stdout (--json: one object a reply) and nothing else; the slash commands work there too.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys

import click

from .chat_prompt import TerminalPrompt, read_piped_turn
from .options import load_options, load_verbose, rss_bytes

DEFAULT_CONTEXT = 4096  # tokens of history and reply, as llama.cpp's llama-cli
HELP = "/reset clears the history, /stats prints the last reply's figures, /exit or Ctrl-D ends"


class StopOnInterrupt:
    """While a reply streams, Ctrl-C stops it at the next token instead of ending the process;
    a second Ctrl-C in the same reply raises KeyboardInterrupt as usual."""

    def __enter__(self):
        self.stopped = False
        self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.stopped:
            raise KeyboardInterrupt
        self.stopped = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def turn_line(turn) -> str:
    line = (
        f"history {turn.history_tokens} tokens, {turn.reused_tokens} of them in the cache already, "
        f"{turn.evaluated_tokens} evaluated; replied {turn.generated_tokens} tokens ({turn.finish_reason})"
    )
    if turn.dropped_turns:
        line += f"; {turn.dropped_turns} oldest turn(s) dropped to fit the context"
    return line


def run(model: str, sampler, system, max_tokens: int, draft: str, draft_max: int, as_json: bool, verbose: bool, opts):
    from ..decoding.chat import ChatOptions, ChatSession
    from ..decoding.loader import check
    from ..engine.tokenizer import Tokenizer
    from .stats_output import format_stats  # noqa: F401  (imports the engine: its code is baseline, not the model's memory)

    opened = check(model)
    tokenizer = Tokenizer(model)
    baseline = rss_bytes()
    n_ctx = opts["n_ctx"] or min(DEFAULT_CONTEXT, opened[1].context_length)
    options = load_options(model, opts, opened, baseline, verbose, draft=draft, max_draft=draft_max, n_ctx=n_ctx)
    loaded = load_verbose(model, opened, options, verbose)
    if max_tokens >= loaded.model.n_ctx:
        raise click.BadParameter(f"-n {max_tokens} leaves no room in the context ({loaded.model.n_ctx})")
    session = ChatSession(
        loaded.model,
        tokenizer,
        sampler,
        ChatOptions(system=system, max_tokens=max_tokens, max_draft=draft_max),
        drafter=loaded.drafter,
        pass_cost=loaded.pass_cost,
    )
    interactive = sys.stdin.isatty()
    with TerminalPrompt() if interactive else contextlib.nullcontext() as terminal:
        if interactive:
            click.echo(f"flashcli chat: {HELP}", err=True)
        converse(session, terminal, baseline, as_json, verbose)
    if interactive:
        click.echo("", err=True)
    loaded.close()


def converse(session, terminal: TerminalPrompt | None, baseline: int, as_json: bool, verbose: bool):
    """Turns until the input ends (or /exit): at a terminal when `terminal` is given."""
    from ..errors import ContextFull
    from .stats_output import format_stats

    read = terminal.read if terminal is not None else read_piped_turn
    while (text := read()) is not None:
        command = text.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            click.echo("flashcli: history cleared", err=True)
            continue
        if command == "/stats":
            if session.last is None:
                click.echo("flashcli: no reply yet", err=True)
                continue
            click.echo(f"flashcli: {turn_line(session.last)}", err=True)
            if session.last.stats is not None:
                # the prompt's figures are those of the tokens this turn evaluated
                stats = session.last.stats.as_dict() | {
                    "baseline_rss_bytes": baseline,
                    "prompt_tokens": session.last.evaluated_tokens,
                }
                click.echo(format_stats(stats), err=True)
            continue
        if command in ("/help", "/?"):
            click.echo(f"flashcli: {HELP}", err=True)
            continue
        if not command:
            continue
        try:
            reply(session, text, as_json, terminal)
        except ContextFull as e:
            click.echo(f"flashcli: error: {e}", err=True)
            continue
        turn = session.last
        if turn.finish_reason == "interrupted" and terminal is not None:
            click.echo("flashcli: reply stopped", err=True)
        if turn.dropped_turns and not verbose:
            click.echo(f"flashcli: context full: dropped the {turn.dropped_turns} oldest turn(s)", err=True)
        if verbose:
            click.echo(f"flashcli: {turn_line(turn)}", err=True)


def reply(session, text: str, as_json: bool, terminal: TerminalPrompt | None = None):
    """One turn: the reply streamed to stdout (--json: written whole, one object). At a terminal
    its Ctrl-C is SIGINT while the reply runs (the handler is in place before, and after)."""
    pieces = []
    with StopOnInterrupt() as interrupt, terminal.replying() if terminal else contextlib.nullcontext():
        stream = session.reply(text)
        try:
            for record in stream:
                pieces.append(record.text)
                if not as_json and record.text:
                    sys.stdout.write(record.text)
                    sys.stdout.flush()
                if interrupt.stopped:
                    break
        finally:
            stream.close()
    if as_json:
        sys.stdout.write(json.dumps({"text": "".join(pieces)} | session.last.as_dict(), ensure_ascii=False) + "\n")
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
