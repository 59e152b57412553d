"""Opening models for inference: the file opened and its config built once, here; dense as
llama.cpp runs it, or flash under a budget; and a draft beside the target, or none.

    loaded = load(path, LoadOptions(dram_budget=..., draft="auto"))
    loaded.model, loaded.drafter, loaded.notes

One budget covers both models. The draft runs a token at a time, so it is the part that stays
resident, and the target streams what is left (weight_stream.py); whether a resident draft pays
is the cost model's call (`draft_pays`): tokens per pass against the time of a pass, with the
draft's share of the budget taken from the target's resident share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from .bundles import layout_of
from .config import ModelConfig
from .errors import BudgetTooSmall, UnsupportedModel
from .flash import FlashModel, FlashOptions, plan_for
from .gguf_file import GGUFFile
from .model import Model
from .weight_types import check_weight_types

DRAFT_CHOICES = ("auto", "ngram", "off")
# The cost model's assumptions (BENCHMARKS.md has the measured figures they come from): the rate
# at which streamed matrices arrive, the rate at which a token's products go through resident
# weights, and the acceptance of a same-family draft.
DISK_BYTES_PER_S = 1.5e9
COMPUTE_BYTES_PER_S = 16e9
DRAFT_ACCEPTANCE = 0.8
DRAFT_PROMPT_BATCHES = (8, 32)  # the draft reads the prompt once: small batches keep it small


@dataclass(frozen=True)
class LoadOptions:
    dram_budget: int | None = None  # None: room for everything (a plain GGUF then runs dense)
    threads: int | None = None
    n_ctx: int | None = None
    flash: FlashOptions = FlashOptions()
    all_logits: bool = False  # perplexity: logits of every position
    draft: str = "off"  # a path, "auto" (a known pair, if it pays), "ngram" or "off"
    max_draft: int = 8
    sequences: int = 1  # decoded together (batching.py), each with its own KV cache


@dataclass
class Loaded:
    model: Model
    drafter: object | None = None  # speculative.Drafter
    draft_model: Model | None = None
    notes: list = field(default_factory=list)  # why a draft was or was not used (--verbose)

    def pass_cost(self, n: int) -> float:
        """The cost model's seconds for a pass of the target over n tokens (speculative.py's
        prior, until passes are measured)."""
        plan = getattr(self.model, "plan", None)
        streamed = plan.streamed_bytes if plan is not None else 0
        resident = sum(t.nbytes for t in self.model.weights.matrices.values())
        return max(streamed / DISK_BYTES_PER_S, n * (streamed + resident) / COMPUTE_BYTES_PER_S)

    def close(self):
        for m in (self.model, self.draft_model):
            if m is not None and hasattr(m, "close"):
                m.close()


def check(path) -> tuple[GGUFFile, ModelConfig]:
    """The file and its config, failing fast with the one-line error on a file no engine runs."""
    gf = GGUFFile(path)
    cfg = ModelConfig.from_gguf(gf)
    check_weight_types(gf)
    layout_of(gf)
    return gf, cfg


def load(path, options: LoadOptions = LoadOptions(), opened: tuple | None = None) -> Loaded:
    """The target (and a draft, as options.draft says): a converted file, or any file under a
    budget, runs flash; a plain GGUF without one runs dense."""
    gf, cfg = opened or check(path)
    if options.dram_budget is not None:
        return_freed_memory()
    if options.sequences > 1:  # passes carry a token of each sequence: no draft beside them
        return Loaded(_target(path, gf, cfg, options), None, None, ["draft: off (sequences batched instead)"])
    if options.draft == "auto" and layout_of(gf) == "bundles":
        # the neuron FFN's sums depend on the batch: verifying would change the output
        note = "draft: off (a bundles file: its neuron FFN rounds a batch differently from a token alone)"
        return Loaded(_target(path, gf, cfg, options), None, None, [note])
    draft_path, notes = _draft_path(path, gf, options.draft)
    if draft_path is None or options.dram_budget is None and layout_of(gf) is None:
        if draft_path is not None:
            notes.append("draft: off (no --dram-budget: the whole model is resident, compute-bound)")
            draft_path = None
        model = _target(path, gf, cfg, options)
        drafter = _ngram(options, notes) if options.draft == "ngram" else None
        return Loaded(model, drafter, None, notes)
    draft_gf, draft_cfg = check(draft_path)
    _check_vocabulary(gf, draft_gf, draft_path)
    # plans first, models after: nothing is loaded that the budget then turns away
    draft_options = replace(options.flash, prompt_batches=DRAFT_PROMPT_BATCHES)
    draft_plan = plan_for(draft_gf, draft_cfg, None, options.n_ctx, draft_options)
    reserved = {"draft model": draft_plan.total}
    flash = replace(options.flash, prompt_batches=(_verify_batch(options.max_draft), options.flash.prompt_batches[1]))
    try:
        with_draft = plan_for(gf, cfg, options.dram_budget, options.n_ctx, flash, options.all_logits, reserved)
    except BudgetTooSmall as e:
        if options.draft != "auto":
            raise BudgetTooSmall(f"{e}, with the draft {Path(draft_path).name} ({_mib(draft_plan.total)})") from None
        notes.append(
            f"draft: {Path(draft_path).name} does not fit beside the target "
            f"({_mib(draft_plan.total)}); n-gram lookup instead"
        )
        return Loaded(_target(path, gf, cfg, options), _ngram(options, notes), None, notes)
    if options.draft == "auto":
        alone = plan_for(gf, cfg, options.dram_budget, options.n_ctx, options.flash, options.all_logits)
        pays, why = draft_pays(alone, with_draft, draft_plan, options.max_draft)
        notes.append(why)
        if not pays:
            return Loaded(_target(path, gf, cfg, options), _ngram(options, notes), None, notes)
    from .generate import prefill
    from .speculative import ModelDrafter

    draft = FlashModel(
        draft_path, None, options.threads, options.n_ctx, draft_options, gguf_file=draft_gf, cfg=draft_cfg
    )
    target = _target(path, gf, cfg, replace(options, flash=flash), reserved)
    notes.append(f"draft: {Path(draft_path).name}, resident ({_mib(draft_plan.total)} of the budget)")
    return Loaded(target, ModelDrafter(draft, str(draft_path), prefill), draft, notes)


def _verify_batch(max_draft: int) -> int:
    """The smallest prompt batch of a target that verifies drafts: a pass of max_draft + 1."""
    return 1 << max_draft.bit_length()


def return_freed_memory():
    """Large blocks (a pass's graphs, logits) come from and go back to the OS as they are freed:
    glibc otherwise raises its mmap threshold after the first such free and keeps later ones in
    its heap, where a run's memory crept past its budget (measured: 16 MiB over on the 1.5B at
    half its size with its draft)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD, fixed: no dynamic raise
        libc.mallopt(-1, 128 << 10)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: its own policy
        pass


def _target(path, gf, cfg, options: LoadOptions, reserved: dict | None = None) -> Model:
    if layout_of(gf) is not None or options.dram_budget is not None:
        return FlashModel(
            path,
            options.dram_budget,
            options.threads,
            options.n_ctx,
            options.flash,
            gguf_file=gf,
            all_logits=options.all_logits,
            cfg=cfg,
            reserved=reserved,
            sequences=options.sequences,
        )
    return Model(
        path, n_threads=options.threads, n_ctx=options.n_ctx, gguf_file=gf, cfg=cfg, sequences=options.sequences
    )


def most_sequences(opened: tuple, options: LoadOptions, most: int) -> int:
    """The most sequences, up to `most`, whose KV caches and activations the budget holds
    beside the model (BudgetTooSmall where not even one fits)."""
    gf, cfg = opened
    if options.dram_budget is None and layout_of(gf) is None:
        return most  # dense: no budget to hold to
    for n in range(most, 0, -1):
        try:
            plan_for(gf, cfg, options.dram_budget, options.n_ctx, options.flash, sequences=n)
            return n
        except BudgetTooSmall:
            if n == 1:
                raise
    return 1


def _ngram(options: LoadOptions, notes: list):
    from .speculative import NgramDrafter

    notes.append("draft: n-gram lookup in the prompt and the output so far")
    return NgramDrafter()


def draft_pays(alone, with_draft, draft, k: int) -> tuple[bool, str]:
    """Whether a resident draft beats giving its share to the target: expected tokens per second
    of each plan, a pass costing the larger of its streamed bytes' read and its tokens' compute."""
    streamed = {"alone": alone.streamed_bytes, "with": with_draft.streamed_bytes}
    target_bytes = streamed["alone"] + alone.parts.get("resident matrices", 0)
    compute = target_bytes / COMPUTE_BYTES_PER_S  # one token through every matrix
    draft_token = draft.parts.get("resident matrices", 0) / COMPUTE_BYTES_PER_S
    plain = 1.0 / max(streamed["alone"] / DISK_BYTES_PER_S, compute)
    a = DRAFT_ACCEPTANCE
    per_pass = (1 - a ** (k + 1)) / (1 - a)
    spec = per_pass / (max(streamed["with"] / DISK_BYTES_PER_S, (k + 1) * compute) + k * draft_token)
    verdict = "pays" if spec > plain else "does not pay"
    return spec > plain, (
        f"draft: {verdict} by the cost model: {spec:.1f} tok/s expected with it "
        f"({per_pass:.1f} tokens per pass) against {plain:.1f} without"
    )


def _draft_path(path, gf: GGUFFile, draft: str) -> tuple[str | None, list]:
    """The draft model's file, and notes on the choice."""
    if draft in ("off", "ngram"):
        return None, []
    if draft != "auto":
        if not os.path.exists(draft):
            raise FileNotFoundError(2, "no such draft model file", draft)
        return draft, []
    found = find_draft(path, gf)
    if found is None:
        return None, [
            "draft: none known for this model beside it (a smaller GGUF of the same family "
            "and vocabulary in its folder); n-gram lookup instead"
        ]
    return found, []


def find_draft(path, gf: GGUFFile) -> str | None:
    """A draft for the model at `path`: the largest GGUF in its folder (source or converted) of
    the same family (general.basename) and the same vocabulary, at most half its size."""
    here = Path(path).resolve()
    family = gf.get("general.basename")
    if family is None:
        return None
    size = here.stat().st_size
    best = None
    for candidate in sorted(here.parent.glob("*.gguf")):
        if candidate.resolve() == here or candidate.stat().st_size > size // 2:
            continue
        try:
            other = GGUFFile(candidate)
        except Exception:  # not a model we can read: not a draft
            continue
        if other.get("general.basename") == family and _same_vocabulary(gf, other):
            if best is None or candidate.stat().st_size > best.stat().st_size:
                best = candidate
    return None if best is None else str(best)


def _check_vocabulary(target: GGUFFile, draft: GGUFFile, draft_path):
    if not _same_vocabulary(target, draft):
        raise UnsupportedModel(f"{draft_path}: its vocabulary differs from the target's: it cannot draft for it")


def _same_vocabulary(a: GGUFFile, b: GGUFFile) -> bool:
    key = "tokenizer.ggml.tokens"
    if key not in a.metadata_spans or key not in b.metadata_spans:
        return False
    (s1, e1), (s2, e2) = a.metadata_spans[key], b.metadata_spans[key]
    return e1 - s1 == e2 - s2 and bytes(a.mm[s1:e1]) == bytes(b.mm[s2:e2])


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"
