"""Flash generation: a model under a DRAM budget, what the budget does not hold read from disk.

The file's FFN layout (flashcli/bundles.py) decides how:
- "rows" (dense activations, and plain GGUF files): the large matrices (FFN, output head,
  attention) resident while the budget allows, the others streamed at every pass over the
  layers (weight_stream.StreamedWeights);
- "bundles" (sparse activations): neurons predicted per token, read on demand into per-layer
  neuron caches (ffn_neurons.NeuronFFN); attention, the output head and predictors resident.
Resident weights are copies in our own memory; the token embeddings of an untied model (and a
tied one whose head streams) are read a row at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from . import budget as budget_mod
from . import bundles, ggml
from .bundles import layer_layouts
from .config import ModelConfig
from .decode_state import cache_positions
from .errors import UnsupportedModel
from .ffn_neurons import NeuronFFN, NeuronOptions
from .gguf_file import GGUFFile
from .model import LOGITS_ROWS, Model
from .weight_stream import StreamedWeights, pass_matrices, ring_bytes
from .weight_types import open_checked
from .weights import Weights


@dataclass(frozen=True)
class FlashOptions(NeuronOptions):
    """The switches of flash generation. Defaults are what `flashcli generate` uses."""

    read_ahead: bool = True  # rows: the ring reads the next layer's matrices while one computes
    # rows: prompt batches (tokens per pass) between these, as the budget allows; a verifying
    # pass of drafted tokens is a batch too
    prompt_batches: tuple = (budget_mod.MIN_PROMPT_BATCH, budget_mod.MAX_PROMPT_BATCH)


ABLATIONS = {
    # the paper's configurations, from the same binary (see BENCHMARKS.md): each row adds one
    # technique. On "rows" files (no predictor) they mean: naive = every FFN tensor read at every
    # pass, hybrid = half of them resident, then the budget's full share resident, without and
    # with reads ahead of compute.
    "naive": FlashOptions(predictor=False, naive=True),
    "hybrid": FlashOptions(predictor=False, hybrid=True),
    "predictor": FlashOptions(window=1, overlap=False, read_ahead=False),
    "window": FlashOptions(window=4, bundled=False, overlap=False, read_ahead=False),
    "bundling": FlashOptions(window=4, overlap=False, read_ahead=False),
    "all": FlashOptions(),
}


class FlashModel(Model):
    """A model under a DRAM budget (None: room for everything). `reserved` parts of the budget
    (a draft model running beside it) are not this model's to use."""

    def __init__(
        self,
        path,
        dram_budget: int | None = None,
        n_threads: int | None = None,
        n_ctx: int | None = None,
        options: FlashOptions = FlashOptions(),
        gguf_file: GGUFFile | None = None,
        all_logits: bool = False,
        cfg: ModelConfig | None = None,
        reserved: dict | None = None,
        sequences: int = 1,
    ):
        gf = gguf_file or open_checked(path)
        cfg = cfg or ModelConfig.from_gguf(gf)
        self.layout = cfg.ffn_layout or "rows"
        n_ctx_alloc = cache_positions(min(n_ctx or 4096, cfg.context_length), sequences)
        pool = ggml.ThreadPool(n_threads)
        build = _rows if self.layout == "rows" else _bundles
        plan, weights, stream, ffn = build(
            gf, cfg, dram_budget, n_ctx_alloc, options, pool, all_logits, reserved, sequences
        )
        self.plan = plan
        super().__init__(
            path,
            n_threads=n_threads,
            n_ctx=n_ctx,
            ffn=ffn,
            gguf_file=gf,
            pool=pool,
            weights=weights,
            stream=stream,
            cfg=cfg,
            sequences=sequences,
        )
        self.prompt_batch = plan.prompt_batch
        self.logits_rows = plan.logits_rows
        self.tokens = 0
        self.passes = 0
        self.seconds = 0.0

    def eval_parts(self, parts, logits: bool = True, hidden: bool = False):
        t0 = time.perf_counter()
        out = super().eval_parts(parts, logits, hidden)
        self.tokens += sum(p.n for p in parts)
        self.passes += 1
        self.seconds += time.perf_counter() - t0
        return out

    @property
    def bytes_read(self) -> int:
        """Bytes read from disk so far (streamed matrices, or neurons)."""
        if self.stream is not None:
            return self.stream.stream.bytes_read
        return self.ffn.bytes_read if self.ffn is not None else 0

    @property
    def matrix_bytes(self) -> int:
        """Bytes of the matrices a pass multiplies by, resident and streamed."""
        return self.plan.parts.get("resident matrices", 0) + self.plan.streamed_bytes

    @property
    def io_wait_s(self) -> float:
        """Seconds spent so far waiting for streamed matrices."""
        return self.stream.stream.wait_s if self.stream is not None else 0.0

    def telemetry(self) -> dict:
        n = max(self.tokens, 1)
        out = {"ffn_layout": self.layout, "ms_per_token": 1e3 * self.seconds / n}
        if self.ffn is not None:
            out.update(self.ffn.telemetry(self.tokens))
        else:  # rows: every neuron is computed, the output is exact
            out["ffn_fraction_used_per_token"] = 1.0
            stream = (
                self.stream.telemetry(self.passes) if self.stream else {"io_wait_ms": 0.0, "bytes_read_per_pass": 0.0}
            )
            out["io_wait_ms_per_pass"] = stream["io_wait_ms"]
            out["bytes_read_per_pass"] = stream["bytes_read_per_pass"]
            out["io_wait_ms"] = stream["io_wait_ms"] * self.passes / n
            out["bytes_read_per_token"] = stream["bytes_read_per_pass"] * self.passes / n
        return out

    def close(self):
        if self.ffn is not None:
            self.ffn.close()
        if self.stream is not None:
            self.stream.close()
        self.weights.close()


def plan_for(
    gf, cfg, budget, n_ctx, options=FlashOptions(), all_logits=False, reserved=None, sequences=1
) -> budget_mod.Plan:
    """The plan a FlashModel of this file would run under, without loading anything."""
    n_ctx = cache_positions(min(n_ctx or 4096, cfg.context_length), sequences)
    if (cfg.ffn_layout or "rows") == "rows":
        return _rows_plan(gf, cfg, budget, n_ctx, options, all_logits, reserved, sequences, pass_matrices(gf, cfg))
    return _neuron_plan(gf, cfg, budget, n_ctx, options, all_logits, sequences)[0]


def _rows_plan(gf, cfg, budget, n_ctx, options, all_logits, reserved, sequences, matrices):
    return _plan(
        lambda rows, budget: budget_mod.plan_rows(
            gf, cfg, budget, n_ctx, rows, matrices, reserved, options.prompt_batches, sequences
        ),
        budget,
        all_logits,
    )


def _rows(gf, cfg, budget, n_ctx, options, pool, all_logits, reserved, sequences):
    """Rows: the plan's resident matrices held, the others streamed through one ring."""
    matrices = pass_matrices(gf, cfg)
    plan = _rows_plan(gf, cfg, budget, n_ctx, options, all_logits, reserved, sequences, matrices)
    names = _ablate_rows(plan.streamed, matrices, options)
    streamed = [m for m in matrices if m.name in names]
    whole = {m.name.split("#")[0] for m in streamed}  # the head streams whole, in pieces
    weights = Weights(
        gf,
        cfg,
        with_ffn={m.name for m in matrices if ".ffn_" in m.name} - whole,
        anonymous=True,
        streamed=frozenset(whole),
    )
    stream = None
    if streamed:
        ring = ring_bytes(streamed, read_ahead=options.read_ahead)
        stream = StreamedWeights(gf.path, streamed, ring, threads=options.io_threads)
    return plan, weights, stream, None


def _bundles(gf, cfg, budget, n_ctx, options, pool, all_logits, reserved, sequences):
    """Bundles: neuron caches per layer; attention, head and predictors resident."""
    if reserved:
        raise UnsupportedModel(f"{gf.path}: a draft model beside a bundles file is not supported")
    plan, layouts = _neuron_plan(gf, cfg, budget, n_ctx, options, all_logits, sequences)
    weights = Weights(gf, cfg, with_ffn=False, anonymous=True)
    return plan, weights, None, NeuronFFN(gf, cfg, layouts, plan.slots, options, pool)


def _neuron_plan(gf, cfg, budget, n_ctx, options, all_logits, sequences=1):
    layouts = layer_layouts(gf, cfg.d_model, cfg.n_layers)
    want = [float(x) for x in gf.get(bundles.PREDICTOR + "predicted_fraction", [1.0] * cfg.n_layers)]
    if not options.predictor or options.sparsity is not None:
        want = [1.0 - (options.sparsity or 0.0) if options.predictor else 1.0] * cfg.n_layers
    plan = _plan(
        lambda rows, budget: budget_mod.plan_neurons(
            gf,
            cfg,
            budget,
            n_ctx,
            rows,
            [x.stride for x in layouts],
            want,
            read_buffer=_read_buffer(layouts, options),
            sequences=sequences,
        ),
        budget,
        all_logits,
    )
    return plan, layouts


def _read_buffer(layouts, options) -> int:
    """The most a direct read spans in its buffer: reads are split to stay within
    MAX_READ_BUFFER, but one record's aligned extent is read whole."""
    from .io_backends import MAX_READ_BUFFER

    return max(MAX_READ_BUFFER, max(x.stride for x in layouts) + 2 * 4096)


LOGITS_ROW_CHOICES = (LOGITS_ROWS, 16, 8, 4, 2, 1)  # perplexity's, most first; generation needs one


def _plan(make, budget: int | None, all_logits: bool):
    """The plan with the most logits rows at a time whose minimum the budget meets (perplexity
    scores every token: 32 rows, fewer where the budget is tight; generation needs one).
    make(rows, budget) builds a plan; a plan's minimum does not depend on its budget, so each
    candidate's is read from its plan with room for everything."""
    if not all_logits or budget is None:
        return make(LOGITS_ROWS if all_logits else 1, budget)
    rows = next((rows for rows in LOGITS_ROW_CHOICES if make(rows, None).minimum <= budget), 1)
    return make(rows, budget)  # where none fits, the plan of one row says by how much


def _ablate_rows(streamed: tuple, matrices: list, options: FlashOptions) -> set:
    """The naive ablation streams every FFN tensor; hybrid at least half of them (the later
    layers), more where the budget holds less."""
    ffn = [m.name for m in matrices if ".ffn_" in m.name]
    if options.naive:
        return set(streamed) | set(ffn)
    if options.hybrid:
        return set(streamed) | set(ffn[len(ffn) // 2 :])
    return set(streamed)
