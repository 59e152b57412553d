"""Samplers: built once by make_sampler; temperature 0 is greedy."""

from __future__ import annotations

from typing import Callable

import numpy as np

Sampler = Callable[[np.ndarray], int]


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> Sampler:
    """Returns logits[vocab] -> token id. top_k 0 and top_p 1.0 mean no truncation."""
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if not 0.0 < top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1]")
    if temperature == 0:
        return lambda logits: int(np.argmax(logits))
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> int:
        z = logits.astype(np.float64) / temperature
        order = np.argsort(-z)
        if top_k > 0:
            order = order[:top_k]
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        if top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
            order, p = order[:keep], p[:keep] / p[:keep].sum()
        return int(order[rng.choice(len(order), p=p)])

    return sample
