"""Perplexity of a text: the text is cut into windows of `window` tokens, each run from an empty
state; every token after the first of a window is scored. exp(mean negative log-likelihood)."""

from __future__ import annotations

import numpy as np



def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def token_logits(model, tokens) -> np.ndarray:
    """Next-token logits [n, vocab] at every position of `tokens`, from an empty state."""
    model.reset()
    batch = model.prompt_batch
    return np.concatenate([model.eval(tokens[s : s + batch], all_logits=True) for s in range(0, len(tokens), batch)])


def perplexity(model, tokens, window: int = 512, progress=None) -> dict:
    tokens = list(tokens)
    if len(tokens) < 2:
        raise ValueError("need at least 2 tokens to measure perplexity")
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, window):
        chunk = tokens[start : start + window]
        if len(chunk) < 2:
            break
        logp = log_softmax(token_logits(model, chunk))
        nll -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
        count += len(chunk) - 1
        if progress:
            progress(len(chunk))
    return {"perplexity": float(np.exp(nll / count)), "tokens": count + 1, "scored_tokens": count, "window": window}
