"""Generation, in layers: a step generator yields token ids; a stream wraps them in records
that carry text and stats. Nothing here prints: the CLI does."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..engine.tokenizer import StreamDecoder, Tokenizer
from ..flash.flash_model import FlashModel
from .sampling import Sampler


def peak_rss_bytes() -> int:
    """VmHWM of this process image. Not ru_maxrss: Linux carries that over exec from the forked
    parent, so a flashcli started by a big process (a test runner) would report the parent's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prefill(model, tokens) -> np.ndarray:
    """Runs the prompt in the model's batches; returns the logits after its last token."""
    logits, batch = None, model.prompt_batch
    for start in range(0, len(tokens), batch):
        logits = model.eval(tokens[start : start + batch])
    return logits


@dataclass
class TokenRule:
    """The per-token rule of every decoding loop, a run of its own (generate_step) and a batch
    (batching.py) alike: the sampler picks the next token from the logits; the end of
    generation (`is_end`) ends the sequence uncounted ("stop"), the max_tokens-th counted token
    ends it too ("length")."""

    sampler: Sampler
    max_tokens: int
    is_end: Callable[[int], bool] = lambda token: False
    generated: int = 0
    finish: str | None = None

    def next(self, logits: np.ndarray) -> int:
        token = self.sampler(logits)
        if self.is_end(token):
            self.finish = "stop"
        else:
            self.generated += 1
            if self.generated == self.max_tokens:
                self.finish = "length"
        return token


def generate_step(model, prompt_tokens: list[int], sampler: Sampler, max_tokens: int, keep: int = 0) -> Iterator[int]:
    """Yields up to max_tokens sampled token ids after the prompt (the end of generation is
    the caller's to see: stream_generate stops there). keep > 0: the model's cache holds the
    prompt's first `keep` tokens already (a conversation's earlier turns, chat.py): the cache is
    rolled back to them and only the rest is evaluated."""
    if not 0 <= keep < len(prompt_tokens):
        raise ValueError("empty prompt" if not prompt_tokens else f"keep {keep}: nothing left to evaluate")
    if max_tokens < 1:
        return
    if len(prompt_tokens) + max_tokens > model.n_ctx:
        raise ValueError(
            f"prompt ({len(prompt_tokens)} tokens) + max tokens ({max_tokens}) exceed the context ({model.n_ctx})"
        )
    if keep:
        model.rollback(keep)
    else:
        model.reset()
    logits = prefill(model, prompt_tokens[keep:])
    rule = TokenRule(sampler, max_tokens)
    while True:
        token = rule.next(logits)
        yield token
        if rule.finish:
            return
        logits = model.eval([token])


def _decode_counters(model) -> tuple:
    """(bytes read, tokens evaluated, seconds in passes, seconds waiting for reads) so far."""
    if not isinstance(model, FlashModel):
        return (0, 0, 0.0, 0.0)
    return (model.bytes_read, model.tokens, model.seconds, model.io_wait_s)


def _remember(model, drafter, streamed: int, tokens: int, seconds: float, waited: float):
    """What decoding measured, for later runs' cost model (measured.py)."""
    from ..flash import measured

    measured.remember(
        model.gf.path, matrix_bytes=model.matrix_bytes, tokens=tokens, seconds=seconds, waited=waited, streamed=streamed
    )
    if drafter is not None:
        drafter.remember()


@dataclass
class GenerationStats:
    """What a generation measured. `telemetry` is the engine's own (flash.FlashModel.telemetry:
    reads, waits, caches), `speculation` the draft's (speculative.SpeculationStats)."""

    prompt_tokens: int
    generated_tokens: int
    prompt_tokens_per_s: float
    tokens_per_s: float
    total_s: float
    peak_rss_bytes: int
    major_page_faults: int
    draft: str | None = None
    speculation: dict = field(default_factory=dict)
    telemetry: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """One flat object, as --stats-json and --json write it."""
        out = {k: v for k, v in vars(self).items() if k not in ("speculation", "telemetry")}
        return out | self.telemetry | self.speculation


@dataclass
class Record:
    """One step of the stream: new text (may be empty) and, at the end, the final stats."""

    text: str
    token: int | None
    finish_reason: str | None = None
    stats: GenerationStats | None = None


def stream_generate(
    model,
    tokenizer: Tokenizer,
    prompt: str,
    sampler: Sampler,
    max_tokens: int,
    chat: bool = False,
    drafter=None,
    max_draft: int = 8,
    pass_cost=None,
) -> Iterator[Record]:
    """Records of the generated text; with a drafter (speculative.py), several tokens per pass.
    `prompt`: text, or with chat=True one user message or a conversation (a list of messages)."""
    text = tokenizer.apply_chat_template(prompt) if chat else prompt
    prompt_tokens = tokenizer.encode(text, special=chat)
    return stream_tokens(model, tokenizer, prompt_tokens, sampler, max_tokens, drafter, max_draft, pass_cost)


def stream_tokens(
    model,
    tokenizer: Tokenizer,
    prompt_tokens: list[int],
    sampler: Sampler,
    max_tokens: int,
    drafter=None,
    max_draft: int = 8,
    pass_cost=None,
    keep: int = 0,
) -> Iterator[Record]:
    """stream_generate after a tokenized prompt, of which the model's cache may hold the first
    `keep` tokens already (generate_step)."""
    from .speculative import SpeculationStats, speculative_step

    decoder = StreamDecoder(tokenizer)
    t0 = time.perf_counter()
    t_first = None
    n = 0
    finish = "length"
    speculation = SpeculationStats()
    if drafter is None:
        steps = generate_step(model, prompt_tokens, sampler, max_tokens, keep)
    else:
        steps = speculative_step(
            model, drafter, prompt_tokens, sampler, max_tokens, max_draft, speculation, prefill, pass_cost, keep
        )
    at_first = None
    for token in steps:
        if t_first is None:
            t_first = time.perf_counter()
            at_first = _decode_counters(model)
        if tokenizer.is_end_of_generation(token):
            finish = "stop"
            break
        n += 1
        yield Record(decoder.add(token), token)
    t_end = time.perf_counter()
    t_first = t_first or t_end
    decode_s = t_end - t_first
    telemetry = model.telemetry()  # a flash model's reads, a GPU's copies and compute; {} for the CPU's dense
    if isinstance(model, FlashModel) and at_first is not None:
        decoded = [b - a for a, b in zip(at_first, _decode_counters(model))]
        # per token decoded (after the first, which the prompt's pass gives)
        telemetry["bytes_read_per_token"] = decoded[0] / max(n - 1, 1)
        _remember(model, drafter, *decoded)
    stats = GenerationStats(
        prompt_tokens=len(prompt_tokens),
        generated_tokens=n,
        prompt_tokens_per_s=(len(prompt_tokens) - keep) / max(t_first - t0, 1e-9),
        # the first token comes from the prompt's logits; later ones each cost one decode step
        tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
        total_s=t_end - t0,
        peak_rss_bytes=peak_rss_bytes(),
        major_page_faults=resource.getrusage(resource.RUSAGE_SELF).ru_majflt,
        draft=None if drafter is None else drafter.name,
        speculation=speculation.as_dict() if drafter is not None else {},
        telemetry=telemetry,
    )
    yield Record(decoder.flush(), None, finish, stats)
