"""Many sequences decoded together: each pass over the weights carries the next token of every
live sequence, and prompt batches of the ones starting (continuous batching: a sequence that
finishes frees its KV cache for the next prompt at once).

Each sequence gets the text it would get alone: its own KV cache (decode_state.DecodeState), its
own sampler (seeded per request), its prompt fed in the chunks a single run feeds it
(generate.prefill), and products that give its columns the bits of a pass of its own
(layers.Blocks.product). A greedy sequence may carry drafted tokens after its next one
(batch_drafting.py), verified in the pass with the bits each gets alone, its cache rolled back
past the first it does not take. Nothing here prints: the CLI does.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..engine.decode_state import Part
from ..engine.tokenizer import StreamDecoder, Tokenizer
from ..flash.budget_parts import pass_rows
from .batch_drafting import BatchDrafts
from .generate import TokenRule
from .sampling import Sampler


@dataclass
class Request:
    index: int  # its place in the input
    id: object
    tokens: list[int]
    max_tokens: int
    sampler: Sampler


@dataclass
class Result:
    index: int
    id: object
    text: str
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str  # "stop" (end of generation) or "length" (max_tokens)

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "finish_reason": self.finish_reason,
        }


@dataclass
class BatchStats:
    passes: int = 0
    tokens_in_passes: int = 0  # every token a pass carried (prompts', generated and drafted)
    generated: int = 0
    drafted: int = 0  # tokens drafted after a sequence's next one (batch_drafting.py)
    accepted: int = 0  # of which the sequence took
    prompt_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


class _Sequence:
    def __init__(self, request: Request, slot: int, state, tokenizer: Tokenizer):
        self.request, self.slot, self.state = request, slot, state
        self.rule = TokenRule(request.sampler, request.max_tokens, tokenizer.is_end_of_generation)
        self.decoder = StreamDecoder(tokenizer)
        self.fed = 0  # prompt tokens in the cache
        self.next: int | None = None  # the token the next pass feeds (decoding)
        self.text: list[str] = []
        self.history = list(request.tokens)  # prompt and generated tokens (n-gram lookup)
        self.took = 0  # drafted tokens the last pass took

    @property
    def prefilling(self) -> bool:
        return self.next is None


def run_batch(
    model,
    tokenizer: Tokenizer,
    requests: Iterable[Request],
    parallel: int,
    stats: BatchStats | None = None,
    batched_products: bool = False,
    drafts: BatchDrafts | None = None,
) -> Iterator[Result]:
    """Results as sequences finish (not in input order), at most `parallel` decoded together in
    the model's KV caches (model.states). A pass carries every decoding sequence's next token
    (and the tokens `drafts` proposes after it) and prompt chunks of starting ones, the first
    chunk always, more while they fit in one prompt batch (model.prompt_batch tokens).
    `batched_products`: a pass's tokens are multiplied as one batch on ggml's batched kernels,
    faster, but each text then depends on the others'."""
    stats = stats or BatchStats()
    model.batched_products = batched_products
    if len(model.states) < parallel:
        raise ValueError(f"the model holds {len(model.states)} sequences, not {parallel}")
    free = list(range(parallel))  # slots: a sequence takes the lowest free one
    pending = iter(requests)
    live: list[_Sequence] = []
    chunk = model.prompt_batch
    while True:
        while free and (request := next(pending, None)) is not None:
            slot = free.pop(0)
            model.states[slot].n_past = 0
            live.append(_Sequence(request, slot, model.states[slot], tokenizer))
            stats.prompt_tokens += len(request.tokens)
        if not live:
            return
        parts, owners = [], []
        # decoding tokens in slot order: a pass after one sequence took over another's slot is
        # the pass before it, and reuses its graphs (model.py keeps them by cache and window)
        decoding = [s for s in sorted(live, key=lambda s: s.slot) if not s.prefilling]
        drafted = _drafts(drafts, model, decoding, live) if drafts and not batched_products else {}
        for s in decoding:
            d = drafted.get(s, [])
            parts.append(Part(s.state, np.array([s.next] + d, np.int64), 1 + len(d), exact=bool(d)))
            owners.append(s)
        prompt_room = chunk - sum(map(len, drafted.values()))  # a pass stays within the plan's
        for s in live:
            if s.prefilling:
                piece = s.request.tokens[s.fed : s.fed + chunk]  # the chunks a run of its own feeds
                if len(piece) > prompt_room and prompt_room < chunk:
                    continue
                parts.append(Part(s.state, np.array(piece, np.int64)))
                owners.append(s)
                prompt_room -= len(piece)
        logits = model.eval_parts(parts)
        stats.passes += 1
        stats.tokens_in_passes += sum(p.n for p in parts)
        taken = 0
        for s, part, z in zip(owners, parts, logits):
            if s.prefilling:
                s.fed += part.n
                if s.fed < len(s.request.tokens):
                    continue
            result = _take(s, z, drafted.get(s, []))
            taken += s.took
            if result is not None:
                stats.generated += result.generated_tokens
                live.remove(s)
                free.append(s.slot)
                free.sort()
                yield result
        if drafts:
            stats.drafted += sum(map(len, drafted.values()))
            stats.accepted += taken


def _drafts(drafts: BatchDrafts, model, decoding: list, live: list) -> dict:
    """Drafted tokens of the greedy decoding sequences, within what each may still take and
    within the pass the budget planned: rows of logits (budget_parts.pass_rows) and tokens (a
    prompt batch beside the decoding ones, the next prompt chunk's room kept)."""
    greedy = [s for s in decoding if s.request.sampler.greedy]
    starting = [s for s in live if s.prefilling]
    piece = min(model.prompt_batch, len(starting[0].request.tokens) - starting[0].fed) if starting else 0
    most = min(pass_rows(model.logits_rows, len(model.states)) - len(decoding), model.prompt_batch - piece)

    def room(s):  # tokens after its next one: within max_tokens and the context
        return min(s.rule.max_tokens - s.rule.generated - 1, model.n_ctx - s.state.n_past - 2)

    return drafts.propose(greedy, room, most)


def _take(s: _Sequence, rows: np.ndarray, drafted: list[int]) -> Result | None:
    """The sequence's next tokens from its logits rows (after its next token, after each
    drafted one), by the rule a run of its own follows (generate.TokenRule): the drafted tokens
    it agrees with and one of its own; the cache rolled back past the first it does not take.
    Its Result when it ends there. `s.took`: drafted tokens taken."""
    start = s.state.n_past - len(drafted)  # the cache holds its next token and the drafts
    s.took = 0
    for j, z in enumerate(rows):
        result = _step(s, z)
        if result is not None or j == len(drafted) or s.next != drafted[j]:
            break
        s.took += 1
    s.state.n_past = start + s.took
    return result


def _step(s: _Sequence, logits: np.ndarray) -> Result | None:
    """The sequence's next token, by the rule a run of its own follows (generate.TokenRule);
    its Result when it ends there."""
    token = s.rule.next(logits)
    if s.rule.finish != "stop":
        s.text.append(s.decoder.add(token))
        s.history.append(token)
        s.next = token
    if s.rule.finish is None:
        return None
    s.text.append(s.decoder.flush())
    r = s.request
    return Result(r.index, r.id, "".join(s.text), len(r.tokens), s.rule.generated, s.rule.finish)
