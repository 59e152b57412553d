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

import numpy as np

from ..engine.bundles import DRAFT_VOCAB, layout_of
from ..engine.config import ModelConfig
from ..engine.gguf_file import GGUFFile
from ..engine.model import Model
from ..engine.weight_types import open_checked
from ..errors import BudgetTooSmall, UnsupportedModel
from ..flash import measured
from ..flash.budget import Plan
from ..flash.flash_model import FlashModel, FlashOptions, plan_for

DRAFT_CHOICES = ("auto", "ngram", "off")
DRAFT_ACCEPTANCE = 0.8  # the prior acceptance of a same-family draft (BENCHMARKS.md)
DRAFT_MARGIN = 1.1  # a resident draft's expected speed must beat the target's alone by this factor
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
    gpu: bool = False  # the graphs on ggml's CUDA backend (gpu.py)
    gpu_budget: int | None = None  # bytes of weights resident there (None: all); the rest streams


@dataclass
class Loaded:
    model: Model
    drafter: object | None = None  # speculative.Drafter
    draft_model: Model | None = None
    notes: list = field(default_factory=list)  # why a draft was or was not used (--verbose)
    plan: Plan | None = None  # the target's, under a budget (None: dense)
    rates: tuple = (1.0, 1.0)  # (disk, compute) bytes/s measured here (measured.py), read once at load

    def pass_cost(self, n: int) -> float:
        """The cost model's seconds for a pass of the target over n tokens (speculative.py's
        prior, until passes are measured)."""
        return _pass_seconds(self.rates, self.plan, n)

    def close(self):
        for m in (self.model, self.draft_model):
            if isinstance(m, FlashModel):
                m.close()


def spin_briefly() -> None:
    """Idle OpenMP workers spin 10,000 rounds before they sleep, not libgomp's 300,000, unless the
    user says otherwise: a mixture of experts runs three graphs a layer with reads between them,
    and the spinning workers took the cores the readers needed. On qwen3-30b-a3b at 50% (A/B
    alternated, 32 tokens, cold): 2.66 and 2.95 tok/s against 2.24 and 2.49, both the io wait and
    the rest of the token shorter; dense models are left as they were (the round that tried
    passive waiting found it cost --batch a quarter). libgomp reads it when it loads, which is
    the first ggml call (ggml_bindings.lib()): before that, or not at all."""
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def check(path) -> tuple[GGUFFile, ModelConfig]:
    """The file and its config, failing fast with the one-line error on a file no engine runs.
    The first look at a model, before ggml loads: where OpenMP's spinning is set for it."""
    gf = open_checked(path)
    cfg = ModelConfig.from_gguf(gf)  # the config reads the layout, once
    if cfg.moe:
        spin_briefly()
    return gf, cfg


def load(path, options: LoadOptions = LoadOptions(), opened: tuple | None = None) -> Loaded:
    """The target (and a draft, as options.draft says): a converted file, or any file under a
    budget, runs flash; a plain GGUF without one runs dense."""
    gf, cfg = opened or check(path)
    if options.dram_budget is not None:
        return_freed_memory()
    if options.sequences > 1:  # passes carry a token of each sequence: no draft beside them
        return _loaded(_target(path, gf, cfg, options), None, None, ["draft: off (sequences batched instead)"])
    if options.draft == "auto" and (cfg.ffn_layout == "bundles" or cfg.moe):
        # the neuron FFN's sums depend on the batch: verifying would change the output; a
        # model draft beside an expert cache is not planned
        note = (
            "draft: off (a mixture of experts: no draft model beside its expert caches)"
            if cfg.moe
            else "draft: off (a bundles file: its neuron FFN rounds a batch differently from a token alone)"
        )
        return _loaded(_target(path, gf, cfg, options), None, None, [note])
    draft_path, notes = _draft_path(path, gf, options.draft)
    if draft_path is None or options.dram_budget is None and cfg.ffn_layout is None:
        if draft_path is not None:
            notes.append("draft: off (no --dram-budget: the whole model is resident, compute-bound)")
            draft_path = None
        model = _target(path, gf, cfg, options)
        drafter = _ngram(options, notes) if options.draft == "ngram" else None
        return _loaded(model, drafter, None, notes)
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
        return _loaded(_target(path, gf, cfg, options), _ngram(options, notes), None, notes)
    if options.draft == "auto":
        alone = plan_for(gf, cfg, options.dram_budget, options.n_ctx, options.flash, options.all_logits)
        pays, why = draft_pays(alone, with_draft, draft_plan, options.max_draft, path, draft_path)
        notes.append(why)
        if not pays:
            return _loaded(_target(path, gf, cfg, options), _ngram(options, notes), None, notes)
    from .generate import prefill
    from .speculative import ModelDrafter

    draft = FlashModel(
        draft_path, None, options.threads, options.n_ctx, draft_options, gguf_file=draft_gf, cfg=draft_cfg
    )
    target = _target(path, gf, cfg, replace(options, flash=flash), reserved)
    notes.append(f"draft: {Path(draft_path).name}, resident ({_mib(draft_plan.total)} of the budget)")
    vocabulary = draft_gf.get(DRAFT_VOCAB)
    vocabulary = None if vocabulary is None else np.asarray(vocabulary, np.int64)
    if vocabulary is None:
        notes.append("draft: not lean (`flashcli convert --layout draft` makes it smaller and faster)")
    drafter = ModelDrafter(draft, str(draft_path), prefill, vocabulary=vocabulary, n_vocab=cfg.n_vocab)
    return _loaded(target, drafter, draft, notes)


def _loaded(model: Model, drafter, draft_model, notes: list) -> Loaded:
    plan = model.plan if isinstance(model, FlashModel) else None
    return Loaded(model, drafter, draft_model, notes, plan, _rates(model.gf.path))


def _rates(target_file) -> tuple[float, float]:
    return measured.disk().value, measured.compute(target_file).value


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
    if cfg.ffn_layout is not None or options.dram_budget is not None:
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
    device = None
    if options.gpu:
        from ..engine.gpu import Device

        device = Device(budget=options.gpu_budget)
    return Model(
        path,
        n_threads=options.threads,
        n_ctx=options.n_ctx,
        gguf_file=gf,
        cfg=cfg,
        sequences=options.sequences,
        device=device,
    )


def most_sequences(opened: tuple, options: LoadOptions, most: int) -> int:
    """The most sequences, up to `most`, whose KV caches and activations the budget holds
    beside the model (BudgetTooSmall where not even one fits)."""
    gf, cfg = opened
    if options.dram_budget is None and cfg.ffn_layout is None:
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


def _pass_seconds(rates: tuple[float, float], plan: Plan | None, n: int) -> float:
    """A pass of n tokens: the larger of its streamed bytes' read and its tokens' compute, at the
    rates measured on this machine (measured.py)."""
    if plan is None:
        return 1.0
    weights = plan.streamed_bytes + plan.parts.get("resident matrices", 0)
    disk, compute = rates
    return max(plan.streamed_bytes / disk, n * weights / compute)


def draft_pays(alone: Plan, with_draft: Plan, draft: Plan, k: int, target_file, draft_file) -> tuple[bool, str]:
    """Whether a resident draft beats giving its share to the target: expected tokens per second
    of each plan, at the rates earlier runs measured here (measured.py: medians over several
    runs, priors before enough). It must win by DRAFT_MARGIN: where the two are about even, the
    figures' noise would decide, and the choice stays the default (no model draft)."""
    disk, target, drafting = measured.disk(), measured.compute(target_file), measured.compute(draft_file)
    rates = (disk.value, target.value)
    draft_token = draft.parts.get("resident matrices", 0) / drafting.value
    plain = 1.0 / _pass_seconds(rates, alone, 1)
    a = DRAFT_ACCEPTANCE

    def rate(j: int) -> tuple[float, float]:  # (tokens/s, tokens per pass) drafting j tokens a pass
        per_pass = (1 - a ** (j + 1)) / (1 - a)
        return per_pass / (_pass_seconds(rates, with_draft, j + 1) + j * draft_token), per_pass

    spec, per_pass = max(rate(j) for j in range(1, k + 1))  # the draft length adapts to the best
    pays = spec > DRAFT_MARGIN * plain
    return pays, (
        f"draft: {'pays' if pays else 'does not pay'} by the cost model: {spec:.1f} tok/s expected with it "
        f"({per_pass:.1f} tokens per pass) against {plain:.1f} without (it must win by {DRAFT_MARGIN - 1:.0%}); "
        f"figures: disk reads {disk.describe()}, target compute {target.describe()}, "
        f"draft compute {drafting.describe()}"
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


def find_draft(path, gf: GGUFFile, lean: bool = True) -> str | None:
    """A draft for the model at `path`: a GGUF in its folder of the same family
    (general.basename) and the same vocabulary, at most half its size; a lean draft
    (converters/lean_draft.py) before any other where `lean`, else the largest plain one."""
    here = Path(path).resolve()
    family = gf.get("general.basename")
    if family is None:
        return None
    size = here.stat().st_size
    best, best_key = None, None
    for candidate in sorted(here.parent.glob("*.gguf")):
        if candidate.resolve() == here or candidate.stat().st_size > size // 2:
            continue
        try:
            other = GGUFFile(candidate)
        except Exception:  # not a model we can read: not a draft
            continue
        is_lean = other.get(DRAFT_VOCAB) is not None
        if other.get("general.basename") != family or not _same_vocabulary(gf, other):
            continue
        if (is_lean and not lean) or (not is_lean and layout_of(other) is not None):
            continue
        key = (is_lean, candidate.stat().st_size)
        if best_key is None or key > best_key:
            best, best_key = candidate, key
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
