"""A conversation with one loaded model: the history, the chat template over it at every turn,
and the model's KV cache kept between turns.

Each turn renders the whole history with the model's template (tokenizer.apply_chat_template,
the renderer `generate --chat` uses), so a reply is the one a single run on the whole rendered
history gives. The cache is not thrown away: the tokens it holds are compared with the new
prompt's, and the longest common prefix stays, so a turn evaluates only what follows it (the
template's closing of the last reply and the new message). Nothing is assumed about where a
template's turns begin or end: a template that rewrites earlier turns, or a reply whose
generated tokens are not the ones its text tokenizes to, costs more tokens, never a wrong reply.

A reply's tokens were evaluated one at a time; a single run would read them in a prompt batch,
where ggml's kernels round differently (kernels.py). So prompts are evaluated in the model's
exact mode, in which every token gets the bits it gets alone (at most EXACT_BATCH a pass): a reply then depends only on the
conversation's text, not on how its turns were split, and equals a single exact run's on the
whole history token for token (tests/test_chat.py). When the history and a reply no longer fit the context, the oldest turns are
dropped (the system message stays) and the turn says so.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..engine.tokenizer import Tokenizer
from ..errors import ContextFull
from .generate import GenerationStats, Record, stream_tokens
from .sampling import Sampler

# Tokens of a prompt evaluated a pass in exact mode, at most: its graphs carry a few nodes per
# token (measured on SmolLM2 resident: 500 tokens a pass cost 130 MiB more than in batch mode).
EXACT_BATCH = 64


@dataclass(frozen=True, kw_only=True)
class ChatOptions:
    system: str | None = None  # the system message that opens the conversation
    max_tokens: int = 512  # per reply
    max_draft: int = 8


@dataclass
class Turn:
    """What one reply cost: the history it read, the part of it the cache held already, what was
    evaluated, the turns dropped to make room, and the generation's own stats (None where the
    reply was stopped before its end)."""

    history_tokens: int
    reused_tokens: int
    generated_tokens: int = 0
    dropped_turns: int = 0
    finish_reason: str | None = None  # stop, length, interrupted
    stats: GenerationStats | None = None

    @property
    def evaluated_tokens(self) -> int:
        return self.history_tokens - self.reused_tokens

    def as_dict(self) -> dict:
        out = {
            "history_tokens": self.history_tokens,
            "reused_tokens": self.reused_tokens,
            "evaluated_tokens": self.evaluated_tokens,
            "generated_tokens": self.generated_tokens,
            "dropped_turns": self.dropped_turns,
            "finish_reason": self.finish_reason,
        }
        return out | ({"generation": self.stats.as_dict()} if self.stats else {})


class ChatSession:
    """`reply(text)` streams the model's answer to one more user message (Records, as
    generate.stream_generate's); closing the stream early (Ctrl-C) keeps what was said."""

    def __init__(
        self, model, tokenizer: Tokenizer, sampler: Sampler, options: ChatOptions, drafter=None, pass_cost=None
    ):
        self.model, self.tokenizer, self.sampler, self.options = model, tokenizer, sampler, options
        self.drafter, self.pass_cost = drafter, pass_cost
        self.messages: list[dict] = []
        self.cached: list[int] = []  # the tokens whose keys and values the model's cache holds, in order
        self.last: Turn | None = None
        self.reset()

    def reset(self):
        """An empty history; the cache keeps what a next prompt may share (the system message)."""
        self.messages = [{"role": "system", "content": self.options.system}] if self.options.system else []

    def prompt_tokens(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages), special=True)

    def _fit(self, messages: list[dict]) -> tuple[list[dict], list[int], int]:
        """The messages that fit the context with room for a reply (the oldest turns dropped),
        their tokens, and how many turns were dropped."""
        n_ctx, dropped = self.model.n_ctx, 0
        first = 1 if messages and messages[0]["role"] == "system" else 0
        tokens = self.prompt_tokens(messages)
        while len(tokens) + self.options.max_tokens > n_ctx and len(messages) - first > 1:
            # a turn is a user message and the reply after it
            cut = first + 1
            while cut < len(messages) - 1 and messages[cut]["role"] != "user":
                cut += 1
            messages = messages[:first] + messages[cut:]
            dropped += 1
            tokens = self.prompt_tokens(messages)
        if len(tokens) >= n_ctx:
            raise ContextFull(
                f"the message needs {len(tokens)} tokens with the template, more than the context ({n_ctx}): "
                "shorten it, or give a larger --ctx"
            )
        return messages, tokens, dropped

    def reply(self, text: str) -> Iterator[Record]:
        messages, tokens, dropped = self._fit(self.messages + [{"role": "user", "content": text}])
        keep = common_prefix(self.cached, tokens)
        keep = min(keep, len(tokens) - 1)  # the last prompt token is evaluated: its logits start the reply
        turn = Turn(len(tokens), keep, dropped_turns=dropped)
        self.last = turn
        self.messages = messages
        max_tokens = min(self.options.max_tokens, self.model.n_ctx - len(tokens))
        steps = stream_tokens(
            self.model,
            self.tokenizer,
            tokens,
            self.sampler,
            max_tokens,
            self.drafter,
            self.options.max_draft,
            self.pass_cost,
            keep,
        )
        generated, pieces, started = [], [], False
        # the prompt's tokens get the bits they get alone, as the reply's did, in batches whose
        # per-token graphs stay small
        batch, self.model.prompt_batch = self.model.prompt_batch, min(self.model.prompt_batch, EXACT_BATCH)
        self.model.exact = True
        try:
            for record in steps:
                started = True  # the prompt has been evaluated: the cache holds it
                if record.token is not None:
                    generated.append(record.token)
                pieces.append(record.text)
                if record.finish_reason:
                    turn.finish_reason, turn.stats = record.finish_reason, record.stats
                yield record
        finally:
            steps.close()
            self.model.exact, self.model.prompt_batch = False, batch
            turn.generated_tokens = len(generated)
            turn.finish_reason = turn.finish_reason or "interrupted"
            # positions from n_past on were never evaluated, or hold rejected drafts
            self.cached = (tokens + generated)[: self.model.state.n_past] if started else tokens[:keep]
            self.messages.append({"role": "assistant", "content": "".join(pieces)})
            if turn.finish_reason == "interrupted" and self.drafter is not None:
                self.drafter.reset()  # a model draft's cache may be ahead of what was said


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
