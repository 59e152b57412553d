"""Which experts a mixture's routers pick on calibration text: per layer, how many of the text's
tokens picked each expert. A converted file keeps the counts (engine/expert_records.PICKS), and
flash generation fills its expert slots with the experts picked most before the first token
(expert_ffn.ExpertFFN.warm), where the caches would otherwise start empty and take a reply's
first tens of tokens to learn them (BENCHMARKS.md, "Which experts stay").

The text runs through the source file under a small budget, as flash generation runs it (a
prompt pass reads every expert its tokens pick, in rounds where they outnumber the slots): the
converter needs no room for the whole model.
"""

from __future__ import annotations

import os

import numpy as np

CALIBRATION_TOKENS = 512  # 4096 picks a layer (8 a token): some 30 an expert of 128


def expert_picks(source, n_tokens: int = CALIBRATION_TOKENS, threads: int | None = None) -> np.ndarray:
    """picks [n_layers, n_expert] (int64): tokens of the calibration text that picked each expert."""
    from flashcli.decoding.loader import LoadOptions, check, load
    from flashcli.flash.flash_model import plan_for
    from flashcli.flash.memory import process_room

    from .calibration import calibration_tokens

    gf, cfg = check(source)
    tokens = calibration_tokens(source, n_tokens)
    minimum = plan_for(gf, cfg, None, len(tokens)).minimum
    budget = max(minimum, min(os.path.getsize(source), process_room().total) // 4)
    loaded = load(source, LoadOptions(dram_budget=budget, threads=threads, n_ctx=len(tokens)), (gf, cfg))
    model = loaded.model
    try:
        for start in range(0, len(tokens), model.prompt_batch):  # every token through every layer
            model.eval(tokens[start : start + model.prompt_batch], hidden=True)
        return model.ffn.routing.picks.copy()
    finally:
        loaded.close()
