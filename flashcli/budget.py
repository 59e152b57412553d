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
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .config import ModelConfig
from .errors import BudgetTooSmall
from .gguf_file import GGUFFile
from .weight_stream import Matrix, ring_bytes
from .weights import resident_names

RUNTIME_RESERVE = 16 << 20  # measured: a flash run's memory beyond its arrays (contexts, objects, stacks)
MIN_CACHE_FRACTION = 0.02  # the smallest neuron cache per layer; beyond it, neurons are read and used once
ROW_PAD = 8  # neuron cache rows are allocated in groups of this many
STAGING_ROWS = 512  # bundles: records read and computed at a time (the staging buffers' rows)
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


@dataclass(frozen=True)
class Plan:
    """How a budget is split (bytes, by part), and the FFN's share of it."""

    budget: int
    minimum: int
    parts: dict  # name -> bytes, in the order printed
    prompt_batch: int
    layout: str  # "rows" or "bundles"
    logits_rows: int = 1  # rows of logits computed at a time
    streamed: tuple = ()  # rows: matrices read at every pass (names of weight_stream.Matrix)
    ring: int = 0  # rows: bytes of the ring they stream through
    streamed_bytes: int = 0  # rows: bytes read per pass
    ffn_resident_fraction: float = 0.0  # rows: share of the FFN bytes resident
    slots: tuple = ()  # bundles: neuron cache slots per layer
    n_ff: int = 0
    slot_bytes: int = 0
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
        if self.layout == "rows":
            out.append(
                f"  FFN: {self.ffn_resident_fraction:.0%} of its bytes resident; {len(self.streamed)} matrices "
                f"({self.streamed_kinds()}) streamed at every pass; prompt batches of {self.prompt_batch} tokens"
            )
        else:
            out.append(
                f"  neuron caches hold {self.cached_fraction:.0%} of the FFN ({min(self.slots)}..{max(self.slots)} "
                f"of {self.n_ff} neurons per layer, {self.slot_bytes} bytes each); prompt batches of "
                f"{self.prompt_batch} tokens"
            )
        return out + [f"  {n}" for n in self.notes]

    def streamed_kinds(self) -> str:
        kinds = {
            "#" in n and "output head" or n.split(".")[2].split("_")[0].replace("attn", "attention")
            for n in self.streamed
        }
        return ", ".join(sorted(kinds)) or "none"

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


def activation_bytes(cfg: ModelConfig, n: int, window: int, fused_ffn: bool) -> int:
    """An upper bound of one layer graph's activations for n tokens over a window of W
    positions (ggml-alloc reuses memory between ops, so this is about the widest point)."""
    attention = 4 * n * (2 * cfg.n_heads * window + 4 * cfg.q_dim + 4 * cfg.kv_dim)
    ffn = 4 * n * 3 * cfg.n_ff if fused_ffn else 0
    return attention + ffn + 4 * n * 8 * cfg.d_model + (64 << 10)


def fixed_parts(
    gf: GGUFFile,
    cfg: ModelConfig,
    n_ctx: int,
    batch: int,
    logits_rows: int,
    fused_ffn: bool,
    embeddings_resident: bool,
    matrices: bool = True,
    sequences: int = 1,
) -> dict:
    """Everything but what streams: header, resident weights (norms, and with `matrices` the
    attention matrices and output head), KV caches (one per sequence decoded together),
    activations (a pass of `sequences` decoding tokens, kept; a prompt batch beside them; the
    logits of pass_rows), reserve."""
    weights = sum(
        gf.tensor(n).nbytes for n in resident_names(gf, cfg, embeddings=embeddings_resident, matrices=matrices)
    )
    weights += sum(t.nbytes for name, t in gf.tensors.items() if ".ffn_pred_" in name)  # bundles.PREDICTOR_TENSOR
    decode_graphs = activation_bytes(cfg, sequences, n_ctx, fused_ffn)  # kept, the layers sharing one buffer
    pass_tokens = batch + (sequences if sequences > 1 else 0)
    return {
        "file header": gf.data_offset,  # metadata and the tokenizer's vocabulary, which the parser maps
        "resident weights": weights,
        "KV cache": 2 * cfg.n_layers * cfg.kv_dim * n_ctx * 2 * sequences,
        "activations": activation_bytes(cfg, pass_tokens, n_ctx, fused_ffn)
        + decode_graphs
        + 4 * pass_rows(logits_rows, sequences) * (cfg.d_model + cfg.n_vocab),
        "runtime reserve": RUNTIME_RESERVE,
    }


def pass_rows(logits_rows: int, sequences: int) -> int:
    """Rows of logits a pass computes at most: logits_rows for one sequence; for a batch, each
    sequence's next token and as many drafted tokens in all (batch_drafting.py)."""
    return max(logits_rows, 2 * sequences if sequences > 1 else 1)


def prompt_batch(
    cfg: ModelConfig,
    budget: int | None,
    n_ctx: int,
    fused_ffn: bool,
    fits=lambda b: True,
    batches: tuple = (MIN_PROMPT_BATCH, MAX_PROMPT_BATCH),
) -> int:
    """The largest prompt batch (a power of two in `batches`, 8 to 512 by default) whose
    activations take at most ACTIVATION_SHARE of the budget and with which the plan fits
    (`fits(batch)`): each batch is one pass over the FFN (one read of what is streamed), so
    larger is faster when memory allows."""
    smallest, batch = batches
    while (
        batch > smallest
        and budget is not None
        and (activation_bytes(cfg, batch, n_ctx, fused_ffn) > ACTIVATION_SHARE * budget or not fits(batch))
    ):
        batch //= 2
    return batch


def _too_small(budget: int, minimum: int, parts: dict) -> BudgetTooSmall:
    biggest = ", ".join(f"{k} {format_size(v)}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:3])
    return BudgetTooSmall(
        f"--dram-budget {format_size(budget)} is below the minimum of {format_size(minimum)} for this model ({biggest})"
    )


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
    they fit, the others streamed through a ring at every pass. Kept resident first: attention
    (small, and read at every pass like the rest), then the output head (all of it or none),
    then FFN tensors, those that ggml runs on repacked kernels first (streamed, they must be
    repacked as they arrive). `reserved` parts (a draft model) come off the budget first."""
    reserved = dict(reserved or {})
    units: list[list[Matrix]] = []  # what is resident or streamed as a whole, in order of preference
    units += [[m] for m in matrices if m.layer >= 0 and ".attn_" in m.name]
    units.append([m for m in matrices if m.layer < 0])
    ffn = [m for m in matrices if m.layer >= 0 and ".ffn_" in m.name]
    units += [[m] for m in sorted(ffn, key=lambda m: (not m.repacked, m.layer))]
    ffn_bytes = sum(m.nbytes for m in ffn)

    def fixed(batch):
        return fixed_parts(gf, cfg, n_ctx, batch, logits_rows, True, False, matrices=False, sequences=sequences)

    def base(batch):
        return sum(fixed(batch).values()) + sum(reserved.values())

    minimum = base(batches[0]) + ring_bytes(matrices)
    batch = prompt_batch(cfg, budget, n_ctx, True, lambda b: base(b) + ring_bytes(matrices) <= budget, batches)
    fixed = fixed(batch) | reserved
    if budget is not None and budget < minimum:
        raise _too_small(budget, minimum, fixed | {"stream ring": ring_bytes(matrices)})
    room = None if budget is None else budget - sum(fixed.values())
    resident, streamed = [], list(matrices)
    held = 0
    for unit in units:  # greedy: the next unit stays resident if it and the ring still fit
        names = {m.name for m in unit}
        rest = [m for m in streamed if m.name not in names]
        nbytes = sum(m.nbytes for m in unit)
        if room is None or held + nbytes + ring_bytes(rest) <= room:
            resident += unit
            streamed, held = rest, held + nbytes
    parts = fixed | {"resident matrices": held, "stream ring": ring_bytes(streamed)}
    total = sum(parts.values())
    return Plan(
        budget if budget is not None else total,
        minimum,
        parts,
        batch,
        "rows",
        logits_rows,
        streamed=tuple(m.name for m in streamed),
        ring=ring_bytes(streamed),
        streamed_bytes=sum(m.nbytes for m in streamed),
        ffn_resident_fraction=sum(m.nbytes for m in resident if ".ffn_" in m.name) / max(ffn_bytes, 1),
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
    """Bundles layout: neuron caches per layer, in proportion to the share of neurons a token
    wants there (its predicted set; 1.0 without predictor), at least MIN_CACHE_FRACTION, never
    more than the layer has; wanted neurons beyond a layer's cache are read and used once."""
    n_ff = cfg.n_ff
    strides = np.asarray(strides, np.int64)
    # staging: a layer's records read for one pass (overflow included), as read and split into
    # parts, and the read buffer
    io = 2 * int(strides.max()) * STAGING_ROWS + read_buffer
    per_slot = strides + 17  # rows + the slot's neuron, last use (int64) and pin (bool)
    want = np.clip(np.asarray(want_fractions, np.float64), 1.0 / n_ff, 1.0) * n_ff
    min_slots = np.minimum(n_ff, np.full(cfg.n_layers, max(ROW_PAD, int(np.ceil(MIN_CACHE_FRACTION * n_ff)))))

    def fixed_at(batch):
        parts = fixed_parts(gf, cfg, n_ctx, batch, logits_rows, False, False, sequences=sequences)
        # the neuron FFN's own graphs: a pass's predictor scores and records graphs over the
        # cache (n_ff slots at most) and a staging chunk, two layers' alive at once; and each
        # layer's decode graphs
        d, tokens = cfg.d_model, batch + (sequences if sequences > 1 else 0)
        parts["activations"] += (
            2 * 4 * tokens * (4 * n_ff + 3 * STAGING_ROWS + 4 * d) + 4 * cfg.n_layers * (4 * n_ff + 2 * d) * sequences
        )
        return parts

    def caches(slots) -> int:  # and per layer the neuron -> slot map (int64 a neuron)
        return int(((-(-slots // ROW_PAD) * ROW_PAD) * per_slot).sum()) + 8 * n_ff * cfg.n_layers

    minimum_base = sum(fixed_at(MIN_PROMPT_BATCH).values()) + io
    batch = prompt_batch(
        cfg, budget, n_ctx, False, lambda b: sum(fixed_at(b).values()) + io + caches(min_slots) <= budget
    )
    fixed = fixed_at(batch)
    base = sum(fixed.values()) + io

    def slots_at(c: float) -> np.ndarray:  # water level c: a layer wanting w neurons gets c * w
        return np.minimum(n_ff, np.maximum(min_slots, np.floor(c * want))).astype(np.int64)

    minimum = minimum_base + caches(min_slots)
    if budget is None:
        slots = np.full(cfg.n_layers, n_ff)
    elif budget < minimum:
        raise _too_small(budget, minimum, fixed | {"read buffers": io})
    else:
        lo, hi = 0.0, float(n_ff / want.min())
        for _ in range(50):  # the highest water level that fits
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if base + caches(slots_at(mid)) <= budget else (lo, mid)
        slots = slots_at(lo)
    parts = fixed | {"read buffers": io, "neuron caches": caches(slots)}
    total = sum(parts.values())
    return Plan(
        budget if budget is not None else total,
        minimum,
        parts,
        batch,
        "bundles",
        logits_rows,
        slots=tuple(int(x) for x in slots),
        n_ff=n_ff,
        slot_bytes=int(strides.max()),
    )
