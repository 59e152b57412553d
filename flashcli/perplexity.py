"""Perplexity of a text: the text is cut into windows of `window` tokens, each run from an empty
state; every token after the first of a window is scored. exp(mean negative log-likelihood).
Logits are computed a few rows at a time (a flash model's logits_rows, else 32), so a
vocabulary of 150k costs megabytes, not a gigabyte, per window: a budget that generates also
measures."""

from __future__ import annotations

import numpy as np

LOGITS_ROWS = 32


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def token_logits(model, tokens) -> np.ndarray:
    """Next-token logits [n, vocab] at every position of `tokens`, from an empty state (tests)."""
    model.reset()
    batch = model.prompt_batch
    return np.concatenate([model.eval(tokens[s : s + batch], all_logits=True) for s in range(0, len(tokens), batch)])


def next_token_logprobs(model, tokens) -> np.ndarray:
    """log p(tokens[i + 1] | tokens[: i + 1]) for every i, from an empty state: [n - 1]."""
    model.reset()
    out = []
    rows = getattr(model, "logits_rows", LOGITS_ROWS)
    for s in range(0, len(tokens), model.prompt_batch):
        hidden = model.eval(tokens[s : s + model.prompt_batch], hidden=True)
        for r in range(0, len(hidden), rows):
            logp = log_softmax(model.head_logits(hidden[r : r + rows]))
            positions = np.arange(s + r, s + r + len(logp))
            keep = positions + 1 < len(tokens)
            out.append(logp[np.flatnonzero(keep), np.asarray(tokens)[positions[keep] + 1]])
    return np.concatenate(out)


def perplexity(model, tokens, window: int = 512, progress=None) -> dict:
    tokens = list(tokens)
    if len(tokens) < 2:
        raise ValueError("need at least 2 tokens to measure perplexity")
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, window):
        chunk = tokens[start : start + window]
        if len(chunk) < 2:
            break
        nll -= float(next_token_logprobs(model, chunk).sum())
        count += len(chunk) - 1
        if progress:
            progress(len(chunk))
    return {"perplexity": float(np.exp(nll / count)), "tokens": count + 1, "scored_tokens": count, "window": window}
