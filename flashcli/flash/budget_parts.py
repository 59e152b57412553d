"""The parts a budget is split between, each saying what it costs (budget.Part): the file's
header, the resident weights, the KV caches, activations, the runtime reserve, a draft beside
the target; and what shares the room left: a pass's matrices resident while they fit beside the
ring the others stream through (rows), or the neuron caches beside their read buffers (bundles).

Each part's bytes at the plan's prompt batch, and its least, come from here and nowhere else:
the plan's total, its minimum and its "too small" message are sums and lists of these. A new
kind of memory (an expert cache, a GPU's share) is one more part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..engine.config import ModelConfig
from ..engine.gguf_file import GGUFFile
from ..engine.weights import resident_names
from .io_backends import PAGE as SLOT_PAGE
from .weight_stream import Matrix

RUNTIME_RESERVE = 16 << 20  # measured: a flash run's memory beyond its arrays (contexts, objects, stacks)
MIN_CACHE_FRACTION = 0.02  # the smallest neuron cache per layer; beyond it, neurons are read and used once
ROW_PAD = 8  # neuron cache rows are allocated in groups of this many
STAGING_ROWS = 512  # bundles: records read and computed at a time (the staging buffers' rows)


@dataclass(frozen=True)
class Fixed:
    """A part whose bytes no choice of the plan changes."""

    name: str
    nbytes: int

    def minimum(self, batch: int) -> int:
        return self.nbytes

    def bytes(self, batch: int, room: int | None) -> int:
        return self.nbytes

    def description(self) -> str:
        return ""


def file_header(gf: GGUFFile) -> Fixed:
    """Metadata and the tokenizer's vocabulary, which the parser maps."""
    return Fixed("file header", gf.data_offset)


def resident_weights(gf: GGUFFile, cfg: ModelConfig, matrices: bool) -> Fixed:
    """Norms and biases, the predictors (bundles.PREDICTOR_TENSOR), and with `matrices` the
    attention matrices and output head (bundles: rows plans place those as matrices)."""
    names = resident_names(gf, cfg, embeddings=False, matrices=matrices)
    weights = sum(gf.tensor(n).nbytes for n in names)
    weights += sum(t.nbytes for name, t in gf.tensors.items() if ".ffn_pred_" in name)
    return Fixed("resident weights", weights)


def kv_cache(cfg: ModelConfig, n_ctx: int, sequences: int) -> Fixed:
    """Keys and values in f16, a cache per sequence decoded together."""
    return Fixed("KV cache", 2 * cfg.n_layers * cfg.kv_dim * n_ctx * 2 * sequences)


def runtime_reserve() -> Fixed:
    return Fixed("runtime reserve", RUNTIME_RESERVE)


def draft_model(nbytes: int) -> Fixed:
    """A draft running beside the target: its own plan's total, off the target's budget."""
    return Fixed("draft model", nbytes)


def activation_bytes(cfg: ModelConfig, n: int, window: int, fused_ffn: bool) -> int:
    """An upper bound of one layer graph's activations for n tokens over a window of W
    positions (ggml-alloc reuses memory between ops, so this is about the widest point)."""
    attention = 4 * n * (2 * cfg.n_heads * window + 4 * cfg.q_dim + 4 * cfg.kv_dim)
    ffn = 4 * n * 3 * cfg.n_ff if fused_ffn else 0
    return attention + ffn + 4 * n * 8 * cfg.d_model + (64 << 10)


def pass_rows(logits_rows: int, sequences: int) -> int:
    """Rows of logits a pass computes at most: logits_rows for one sequence; for a batch, each
    sequence's next token and as many drafted tokens in all (batch_drafting.py)."""
    return max(logits_rows, 2 * sequences if sequences > 1 else 1)


@dataclass(frozen=True)
class Activations:
    """A pass's activations: a prompt batch (and with several sequences their decoding tokens
    beside it), the decode graphs kept (the layers sharing one buffer), the logits of
    pass_rows; a neuron FFN (not `fused_ffn`) adds its own graphs."""

    cfg: ModelConfig
    n_ctx: int
    logits_rows: int
    fused_ffn: bool
    sequences: int = 1
    name: str = "activations"

    def prompt(self, batch: int) -> int:
        """One prompt batch's activations (budget.ACTIVATION_SHARE bounds them)."""
        return activation_bytes(self.cfg, batch, self.n_ctx, self.fused_ffn)

    def minimum(self, batch: int) -> int:
        cfg, sequences = self.cfg, self.sequences
        tokens = batch + (sequences if sequences > 1 else 0)
        out = activation_bytes(cfg, tokens, self.n_ctx, self.fused_ffn)
        out += activation_bytes(cfg, sequences, self.n_ctx, self.fused_ffn)  # the decode graphs, kept
        out += 4 * pass_rows(self.logits_rows, sequences) * (cfg.d_model + cfg.n_vocab)
        if cfg.moe:
            out += expert_graph_bytes(cfg, tokens, sequences)
        elif not self.fused_ffn:
            # the neuron FFN's: a pass's predictor scores and records graphs over the cache
            # (n_ff slots at most) and a staging chunk, two layers' alive at once; and each
            # layer's decode graphs
            n_ff, d = cfg.n_ff, cfg.d_model
            out += (
                2 * 4 * tokens * (4 * n_ff + 3 * STAGING_ROWS + 4 * d)
                + 4 * cfg.n_layers * (4 * n_ff + 2 * d) * sequences
            )
        return out

    def bytes(self, batch: int, room: int | None) -> int:
        return self.minimum(batch)

    def description(self) -> str:
        return ""


TILED_SCRATCH = 512 << 10  # ggml's tiled kernels' scratch per thread in a product's work buffer


def expert_graph_bytes(cfg: ModelConfig, tokens: int, sequences: int) -> int:
    """A mixture of experts' graphs (expert_ffn.py): a prompt batch's router, experts and shared
    expert, each layer's single-token ones kept, and their one work buffer (the activations in
    8 bits, the per-expert row lists, and ggml's per-thread scratch)."""
    from ..engine.ggml import available_cores

    k, d, E = cfg.n_expert_used, cfg.d_model, cfg.n_expert

    def graphs(n: int) -> int:  # router, experts, shared expert for n tokens
        router = 4 * n * (3 * E + 2 * k)
        experts = 4 * n * (k * (3 * cfg.n_ff_exp + 3 * d) + 2 * d) + 4 * n * 2 * k
        shared = 4 * n * (3 * cfg.n_ff_shexp + 4 * d) if cfg.n_ff_shexp else 0
        return router + experts + shared + 3 * (16 << 10)  # and ggml-alloc's alignment per graph

    work = tokens * k * (d + cfg.n_ff_exp) + 8 * E * (tokens * k + 2) + 64 * (E + 1) + available_cores() * TILED_SCRATCH
    # the layer graph the FFN runs beside, and the head's, keep work buffers with the same scratch
    return graphs(tokens) + cfg.n_layers * graphs(sequences) + work + 2 * available_cores() * TILED_SCRATCH + (64 << 10)


def ring_bytes(streamed: list[Matrix], alignment: int = 4096, read_ahead: bool = True) -> int:
    """A ring that holds one layer's streamed matrices while the next layer's are read: twice
    the largest layer (and room for the largest matrix, where a layer wraps around the end).
    Without read_ahead (an ablation): one layer's, and the largest matrix."""
    if not streamed:
        return 0
    per_layer: dict = {}
    for m in streamed:  # a layer's matrices are held together; the head's pieces one at a time
        held = m.nbytes + 2 * alignment
        per_layer[m.layer] = max(per_layer.get(m.layer, 0), held) if m.layer < 0 else per_layer.get(m.layer, 0) + held
    largest = max(m.nbytes + 2 * alignment for m in streamed)
    if not read_ahead:
        return max(per_layer.values()) + largest
    return max(2 * max(per_layer.values()), max(per_layer.values()) + largest) + largest


@dataclass
class ResidentMatrices:
    """Rows: a pass's large matrices (weight_stream.pass_matrices) resident while they and the
    ring of the others fit the room. Kept first: attention (small, read at every pass like the
    rest), then the output head (all of it or none), then FFN tensors, those that ggml runs on
    repacked kernels first (streamed, they must be repacked as they arrive)."""

    matrices: list[Matrix]
    name: str = "resident matrices"
    resident: list = field(default_factory=list)  # the choice bytes() made
    streamed: list = field(default_factory=list)

    def __post_init__(self):
        ms = self.matrices
        self.units = [[m] for m in ms if m.layer >= 0 and ".attn_" in m.name]  # resident or streamed whole
        self.units.append([m for m in ms if m.layer < 0])
        ffn = [m for m in ms if m.layer >= 0 and ".ffn_" in m.name]
        self.units += [[m] for m in sorted(ffn, key=lambda m: (not m.repacked, m.layer))]
        self.ffn_bytes = sum(m.nbytes for m in ffn)

    def minimum(self, batch: int) -> int:
        return 0  # everything may stream

    def bytes(self, batch: int, room: int | None) -> int:
        """Greedy: the next unit stays resident if it and the ring of the rest still fit."""
        self.resident, self.streamed, held = [], list(self.matrices), 0
        for unit in self.units:
            names = {m.name for m in unit}
            rest = [m for m in self.streamed if m.name not in names]
            nbytes = sum(m.nbytes for m in unit)
            if room is None or held + nbytes + ring_bytes(rest) <= room:
                self.resident += unit
                self.streamed, held = rest, held + nbytes
        return held

    @property
    def ffn_resident_fraction(self) -> float:
        return sum(m.nbytes for m in self.resident if ".ffn_" in m.name) / max(self.ffn_bytes, 1)

    def description(self) -> str:
        kinds = {
            "#" in m.name and "output head" or m.name.split(".")[2].split("_")[0].replace("attn", "attention")
            for m in self.streamed
        }
        return (
            f"FFN: {self.ffn_resident_fraction:.0%} of its bytes resident; {len(self.streamed)} matrices "
            f"({', '.join(sorted(kinds)) or 'none'}) streamed at every pass"
        )


@dataclass(frozen=True)
class StreamRing:
    """Rows: the ring the matrices ResidentMatrices left out stream through (at least, one
    for every matrix of a pass)."""

    placement: ResidentMatrices
    name: str = "stream ring"

    def minimum(self, batch: int) -> int:
        return ring_bytes(self.placement.matrices)

    def bytes(self, batch: int, room: int | None) -> int:
        return ring_bytes(self.placement.streamed)

    def description(self) -> str:
        return ""


def read_buffers(strides, read_buffer: int) -> Fixed:
    """Bundles: a layer's records read for one pass (overflow included), as read and split into
    parts (the staging buffers), and the direct reads' buffer."""
    return Fixed("read buffers", 2 * int(max(strides)) * STAGING_ROWS + read_buffer)


@dataclass
class NeuronCaches:
    """Bundles: neuron caches per layer, in proportion to the share of neurons a token wants
    there (its predicted set; 1.0 without predictor), at least MIN_CACHE_FRACTION, never more
    than the layer has; wanted neurons beyond a layer's cache are read and used once."""

    n_ff: int
    strides: list
    want_fractions: list
    name: str = "neuron caches"
    slots: np.ndarray | None = None  # per layer, the choice bytes() made

    def __post_init__(self):
        n_ff, layers = self.n_ff, len(self.strides)
        self.per_slot = np.asarray(self.strides, np.int64) + 17  # rows + neuron, last use (int64), pin (bool)
        self.want = np.clip(np.asarray(self.want_fractions, np.float64), 1.0 / n_ff, 1.0) * n_ff
        self.min_slots = np.minimum(n_ff, np.full(layers, max(ROW_PAD, int(np.ceil(MIN_CACHE_FRACTION * n_ff)))))

    def _bytes_of(self, slots: np.ndarray) -> int:  # and per layer the neuron -> slot map (int64 a neuron)
        return int(((-(-slots // ROW_PAD) * ROW_PAD) * self.per_slot).sum()) + 8 * self.n_ff * len(self.strides)

    def _slots_at(self, c: float) -> np.ndarray:  # water level c: a layer wanting w neurons gets c * w
        return np.minimum(self.n_ff, np.maximum(self.min_slots, np.floor(c * self.want))).astype(np.int64)

    def minimum(self, batch: int) -> int:
        return self._bytes_of(self.min_slots)

    def bytes(self, batch: int, room: int | None) -> int:
        """The highest water level whose caches fit the room (None: every neuron cached)."""
        if room is None:
            self.slots = np.full(len(self.strides), self.n_ff)
        else:
            lo, hi = 0.0, float(self.n_ff / self.want.min())
            for _ in range(50):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if self._bytes_of(self._slots_at(mid)) <= room else (lo, mid)
            self.slots = self._slots_at(lo)
        return self._bytes_of(self.slots)

    def description(self) -> str:
        slots = self.slots
        return (
            f"neuron caches hold {slots.sum() / (len(slots) * self.n_ff):.0%} of the FFN ({slots.min()}..{slots.max()} "
            f"of {self.n_ff} neurons per layer, {int(max(self.strides))} bytes each)"
        )


@dataclass
class ExpertCaches:
    """Experts (mixtures of experts): per layer, slots of whole experts (expert_cache.py), as
    many in every layer, at least the k a token uses and a spare, never more than the layer has; with the
    staging buffers that bound the reads in flight (expert_reads.py)."""

    n_layers: int
    n_expert: int
    n_used: int
    # per layer, its slots' arrays (expert_slots.slot_kinds: one a kind, or one of whole records):
    # (bytes a slot, in a ggml buffer, the file's offset in a page); types differ between layers
    # (Q4_K_M's down matrices)
    kinds: tuple
    staging: int  # bytes of the staging buffers of the reads in flight
    # the layers sharing each pool of slots (expert_slots.pool_layers: same types and shapes)
    pools: tuple
    name: str = "expert caches"
    slots: int = 0  # per layer, the choice bytes() made

    def _bytes_of(self, slots: int) -> int:
        """What expert_slots allocates for `slots` a layer: per pool of slots shared by layers
        (all of theirs together) each kind's slots (repacked: ggml's buffer with a page and 64
        bytes of slack, expert_slots.repacked_slots_bytes; plain: whole pages from the file's
        offset in a page, where O_DIRECT lands) placed at the pool's first layer's offsets, and
        each slot's owner, expert and last use (int64 each); per layer its row of the pool's maps
        (an expert's slot, faded uses and their pass: 8 bytes each) and the routing statistics;
        and the staging."""
        slot_bytes = 0
        for layers in self.pools:
            n = len(layers) * slots
            slot_bytes += 24 * n + sum(
                n * b + SLOT_PAGE + 64 if in_buffer else -(-(pad + n * b) // SLOT_PAGE) * SLOT_PAGE
                for b, in_buffer, pad in self.kinds[layers[0]]
            )
        routing = 8 * self.n_expert + 4 * self.n_used  # expert_ffn.RoutingStats: picks, the last token's
        return slot_bytes + self.n_layers * (24 * self.n_expert + routing) + self.staging

    @property
    def expert_bytes(self) -> int:
        """The largest layer's gate, up and down of one expert."""
        return max(sum(b for b, _, _ in layer) for layer in self.kinds)

    @property
    def least(self) -> int:
        """A token's experts and a spare (a prompt's experts run in rounds beside k spares)."""
        return min(self.n_used + 1, self.n_expert)

    def minimum(self, batch: int) -> int:
        return self._bytes_of(self.least)

    def bytes(self, batch: int, room: int | None) -> int:
        if room is None:
            self.slots = self.n_expert
        else:
            # at most what the experts' bytes alone allow; then down past the slots' rounding
            per_slot = sum(b for layer in self.kinds for b, _, _ in layer) + 24 * self.n_layers
            fit = max(self.least, min(self.n_expert, (room - self._bytes_of(0)) // per_slot))
            while fit > self.least and self._bytes_of(fit) > room:
                fit -= 1
            self.slots = fit
        return self._bytes_of(self.slots)

    def description(self) -> str:
        pools = len(self.pools)
        shared = f", in {pools} pools shared by layers alike" if pools < self.n_layers else ""
        return (
            f"expert caches hold {self.slots} of {self.n_expert} experts per layer on average "
            f"({self.slots / self.n_expert:.0%}; {self.n_used} used per token, {self.expert_bytes} bytes each{shared})"
        )
