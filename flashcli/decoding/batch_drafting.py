"""Speculative decoding in a batch: n-gram lookup proposes tokens after a sequence's next one,
and the pass verifies them with the rest (batching.py).

A drafted token costs no memory and no read (the pass reads each streamed matrix once whatever
it carries), only its compute: verified tokens get the bits they get alone (decode_state.Part's
`exact`), one column at a time, as the pass's other decoding tokens. `--batch --draft ngram`
drafts up to max_draft tokens a sequence at every pass. The CLI's auto does not draft in a
batch: giving each pass only the drafted tokens that fit the time it waited for its reads cost
19% at 8 sequences of the 1.5B at 50% (a pass that drafts rebuilds its graphs and verifies a
token at a time; BENCHMARKS.md). Only greedy sequences draft: their text is then the one they
get alone, token for token (a sampled one would draw differently).
"""

from __future__ import annotations

from .speculative import NgramDrafter


class BatchDrafts:
    """Per pass, each greedy decoding sequence's drafted tokens (n-gram lookup in its prompt and
    text), up to max_draft a sequence."""

    def __init__(self, max_draft: int):
        self.max_draft, self.lookup = max_draft, NgramDrafter()

    def propose(self, sequences: list, room_of, most: int) -> dict:
        """{sequence: drafted tokens} for `sequences` (greedy, decoding), `most` in all;
        room_of(s): how many more tokens s may take (its max_tokens, its context)."""
        left = min(self.max_draft * len(sequences), most)
        out = {}
        for s in sequences:
            k = min(self.max_draft, room_of(s), left)
            if k <= 0:
                continue
            drafts, _ = self.lookup.propose(s.history, k, None)
            if drafts:
                out[s] = drafts
                left -= len(drafts)
        return out
