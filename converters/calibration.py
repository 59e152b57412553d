"""Calibration: the dense model's own FFN inputs on text shipped with flashcli.

The text is converters/data/calibration.txt (docstrings of the Python standard library, PSF
license). Predictors, thresholds and neuron statistics are fitted on what each layer's FFN
actually sees on it; tests and studies measure on other text (tests/data/heldout.txt).
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from flashcli.engine.model import Model
from flashcli.errors import BadModelFile

BATCH = 512


def calibration_text() -> str:
    return resources.files("converters").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def calibration_tokens(source, n_tokens: int) -> list[int]:
    from flashcli.engine.tokenizer import Tokenizer

    tokens = Tokenizer(source).encode(calibration_text())[:n_tokens]
    if len(tokens) < 256:
        raise BadModelFile(f"{source}: calibration text gives only {len(tokens)} tokens")
    return tokens


def ffn_inputs(source, tokens, layers=None, threads: int | None = None, gguf_file=None) -> dict:
    """{layer: h [n_tokens, d] float16}: the FFN input of each layer (all by default) when the
    dense model reads `tokens` in windows of BATCH tokens, each from an empty state."""
    model = Model(source, n_threads=threads, n_ctx=BATCH, gguf_file=gguf_file)
    wanted = set(range(model.cfg.n_layers) if layers is None else layers)
    taps = {i: [] for i in wanted}

    def tap(layer, h):
        if layer in wanted:
            taps[layer].append(h.astype(np.float16))

    model.on_ffn_input = tap
    for start in range(0, len(tokens), BATCH):
        model.reset()
        model.eval(tokens[start : start + BATCH], hidden=True)  # every row, the last layer too
    return {i: np.concatenate(t) for i, t in taps.items()}
