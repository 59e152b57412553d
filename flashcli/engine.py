"""Opening a model file for inference: a plain GGUF runs dense, a converted one runs flash."""

from __future__ import annotations

from .errors import UnsupportedModel
from .flash import FlashModel, FlashOptions
from .gguf_file import GGUFFile
from .model import Model

ABLATIONS = {
    # the paper's configurations, from the same binary (see BENCHMARKS.md): each row adds one
    # technique; "all" differs from "bundling" by keeping neurons while the budget has room
    # instead of a fixed window of 4 tokens
    "naive": FlashOptions(predictor=False, naive=True),
    "hybrid": FlashOptions(predictor=False, hybrid=True),
    "predictor": FlashOptions(window=1),
    "window": FlashOptions(window=4, bundled=False),
    "bundling": FlashOptions(window=4),
    "all": FlashOptions(),
}


def check(path) -> GGUFFile:
    """Fails fast, with the precise one-line error, on a file no engine can run."""
    from .config import ModelConfig
    from .model import check_weight_types

    gf = GGUFFile(path)
    ModelConfig.from_gguf(gf)
    check_weight_types(gf)
    return gf


def load(path, dram_budget: int | None = None, n_threads: int | None = None, n_ctx: int | None = None,
         options: FlashOptions | None = None, all_logits: bool = False):
    gf = GGUFFile(path)
    if gf.get("flashcli.format_version") is not None:
        return FlashModel(path, dram_budget, n_threads, n_ctx, options or FlashOptions(), gguf_file=gf,
                          all_logits=all_logits)
    if dram_budget is not None:
        raise UnsupportedModel(f"{path}: --dram-budget needs a converted file: run `flashcli convert {path}` first")
    return Model(path, n_threads=n_threads, n_ctx=n_ctx, gguf_file=gf)
