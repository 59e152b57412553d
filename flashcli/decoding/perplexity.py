"""Perplexity of a text: the text is cut into windows of `window` tokens, each run from an empty
state; every token after the first of a window is scored. exp(mean negative log-likelihood).
Logits are computed a few rows at a time (the model's logits_rows: 32, fewer where a budget is tight), so a
vocabulary of 150k costs megabytes, not a gigabyte, per window: a budget that generates also
measures: where a budget cannot hold a window's KV cache and activations, `fit_window` picks the
largest window that fits."""

from __future__ import annotations

import numpy as np

MIN_WINDOW = 16  # the smallest window fit_window tries (tokens)


def fit_window(load, window: int, minimum: int = MIN_WINDOW):
    """(model, window): `load(window)` for the largest window, from `window` halving down to
    `minimum`, whose budget plan fits. A budget that generates holds a short context, so it
    measures too, in shorter windows (a higher perplexity: less context per scored token).
    BudgetTooSmall at the smallest window is raised (its message gives that window's minimum)."""
    from ..errors import BudgetTooSmall

    while True:
        try:
            return load(window), window
        except BudgetTooSmall:
            if window <= minimum:
                raise
            window = max(minimum, window // 2)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def next_token_logprobs(model, tokens) -> np.ndarray:
    """log p(tokens[i + 1] | tokens[: i + 1]) for every i, from an empty state: [n - 1]. Each
    prompt batch's last-layer outputs go through the head once (model.head_logprobs), which a
    streamed head needs: its pieces come once per pass."""
    model.reset()
    tokens = np.asarray(tokens)
    out = []
    rows = model.logits_rows
    for s in range(0, len(tokens), model.prompt_batch):
        hidden = model.eval(tokens[s : s + model.prompt_batch], hidden=True)
        targets = tokens[s + 1 : s + 1 + len(hidden)]
        padded = np.concatenate([targets, np.zeros(len(hidden) - len(targets), targets.dtype)])  # the text's end
        out.append(model.head_logprobs(hidden, padded, rows)[: len(targets)])
    return np.concatenate(out)


def perplexity(model, tokens, window: int = 512, progress=None) -> dict:
    tokens = list(tokens)
    if len(tokens) < 2:
        raise ValueError("need at least 2 tokens to measure perplexity")
    nll, count, seen = 0.0, 0, 0
    for start in range(0, len(tokens) - 1, window):
        chunk = tokens[start : start + window]
        if len(chunk) < 2:
            break
        nll -= float(next_token_logprobs(model, chunk).sum())
        count += len(chunk) - 1
        seen += len(chunk)
        if progress:
            progress(len(chunk))
    return {"perplexity": float(np.exp(nll / count)), "tokens": seen, "scored_tokens": count, "window": window}
