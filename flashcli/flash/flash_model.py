"""Flash generation: a model under a DRAM budget, what the budget does not hold read from disk.

The file's FFN layout (flashcli/engine/bundles.py) decides how:
- "rows" (dense activations, and plain GGUF files): the large matrices (FFN, output head,
  attention) resident while the budget allows, the others streamed at every pass over the
  layers (weight_stream.StreamedWeights);
- "bundles" (sparse activations): neurons predicted per token, read on demand into per-layer
  neuron caches (ffn_neurons.NeuronFFN); attention, the output head and predictors resident;
- "experts" (a mixture of experts, any file): the experts a token's router picks, read on
  demand into expert caches, layers alike sharing their slots (expert_ffn.ExpertFFN); the rest resident.
Resident weights are copies in our own memory; the token embeddings of an untied model (and a
tied one whose head streams) are read a row at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..engine import ggml
from ..engine.bundles import layer_layouts
from ..engine.config import ModelConfig
from ..engine.decode_state import cache_positions
from ..engine.expert_records import calibration_picks
from ..engine.gguf_file import GGUFFile
from ..engine.model import Model
from ..engine.weight_types import open_checked
from ..engine.weights import Weights
from ..errors import UnsupportedModel
from . import budget as budget_mod
from .budget_parts import ring_bytes
from .expert_ffn import ExpertFFN
from .ffn_neurons import NeuronFFN, NeuronOptions
from .weight_stream import StreamedWeights, pass_matrices


@dataclass(frozen=True)
class FlashOptions(NeuronOptions):
    """The switches of flash generation. Defaults are what `flashcli generate` uses."""

    read_ahead: bool = True  # rows: the ring reads the next layer's matrices while one computes
    # rows: prompt batches (tokens per pass) between these, as the budget allows; a verifying
    # pass of drafted tokens is a batch too
    prompt_batches: tuple = (budget_mod.MIN_PROMPT_BATCH, budget_mod.MAX_PROMPT_BATCH)
    # experts: read the next layer's experts that its router picks from this layer's FFN input,
    # while this layer computes (pre-gating; studies/moe_routing.py measures how often it guesses)
    expert_prefetch: bool = False
    # experts: fill the slots at load with the experts calibration picked most (a converted
    # file's counts), not empty
    warm_experts: bool = True


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
        self.layout = "experts" if cfg.moe else cfg.ffn_layout or "rows"
        if reserved and self.layout != "rows":
            raise UnsupportedModel(
                f"{gf.path}: a draft model beside a file of the {self.layout} layout is not supported"
            )
        plan = plan_for(gf, cfg, dram_budget, n_ctx, options, all_logits, reserved, sequences)
        pool = ggml.ThreadPool(n_threads)
        build = {"rows": _rows, "bundles": _bundles, "experts": _experts}[self.layout]
        weights, stream, ffn = build(gf, cfg, plan, options, pool)
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
        if isinstance(self.ffn, ExpertFFN):
            return self.ffn.wait_s
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
    return budget_mod.plan_for(gf, cfg, budget, n_ctx, options, all_logits, reserved, sequences)


def _rows(gf, cfg, plan, options, pool):
    """Rows: the plan's resident matrices held, the others streamed through one ring."""
    matrices = pass_matrices(gf, cfg)
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
        ring = ring_bytes(streamed, read_ahead=options.read_ahead)  # an ablation's may differ from the plan's
        stream = StreamedWeights(gf.path, streamed, ring, threads=options.io_threads)
    return weights, stream, None


def _bundles(gf, cfg, plan, options, pool):
    """Bundles: neuron caches per layer; attention, head and predictors resident."""
    layouts = layer_layouts(gf, cfg.d_model, cfg.n_layers)
    weights = Weights(gf, cfg, with_ffn=False, anonymous=True)
    return weights, None, NeuronFFN(gf, cfg, layouts, plan.slots, options, pool)


def _experts(gf, cfg, plan, options, pool):
    """Experts: expert caches per layer; attention, head, routers and shared experts resident."""
    weights = Weights(gf, cfg, with_ffn=False, anonymous=True)
    ffn = ExpertFFN(
        gf, cfg, weights, list(plan.slots), pool, io_threads=options.io_threads, prefetch=options.expert_prefetch
    )
    picks = calibration_picks(gf, cfg.n_layers, cfg.n_expert)
    if options.warm_experts and picks is not None:
        ffn.warm(picks)
    return weights, None, ffn


def _ablate_rows(streamed: tuple, matrices: list, options: FlashOptions) -> set:
    """The naive ablation streams every FFN tensor; hybrid at least half of them (the later
    layers), more where the budget holds less."""
    ffn = [m.name for m in matrices if ".ffn_" in m.name]
    if options.naive:
        return set(streamed) | set(ffn)
    if options.hybrid:
        return set(streamed) | set(ffn[len(ffn) // 2 :])
    return set(streamed)
