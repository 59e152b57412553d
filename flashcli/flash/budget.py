"""--dram-budget: parsing it, and splitting it between what must stay resident and the FFN.

Sizes: K, M, G, T (and KiB, MiB, GiB, TiB) are powers of 1024; KB, MB, GB, TB are powers of
1000; a bare number is bytes; "50%" is that share of the model file. "4G" = "4GiB" = 4 * 2^30.

The budget bounds the memory the model occupies: the file's header, the resident weights
(norms, and the matrices the budget holds: copies in our own memory, the file's pages dropped),
the KV cache, activation and I/O buffers, a measured runtime reserve, a draft model where one
runs beside the target, and what streams: the ring of streamed matrices ("rows": any large
matrix, the FFN's first, then the output head, then attention) or neuron caches ("bundles").
The interpreter's own baseline (Python, numpy, llama.cpp's tokenizer) is measured and reported
beside it, not inside it. Reads bypass the page cache, so it does not grow under the budget.

This module makes the plan, and only it: `plan_rows` and `plan_neurons` list a layout's parts
(budget_parts.py), each of which says what it costs at a prompt batch and at least (`Part`);
`plan_for` picks the layout and the rows of logits a pass computes; `split` chooses the
prompt batch, refuses a budget below the parts' least with the largest of them named, and gives
each part in turn the room the ones before it left (the last ones share it: what is resident
and what streams). The plan's lines for -v are the parts' bytes and descriptions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

from ..engine.bundles import PREDICTOR, layer_layouts
from ..engine.config import ModelConfig
from ..engine.gguf_file import GGUFFile
from ..engine.model import LOGITS_ROWS
from ..errors import BudgetTooSmall
from . import budget_parts as parts_of
from .io_backends import MAX_READ_BUFFER
from .weight_stream import Matrix, pass_matrices

MAX_PROMPT_BATCH = 512
MIN_PROMPT_BATCH = 8
ACTIVATION_SHARE = 0.08  # of the budget, for one prompt batch's activations

_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)")
_SHARE = re.compile(r"([0-9]+(?:\.[0-9]+)?)%")


def parse_size(text: str, reference: int | None = None) -> int:
    """'512M', '4G', '4GiB', '1.5G', '2GB', '1000000' -> bytes; '50%' -> half of `reference`.
    Anything else (empty, zero, negative, spaces, exponents, unknown units) is a ValueError."""
    text = str(text)
    hint = "use e.g. 512M, 4G, 4GiB, 1.5G or 50% (of the model file)"
    if not text.strip():
        raise ValueError(f"empty size: {hint}")
    share = _SHARE.fullmatch(text)
    if share:
        if reference is None:
            raise ValueError(f"a size in % ({text!r}) needs a model file to be a share of")
        value = float(share.group(1)) / 100 * reference
    else:
        m = _SIZE.fullmatch(text)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read size {text!r}: {hint}")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1:
        raise ValueError(f"size {text!r} must be more than zero")
    return int(value)


def format_size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


class Part(Protocol):
    """A share of the budget (budget_parts.py): its bytes at prompt batches of `batch` tokens
    with `room` left by the parts before it (None: no budget), its least at that batch, and a
    line for -v about what it chose ("" for none, read after bytes())."""

    name: str

    def bytes(self, batch: int, room: int | None) -> int: ...

    def minimum(self, batch: int) -> int: ...

    def description(self) -> str: ...


@dataclass(frozen=True)
class Plan:
    """How a budget is split (bytes, by part), and the FFN's share of it."""

    budget: int
    minimum: int
    parts: dict  # name -> bytes, in the order printed
    prompt_batch: int
    layout: str  # "rows", "bundles" or "experts"
    logits_rows: int = 1  # rows of logits computed at a time
    streamed: tuple = ()  # rows: matrices read at every pass (names of weight_stream.Matrix)
    ring: int = 0  # rows: bytes of the ring they stream through
    streamed_bytes: int = 0  # rows: bytes read per pass
    ffn_resident_fraction: float = 0.0  # rows: share of the FFN bytes resident
    slots: tuple = ()  # bundles: neuron cache slots per layer
    n_ff: int = 0
    descriptions: tuple = ()  # the parts' lines for -v
    notes: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def cached_fraction(self) -> float:
        return sum(self.slots) / (len(self.slots) * self.n_ff) if self.slots else self.ffn_resident_fraction

    def lines(self) -> list[str]:
        out = [f"budget {format_size(self.budget)} (minimum for this model {format_size(self.minimum)}):"]
        out += [f"  {name:19s} {format_size(n):>10s}" for name, n in self.parts.items()]
        out.append("  " + "; ".join([*self.descriptions, f"prompt batches of {self.prompt_batch} tokens"]))
        return out + [f"  {n}" for n in self.notes]

    def as_dict(self) -> dict:
        return {
            "budget": self.budget,
            "minimum": self.minimum,
            "parts": dict(self.parts),
            "layout": self.layout,
            "prompt_batch": self.prompt_batch,
            "streamed_tensors": len(self.streamed),
            "streamed_bytes": self.streamed_bytes,
            "ring": self.ring,
            "slots": list(self.slots),
            "cached_fraction": self.cached_fraction,
        }


@dataclass(frozen=True)
class Split:
    budget: int
    minimum: int
    prompt_batch: int
    parts: dict  # name -> bytes
    descriptions: tuple

    def plan(self, layout: str, logits_rows: int, **fields) -> Plan:
        """The Plan of this split for a layout, with the layout's own fields."""
        return Plan(
            self.budget,
            self.minimum,
            self.parts,
            self.prompt_batch,
            layout,
            logits_rows,
            descriptions=self.descriptions,
            **fields,
        )


def split(budget: int | None, parts: list[Part], batches: tuple, activations: parts_of.Activations) -> Split:
    """The budget among `parts`, in their order. The prompt batch is the largest power of two in
    `batches` whose activations take at most ACTIVATION_SHARE of the budget and at which the
    parts' least fits: each batch is one pass over the FFN (one read of what is streamed), so
    larger is faster when memory allows."""
    smallest, batch = batches

    def least(b: int) -> int:
        return sum(p.minimum(b) for p in parts)

    minimum = least(smallest)
    while (
        batch > smallest
        and budget is not None
        and (activations.prompt(batch) > ACTIVATION_SHARE * budget or least(batch) > budget)
    ):
        batch //= 2
    if budget is not None and budget < minimum:
        raise _too_small(budget, minimum, {p.name: p.minimum(batch) for p in parts})
    out, room = {}, budget
    for p in parts:
        out[p.name] = n = p.bytes(batch, room)
        room = None if room is None else room - n
    total = sum(out.values())
    described = tuple(d for d in (p.description() for p in parts) if d)
    return Split(budget if budget is not None else total, minimum, batch, out, described)


def _too_small(budget: int, minimum: int, parts: dict) -> BudgetTooSmall:
    biggest = ", ".join(f"{k} {format_size(v)}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:3])
    return BudgetTooSmall(
        f"--dram-budget {format_size(budget)} is below the minimum of {format_size(minimum)} for this model ({biggest})"
    )


def _common(gf: GGUFFile, cfg: ModelConfig, n_ctx: int, matrices: bool, sequences: int) -> list[Part]:
    return [
        parts_of.file_header(gf),
        parts_of.resident_weights(gf, cfg, matrices),
        parts_of.kv_cache(cfg, n_ctx, sequences),
    ]


def plan_rows(
    gf: GGUFFile,
    cfg: ModelConfig,
    budget: int | None,
    n_ctx: int,
    logits_rows: int,
    matrices: list[Matrix],
    reserved: dict | None = None,
    batches: tuple = (MIN_PROMPT_BATCH, MAX_PROMPT_BATCH),
    sequences: int = 1,
) -> Plan:
    """Rows layout: the large matrices of a pass (weight_stream.pass_matrices) resident while
    they fit, the others streamed through a ring at every pass (budget_parts.ResidentMatrices).
    `reserved` parts (a draft model) come off the budget first."""
    activations = parts_of.Activations(cfg, n_ctx, logits_rows, fused_ffn=True, sequences=sequences)
    placement = parts_of.ResidentMatrices(matrices)
    parts = _common(gf, cfg, n_ctx, False, sequences) + [activations, parts_of.runtime_reserve()]
    parts += [parts_of.Fixed(name, n) for name, n in (reserved or {}).items()]
    parts += [placement, parts_of.StreamRing(placement)]
    s = split(budget, parts, batches, activations)
    return s.plan(
        "rows",
        logits_rows,
        streamed=tuple(m.name for m in placement.streamed),
        ring=s.parts["stream ring"],
        streamed_bytes=sum(m.nbytes for m in placement.streamed),
        ffn_resident_fraction=placement.ffn_resident_fraction,
    )


def plan_neurons(
    gf: GGUFFile,
    cfg: ModelConfig,
    budget: int | None,
    n_ctx: int,
    logits_rows: int,
    strides: list[int],
    want_fractions: list[float],
    read_buffer: int,
    sequences: int = 1,
) -> Plan:
    """Bundles layout: attention, the head and predictors resident, and neuron caches per layer
    (budget_parts.NeuronCaches) in the room the rest leaves."""
    activations = parts_of.Activations(cfg, n_ctx, logits_rows, fused_ffn=False, sequences=sequences)
    caches = parts_of.NeuronCaches(cfg.n_ff, list(strides), list(want_fractions))
    parts = _common(gf, cfg, n_ctx, True, sequences) + [activations, parts_of.runtime_reserve()]
    parts += [parts_of.read_buffers(strides, read_buffer), caches]
    s = split(budget, parts, (MIN_PROMPT_BATCH, MAX_PROMPT_BATCH), activations)
    return s.plan("bundles", logits_rows, slots=tuple(int(x) for x in caches.slots), n_ff=cfg.n_ff)


def plan_experts(
    gf: GGUFFile,
    cfg: ModelConfig,
    budget: int | None,
    n_ctx: int,
    logits_rows: int,
    sequences: int = 1,
    batches: tuple = (MIN_PROMPT_BATCH, MAX_PROMPT_BATCH),
) -> Plan:
    """Experts layout (a mixture of experts): attention, the head, routers and shared experts
    resident, and expert caches per layer (budget_parts.ExpertCaches) in the room the rest
    leaves."""
    from .expert_reads import staging_bytes
    from .expert_slots import pool_layers, slot_kinds, staged_bytes

    activations = parts_of.Activations(cfg, n_ctx, logits_rows, fused_ffn=False, sequences=sequences)
    kinds = tuple(slot_kinds(gf, i) for i in range(cfg.n_layers))
    # the staging buffers that bound the reads in flight (expert_reads.py), for the largest read
    staging = staging_bytes(max(staged_bytes(gf, i) for i in range(cfg.n_layers)))
    caches = parts_of.ExpertCaches(
        cfg.n_layers, cfg.n_expert, cfg.n_expert_used, kinds, staging, pool_layers(gf, cfg.n_layers)
    )
    parts = _common(gf, cfg, n_ctx, True, sequences) + [activations, parts_of.runtime_reserve(), caches]
    s = split(budget, parts, batches, activations)
    return s.plan("experts", logits_rows, slots=(caches.slots,) * cfg.n_layers, n_ff=cfg.n_expert)


def prompt_batches(batches: tuple, n_ctx: int) -> tuple:
    """(smallest, largest) prompt batch, the largest no more than the power of two that holds
    the whole context: no pass has more tokens than that, and the activations of a larger batch
    would take expert slots or streaming room for nothing."""
    smallest, largest = batches
    return smallest, max(smallest, min(largest, 1 << max(n_ctx - 1, 0).bit_length()))


LOGITS_ROW_CHOICES = (LOGITS_ROWS, 16, 8, 4, 2, 1)  # perplexity's, most first; generation needs one


def plan_for(gf, cfg, budget, n_ctx, options, all_logits=False, reserved=None, sequences=1) -> Plan:
    """The plan a flash model of this file runs under (flash.FlashModel), without loading
    anything; `options` are its flash.FlashOptions, `reserved` parts of the budget are not its
    to use (a draft beside it), `n_ctx` its KV cache's positions."""
    batches = prompt_batches(options.prompt_batches, n_ctx)
    if cfg.moe:

        def make(rows, budget):
            return plan_experts(gf, cfg, budget, n_ctx, rows, sequences, batches)

    elif (cfg.ffn_layout or "rows") == "rows":
        matrices = pass_matrices(gf, cfg)

        def make(rows, budget):
            return plan_rows(gf, cfg, budget, n_ctx, rows, matrices, reserved, batches, sequences)

    else:
        layouts = layer_layouts(gf, cfg.d_model, cfg.n_layers)
        want = [float(x) for x in gf.get(PREDICTOR + "predicted_fraction", [1.0] * cfg.n_layers)]
        if not options.predictor or options.sparsity is not None:
            want = [1.0 - (options.sparsity or 0.0) if options.predictor else 1.0] * cfg.n_layers
        strides = [x.stride for x in layouts]
        # the most a direct read spans in its buffer: reads are split to stay within
        # MAX_READ_BUFFER, but one record's aligned extent is read whole
        read_buffer = max(MAX_READ_BUFFER, max(strides) + 2 * 4096)

        def make(rows, budget):
            return plan_neurons(gf, cfg, budget, n_ctx, rows, strides, want, read_buffer, sequences)

    # perplexity scores every token: the most logits rows at a time whose minimum the budget
    # meets (a plan's minimum does not depend on its budget: each candidate's is read from its
    # plan with room for everything); generation needs one
    if not all_logits or budget is None:
        return make(LOGITS_ROWS if all_logits else 1, budget)
    rows = next((rows for rows in LOGITS_ROW_CHOICES if make(rows, None).minimum <= budget), 1)
    return make(rows, budget)  # where none fits, the plan of one row says by how much
