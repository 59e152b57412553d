"""Flash generation: a model under a DRAM budget, its FFN read from disk as needed.

The file's FFN layout (flashcli/bundles.py) decides how:
- "rows" (dense activations, and plain GGUF files): FFN tensors resident while the budget
  allows, the others streamed at every pass over the layers (ffn_stream.StreamedFFN);
- "bundles" (sparse activations): neurons predicted per token, read on demand into per-layer
  neuron caches (ffn_neurons.NeuronFFN).
Everything else (attention, norms, output head, predictors) is resident, as copies in our own
memory; the token embeddings of an untied model are read a row at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

from . import budget as budget_mod
from . import ggml
from .bundles import layer_layouts, layout_of
from .config import ModelConfig
from .ffn_neurons import NeuronFFN, NeuronOptions
from .ffn_stream import StreamedFFN, ffn_tensors
from .gguf_file import GGUFFile
from .model import KV_PAD, Model, default_threads
from .weights import Weights


@dataclass(frozen=True)
class FlashOptions(NeuronOptions):
    """The switches of flash generation. Defaults are what `flashcli generate` uses."""

    stream_slots: int = budget_mod.STREAM_SLOTS  # rows: tensors in flight and held (3 = no read-ahead)


ABLATIONS = {
    # the paper's configurations, from the same binary (see BENCHMARKS.md): each row adds one
    # technique. On "rows" files (no predictor) they mean: naive = every FFN tensor read at every
    # pass, hybrid = half of them resident, then the budget's full share resident, without and
    # with reads ahead of compute.
    "naive": FlashOptions(predictor=False, naive=True),
    "hybrid": FlashOptions(predictor=False, hybrid=True),
    "predictor": FlashOptions(window=1, overlap=False, stream_slots=3),
    "window": FlashOptions(window=4, bundled=False, overlap=False, stream_slots=3),
    "bundling": FlashOptions(window=4, overlap=False, stream_slots=3),
    "all": FlashOptions(),
}


class FlashModel(Model):
    """A model under a DRAM budget (None: room for everything)."""

    def __init__(self, path, dram_budget: int | None = None, n_threads: int | None = None,
                 n_ctx: int | None = None, options: FlashOptions = FlashOptions(), gguf_file: GGUFFile | None = None,
                 all_logits: bool = False):
        gf = gguf_file or GGUFFile(path)
        cfg = ModelConfig.from_gguf(gf)
        self.layout = layout_of(gf) or "rows"
        n_ctx_alloc = -(-min(n_ctx or 4096, cfg.context_length) // KV_PAD) * KV_PAD
        pool = ggml.ThreadPool(n_threads or default_threads())
        if self.layout == "rows":
            tensors = ffn_tensors(gf, cfg)
            repackable = {t.name for t in tensors if t.ggml_type in (ggml.Q4_0, ggml.Q4_K, ggml.IQ4_NL)}
            plan = _plan(lambda rows: budget_mod.plan_rows(gf, cfg, dram_budget, n_ctx_alloc, rows, tensors, repackable),
                         all_logits)
            streamed = _ablate_rows(plan.streamed, tensors, options)
            weights = Weights(gf, cfg, with_ffn={t.name for t in tensors} - set(streamed), anonymous=True)
            ffn = StreamedFFN(gf, cfg, weights, streamed, slots=options.stream_slots, threads=options.io_threads)
        else:
            layouts = layer_layouts(gf, cfg.d_model, cfg.n_layers)
            want = [float(x) for x in gf.get("flashcli.predictor.predicted_fraction", [1.0] * cfg.n_layers)]
            if not options.predictor or options.sparsity is not None:
                want = [1.0 - (options.sparsity or 0.0) if options.predictor else 1.0] * cfg.n_layers
            plan = _plan(lambda rows: budget_mod.plan_neurons(gf, cfg, dram_budget, n_ctx_alloc, rows,
                                                              [x.stride for x in layouts], want, read_buffer=2 << 20),
                         all_logits)
            weights = Weights(gf, cfg, with_ffn=False, anonymous=True)
            ffn = NeuronFFN(gf, cfg, layouts, plan.slots, options, pool)
        self.plan = plan
        super().__init__(path, n_threads=n_threads, n_ctx=n_ctx, ffn=ffn, gguf_file=gf, pool=pool, weights=weights)
        self.prompt_batch = plan.prompt_batch
        self.logits_rows = plan.logits_rows
        self.tokens = 0
        self.seconds = 0.0

    def eval(self, tokens, all_logits: bool = False, logits: bool = True, hidden: bool = False):
        t0 = time.perf_counter()
        out = super().eval(tokens, all_logits, logits, hidden)
        self.tokens += len(tokens)
        self.seconds += time.perf_counter() - t0
        return out

    def telemetry(self) -> dict:
        n = max(self.tokens, 1)
        out = {"ffn_layout": self.layout, "ms_per_token": 1e3 * self.seconds / n}
        out.update(self.ffn.telemetry(self.tokens))
        return out

    def close(self):
        self.ffn.close()
        self.weights.close()


def _plan(make, all_logits: bool):
    """The plan with the most logits rows at a time that fits (perplexity scores every token:
    32 rows, fewer where the budget is tight; generation needs one)."""
    from .errors import BudgetTooSmall

    for rows in ((32, 16, 8, 4, 2) if all_logits else ()):
        try:
            return make(rows)
        except BudgetTooSmall:
            continue
    return make(1)


def _ablate_rows(streamed: tuple, tensors: list, options: FlashOptions) -> tuple:
    """The naive ablation streams every FFN tensor; hybrid at least half of them (the later
    layers), more where the budget holds less."""
    if options.naive:
        return tuple(t.name for t in tensors)
    if options.hybrid:
        half = {t.name for t in tensors[len(tensors) // 2 :]}
        return tuple(t.name for t in tensors if t.name in half or t.name in streamed)
    return streamed


def flash_fields() -> list[str]:
    return [f.name for f in fields(FlashOptions)]
