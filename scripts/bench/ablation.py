"""The paper's ablation table on this machine: naive, hybrid, predictor, +window, +bundling, all.

ReLU fixture (bundles: the paper's method proper) at 70% of its file, and the 1.5B (rows: every
neuron, what the budget cannot hold streamed) at 50%. Cold cache, cgroup limit = budget +
flashcli's baseline. On a rows file there is no predictor, window or bundling: those rows run
the budget's own resident share without reads ahead of compute, "all" with them.
"""

from __future__ import annotations

import os

from . import runner
from .limits import PROMPT, flash_file
from .runner import engine_run, median_run

ROWS = ("naive", "hybrid", "predictor", "window", "bundling", "all")


def run(quick: bool = False) -> dict:
    from scripts.fetch_model import model_path, relu_fixture_path

    out = {}
    relu = relu_fixture_path()
    models = [("qwen2.5-coder-1.5b", model_path("qwen2.5-coder-1.5b"), 0.5)]
    if relu is not None:
        models.insert(0, ("relu-fixture", relu, 0.7))
    for name, source, share in models:
        flash = flash_file(source)
        budget = int(share * os.path.getsize(source))
        baseline = runner.flashcli_baseline(flash)
        tokens = runner.chat_tokens(source, PROMPT)
        n = 16 if quick else 32
        rows = {}
        for ablation in ROWS:
            runs = [
                engine_run(
                    "flashcli", flash, tokens, n, budget + baseline, timeout=600, budget=budget, ablation=ablation
                )
                for _ in range(1 if quick else 3)
            ]
            rows[ablation] = median_run(runs)
        out[name] = {"share": share, "budget_bytes": budget, "baseline_bytes": baseline, "rows": rows}
    runner.save("ablation", out)
    return out
