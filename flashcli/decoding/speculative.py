"""Speculative decoding: several tokens per pass over the target's weights.

Under a budget the target streams what the budget does not hold, so a pass costs about the same
whether it evaluates one token or ten: the read dominates. A draft proposes the next k tokens;
the target evaluates its last token and the k drafted ones in one pass (each streamed matrix
read once), keeps the drafted tokens it agrees with, and adds one of its own, the correction or
the token after the last drafted one. The KV caches roll back past the first rejected token.

Exact by construction: the verifying pass runs in the model's `exact` mode, in which every
token of the batch gets the bits it would get alone (kernels.py), so greedy output is the
non-speculative output token for token. With sampling, the standard rule (accept a drafted x
with probability min(1, p(x)/q(x)), else draw from max(0, p - q) normalized) keeps the output
distribution the target's.

Draft sources (`Drafter`): a resident draft model sharing the target's vocabulary, or n-gram
lookup in the prompt and the text so far, which costs no memory. How many tokens to draft is
chosen per pass from the acceptance measured so far and the measured cost of passes and of
drafted tokens, and drafting stops early where the draft itself is unsure.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .sampling import Sampler

PROBE_EVERY, PROBE_TOKENS = 16, 2  # drafting off: a short draft every so many passes
MEASURED_PASSES = 4  # passes measured before their times replace the prior cost model
MIN_DRAFT_PROB = 0.25  # a model draft stops where its own probability of the next token is lower
NGRAM_MAX, NGRAM_MIN = 4, 2  # n-gram lookup: the longest earlier match of the last n tokens


class Drafter(Protocol):
    """A source of drafted tokens."""

    name: str

    def propose(self, tokens: list[int], k: int, sampler: Sampler) -> tuple[list[int], list[np.ndarray | None]]:
        """Up to k tokens likely to follow `tokens`, and for each the distribution it was drawn
        from (None: chosen deterministically, as n-gram lookup does)."""

    def reset(self) -> None: ...

    def remember(self) -> None:
        """Keeps what drafting measured for later runs' cost model (measured.py)."""


class NgramDrafter:
    """Prompt lookup: where the last n tokens (n from NGRAM_MAX down to NGRAM_MIN) occurred
    before, in the prompt or the output, propose what followed them there (the latest match)."""

    name = "ngram"

    def propose(self, tokens, k, sampler):
        seq = np.asarray(tokens)
        for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
            if len(seq) <= n:
                continue
            tail = seq[-n:]
            windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
            hits = np.flatnonzero((windows == tail).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                out = seq[start : start + k].tolist()
                if out:
                    return out, [None] * len(out)
        return [], []

    def reset(self):
        pass

    def remember(self):
        pass


class ModelDrafter:
    """A draft model with its own KV cache, holding exactly the committed tokens it has seen.
    A lean draft's head has rows for some tokens only (`vocabulary`, their ids in row order):
    it proposes only those, and its distributions are zero elsewhere in the n_vocab ids."""

    def __init__(self, model, name: str, feed, vocabulary: np.ndarray | None = None, n_vocab: int = 0):
        self.model = model
        self.vocabulary = vocabulary
        self.n_vocab = n_vocab
        self.feed = feed  # (model, tokens) -> logits after them, in the model's prompt batches
        self.name = name
        self.fed: list[int] = []  # the tokens in the draft's cache, in order
        self.seconds = 0.0
        self.tokens = 0

    def reset(self):
        self.model.reset()
        self.fed = []

    def remember(self):
        from ..flash import measured

        measured.remember(
            self.model.gf.path,
            matrix_bytes=self.model.matrix_bytes,
            tokens=self.tokens,
            seconds=self.seconds,
            waited=0.0,
            streamed=0,
        )

    def propose(self, tokens, k, sampler):
        t0 = time.perf_counter()
        common = _common_prefix(self.fed, tokens)
        if common == len(tokens):  # the draft needs at least one token to evaluate
            common -= 1
        self.model.rollback(common)
        logits = self.feed(self.model, tokens[common:])
        self.fed = list(tokens)
        drafts, dists = [], []
        for j in range(k):
            q = sampler.distribution(logits)
            row = int(np.argmax(q)) if sampler.greedy else sampler.draw(q)
            if drafts and (_softmax_at(logits, row) if sampler.greedy else q[row]) < MIN_DRAFT_PROB:
                break
            x = row if self.vocabulary is None else int(self.vocabulary[row])
            drafts.append(x)
            dists.append(None if sampler.greedy else self._over_vocabulary(q))
            if j + 1 < k:
                logits = self.model.eval([x])
                self.fed.append(x)
        self.seconds += time.perf_counter() - t0
        self.tokens += len(drafts)
        return drafts, dists

    def _over_vocabulary(self, q: np.ndarray) -> np.ndarray:
        """q over the head's rows -> the same distribution over every id."""
        if self.vocabulary is None:
            return q
        full = np.zeros(self.n_vocab, q.dtype)
        full[self.vocabulary] = q
        return full


def _softmax_at(logits: np.ndarray, x: int) -> float:
    z = logits.astype(np.float64)
    return float(1.0 / np.exp(z - z[x]).sum())


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def accept(p: np.ndarray, x: int, q: np.ndarray | None, sampler: Sampler) -> int | None:
    """The speculative-sampling rule for a drafted token x drawn from q (None: chosen
    deterministically) when the target's distribution is p: None if x is accepted, else the
    token to emit instead, drawn from max(0, p - q) normalized."""
    if sampler.greedy:
        best = int(np.argmax(p))
        return None if best == x else best
    qx = 1.0 if q is None else q[x]
    if sampler.rng.random() * qx < p[x]:  # with probability min(1, p(x) / q(x))
        return None
    residual = p.copy()
    if q is None:
        residual[x] = 0.0
    else:
        residual = np.maximum(residual - q, 0.0)
    if residual.sum() <= 0:  # p == q up to rounding: any draw from p is right
        residual = p
    return sampler.draw(residual)


@dataclass
class DraftLength:
    """How many tokens to draft: the k that maximizes expected tokens per second, from the
    acceptance rate measured so far and a linear model of a verifying pass's time in the
    tokens it evaluates (fitted to the passes so far), plus the draft's time per token."""

    max_k: int
    prior: object = None  # (tokens evaluated) -> seconds of a pass, until passes are measured
    accepted: float = 12.0  # pseudo-counts: a prior acceptance of 75%, worth two full drafts
    drafted: float = 16.0
    idle: int = 0  # passes in a row without drafting
    samples: list = field(default_factory=list)  # (tokens evaluated, seconds) of recent passes
    draft_s: float = 0.0  # per drafted token

    @property
    def acceptance(self) -> float:
        return min(self.accepted / max(self.drafted, 1e-9), 0.99)

    def pass_seconds(self, n: int) -> float:
        if len(self.samples) < MEASURED_PASSES or len({s[0] for s in self.samples}) < 2:
            return self.prior(n) if self.prior else 1.0
        xs = np.array([s[0] for s in self.samples], float)
        ys = np.array([s[1] for s in self.samples], float)
        slope, intercept = np.polyfit(xs, ys, 1)
        slope = max(slope, 0.0)
        return max(float(intercept + slope * n), 1e-4)

    def choose(self, room: int) -> int:
        k = self._best(room)
        # without drafting nothing is learnt: now and then, draft a little to measure again
        self.idle = self.idle + 1 if k == 0 else 0
        if k == 0 and self.idle >= PROBE_EVERY and room > 0:
            self.idle = 0
            return min(PROBE_TOKENS, room, self.max_k)
        return k

    def _best(self, room: int) -> int:
        a = self.acceptance
        best_k, best_rate = 0, 1.0 / self.pass_seconds(1)
        for k in range(1, min(self.max_k, room) + 1):
            expected = (1 - a ** (k + 1)) / (1 - a)
            rate = expected / (self.pass_seconds(k + 1) + k * self.draft_s)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    def update(self, drafted: int, accepted: int, evaluated: int, seconds: float, draft_s: float):
        if drafted:
            self.drafted = 0.9 * self.drafted + drafted
            self.accepted = 0.9 * self.accepted + accepted
            self.draft_s = draft_s / drafted
        self.samples = (self.samples + [(evaluated, seconds)])[-32:]


@dataclass
class SpeculationStats:
    passes: int = 0  # decoding passes of the target (the prompt's not counted)
    drafted: int = 0
    accepted: int = 0
    generated: int = 0  # tokens those passes produced
    draft_seconds: float = 0.0  # drafting, the draft's own prompt excluded
    target_seconds: float = 0.0  # the target's verifying passes, waits for reads included
    wait_seconds: float = 0.0  # of which waiting for streamed weights

    def as_dict(self) -> dict:
        per_pass = 1e3 / max(self.passes, 1)
        return {
            "passes": self.passes,
            "tokens_per_pass": self.generated / max(self.passes, 1),
            "acceptance_rate": self.accepted / max(self.drafted, 1),
            "draft_ms_per_token": 1e3 * self.draft_seconds / max(self.drafted, 1),
            # where a decoding pass's time went
            "pass_draft_ms": self.draft_seconds * per_pass,
            "pass_target_compute_ms": (self.target_seconds - self.wait_seconds) * per_pass,
            "pass_io_wait_ms": self.wait_seconds * per_pass,
        }


def speculative_step(
    target,
    drafter: Drafter,
    prompt_tokens: list[int],
    sampler: Sampler,
    max_tokens: int,
    max_draft: int = 8,
    stats: SpeculationStats | None = None,
    prefill=None,
    pass_cost=None,
    keep: int = 0,
) -> Iterator[int]:
    """Yields up to max_tokens token ids after the prompt, several per pass of the target.
    keep > 0: the target's cache holds the prompt's first `keep` tokens (generate_step); a
    model draft reuses its own common prefix."""
    stats = stats if stats is not None else SpeculationStats()
    if keep:
        target.rollback(keep)
    else:
        target.reset()
        drafter.reset()
    logits = prefill(target, prompt_tokens[keep:])
    drafter.propose(list(prompt_tokens), 0, sampler)  # the draft reads the prompt: not a pass's cost
    tokens = list(prompt_tokens)
    token = sampler(logits)
    tokens.append(token)
    produced = 1
    yield token
    length = DraftLength(max_draft, pass_cost)
    while produced < max_tokens:
        room = min(max_tokens - produced - 1, target.n_ctx - len(tokens) - 1)
        k = length.choose(room) if room > 0 else 0
        t0 = time.perf_counter()
        drafts, dists = drafter.propose(tokens, k, sampler) if k else ([], [])
        draft_s = time.perf_counter() - t0
        t1, waited = time.perf_counter(), target.io_wait_s
        target.exact = True
        try:
            rows = target.eval([tokens[-1]] + drafts, all_logits=True)
        finally:
            target.exact = False
        stats.target_seconds += time.perf_counter() - t1
        stats.wait_seconds += target.io_wait_s - waited
        rows = rows.reshape(len(drafts) + 1, -1)
        n_ok, extra = len(drafts), None
        for j, x in enumerate(drafts):
            extra = accept(sampler.distribution(rows[j]), x, dists[j], sampler)
            if extra is not None:
                n_ok = j
                break
        if extra is None:
            extra = sampler(rows[len(drafts)])
        target.rollback(len(tokens) + n_ok)
        length.update(len(drafts), n_ok, len(drafts) + 1, time.perf_counter() - t1, draft_s)
        stats.passes += 1
        stats.drafted += len(drafts)
        stats.accepted += n_ok
        stats.draft_seconds += draft_s
        for x in drafts[:n_ok] + [extra]:
            tokens.append(x)
            produced += 1
            stats.generated += 1
            yield x
            if produced >= max_tokens:
                return
