"""Samplers: built once by make_sampler; temperature 0 is greedy.

A sampler picks a token from logits, and says which distribution it samples from
(`distribution`), which speculative decoding needs for the target's and the draft's logits alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sampler:
    """logits[vocab] -> token id. top_k 0 and top_p 1.0 mean no truncation."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        self.rng = np.random.default_rng(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, logits: np.ndarray) -> int:
        if self.greedy:
            return int(np.argmax(logits))
        ids, p = self._truncated(logits)
        return int(ids[self.rng.choice(len(ids), p=p)])

    def distribution(self, logits: np.ndarray) -> np.ndarray:
        """The probabilities [vocab] (float64) this sampler draws from (one-hot when greedy)."""
        out = np.zeros(len(logits))
        if self.greedy:
            out[int(np.argmax(logits))] = 1.0
            return out
        ids, p = self._truncated(logits)
        out[ids] = p
        return out

    def draw(self, p: np.ndarray) -> int:
        """A token from probabilities p [vocab] (they need not be normalized)."""
        return int(self.rng.choice(len(p), p=p / p.sum()))

    def _truncated(self, logits: np.ndarray):
        z = logits.astype(np.float64) / self.temperature
        order = np.argsort(-z, kind="stable")
        if self.top_k > 0:
            order = order[: self.top_k]
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        if self.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(p), self.top_p) + 1)
            order, p = order[:keep], p[:keep] / p[:keep].sum()
        return order, p


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> Sampler:
    return Sampler(temperature, top_k, top_p, seed)
