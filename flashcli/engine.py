"""Opening a model file for inference: dense as llama.cpp runs it, or flash under a budget."""

from __future__ import annotations

from .bundles import layout_of
from .flash import ABLATIONS, FlashModel, FlashOptions  # noqa: F401  (ABLATIONS: the CLI's choices)
from .gguf_file import GGUFFile
from .model import Model


def check(path) -> GGUFFile:
    """Fails fast, with the precise one-line error, on a file no engine can run."""
    from .config import ModelConfig
    from .weights import check_weight_types

    gf = GGUFFile(path)
    ModelConfig.from_gguf(gf)
    check_weight_types(gf)
    layout_of(gf)
    return gf


def load(path, dram_budget: int | None = None, n_threads: int | None = None, n_ctx: int | None = None,
         options: FlashOptions | None = None, all_logits: bool = False):
    """A converted file, or any file under a budget, runs flash; a plain GGUF without one dense."""
    gf = GGUFFile(path)
    if layout_of(gf) is not None or dram_budget is not None:
        return FlashModel(path, dram_budget, n_threads, n_ctx, options or FlashOptions(), gguf_file=gf,
                          all_logits=all_logits)
    return Model(path, n_threads=n_threads, n_ctx=n_ctx, gguf_file=gf)
