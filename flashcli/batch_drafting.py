"""Speculative decoding in a batch: n-gram lookup proposes tokens after a sequence's next one,
and the pass verifies them with the rest (batching.py).

A drafted token costs no memory and no read (the pass reads each streamed matrix once whatever
it carries), only its compute: verified tokens get the bits they get alone (decode_state.Part's
`exact`), one column at a time, as the pass's other decoding tokens. So drafting pays while the
pass waits for its reads: a pass bound by the disk has room for tokens the CPU computes while it
waits, one bound by the CPU has none. `DraftRoom` measures both (the pass's time while reads
were waited for, its compute per token) and gives each pass the drafted tokens that fit that
room, or (`always`, what `--batch --draft ngram` runs) max_draft a sequence. The CLI's auto does
not draft in a batch: the measured room cost 19% at 8 sequences of the 1.5B at 50% (a pass that
drafts rebuilds its graphs and verifies a token at a time; BENCHMARKS.md). Only greedy sequences draft: their text is then the one they get alone, token for token
(a sampled one would draw differently).
"""

from __future__ import annotations

from dataclasses import dataclass

from .speculative import NgramDrafter

SMOOTHING = 0.3  # weight of the newest pass in the running estimates


@dataclass
class DraftRoom:
    """Drafted tokens a pass may carry. `always`: up to max_draft a sequence whatever the passes
    measure (--draft ngram); otherwise what fits the time the last disk-bound passes waited."""

    max_draft: int
    always: bool = False
    read_s: float | None = None  # a disk-bound pass's time (reads are its floor)
    token_s: float | None = None  # compute per token carried
    drafted: int = 0
    accepted: int = 0

    def tokens(self, decoding: int) -> int:
        """Drafted tokens at most, over a pass's `decoding` sequences."""
        if self.always:
            return self.max_draft * decoding
        if self.read_s is None or not self.token_s:
            return 0
        return max(0, int(self.read_s / self.token_s) - decoding)

    def update(self, seconds: float, waited: float, tokens: int, drafted: int, accepted: int):
        """A pass of `tokens` tokens took `seconds`, `waited` of them for reads."""
        self.drafted += drafted
        self.accepted += accepted
        compute = max(seconds - waited, 0.0) / max(tokens, 1)
        self.token_s = compute if self.token_s is None else _mix(self.token_s, compute)
        if waited > 0.05 * seconds:  # the pass waited for its reads: its time is theirs
            self.read_s = seconds if self.read_s is None else _mix(self.read_s, seconds)


class BatchDrafts:
    """Per pass, each greedy decoding sequence's drafted tokens (n-gram lookup in its prompt and
    text), within the pass's room (DraftRoom)."""

    def __init__(self, room: DraftRoom):
        self.room, self.lookup = room, NgramDrafter()

    def propose(self, sequences: list, room_of, most: int) -> dict:
        """{sequence: drafted tokens} for `sequences` (greedy, decoding), `most` in all;
        room_of(s): how many more tokens s may take (its max_tokens, its context)."""
        left = min(self.room.tokens(len(sequences)), most)
        out = {}
        for s in sequences:
            k = min(self.room.max_draft, room_of(s), left)
            if k <= 0:
                continue
            drafts, _ = self.lookup.propose(s.history, k, None)
            if drafts:
                out[s] = drafts
                left -= len(drafts)
        return out


def _mix(old: float, new: float) -> float:
    return (1 - SMOOTHING) * old + SMOOTHING * new
