"""--dram-budget: parsing sizes, and splitting a budget between what must stay resident and the
neuron caches.

Units: K, M, G, T (and KiB, MiB, GiB, TiB) are powers of 1024; KB, MB, GB, TB are powers of
1000; a bare number is bytes. "4G" = "4GiB" = 4 * 2^30 bytes; "1.5G" = 1.5 * 2^30.

The budget bounds the memory the model occupies: resident weights (the pages of the file that
are read every token: attention, norms, output head, embeddings when tied, predictors), the KV
cache, activation buffers, I/O buffers and the neuron caches. The interpreter's own baseline
(Python, numpy, llama.cpp's tokenizer) is measured and reported beside it, not inside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .errors import BudgetTooSmall
from .gguf_file import GGUFFile

RUNTIME_RESERVE = 16 << 20  # measured (SmolLM2, ReLU fixture): a flash run's memory beyond its arrays
GROUPS_MIN = 8  # flash.GROUPS: rows of zero padding the grouped down projection needs
MIN_CACHE_FRACTION = 0.02  # the smallest cache per layer; what does not fit is read and used once

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1}


def parse_size(text: str) -> int:
    """'512M', '4G', '4GiB', '1.5G', '2GB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read size {text!r}: use e.g. 512M, 4G, 4GiB, 1.5G")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Plan:
    """How a budget is split (bytes); layer i's neuron cache holds slots[i] neurons."""

    budget: int
    resident_weights: int
    predictors: int
    kv_cache: int
    buffers: int
    neuron_caches: int
    slots: tuple
    slot_bytes: int
    n_ff: int
    minimum: int

    @property
    def cached_fraction(self) -> float:
        return sum(self.slots) / (len(self.slots) * self.n_ff)

    def lines(self) -> list[str]:
        rows = [("resident weights", self.resident_weights), ("predictors", self.predictors),
                ("KV cache", self.kv_cache), ("buffers", self.buffers), ("neuron caches", self.neuron_caches)]
        out = [f"budget {format_size(self.budget)} (minimum for this model {format_size(self.minimum)}):"]
        out += [f"  {name:17s} {format_size(n):>10s}" for name, n in rows]
        out.append(f"  neuron caches hold {self.cached_fraction:.0%} of the FFN ({min(self.slots)}..{max(self.slots)} "
                   f"of {self.n_ff} neurons per layer, {self.slot_bytes} bytes each)")
        return out

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return d | {"slots": list(self.slots), "cached_fraction": self.cached_fraction}


def resident_names(gf: GGUFFile, cfg: ModelConfig) -> list[str]:
    """Tensors read every token, which therefore live in DRAM (through the page cache)."""
    names = ["output_norm.weight", "token_embd.weight" if cfg.tied_output else "output.weight"]
    if gf.has("rope_freqs.weight"):
        names.append("rope_freqs.weight")
    for i in range(cfg.n_layers):
        names += [f"blk.{i}.{n}.weight" for n in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output")]
    return names


def predictor_bytes(gf: GGUFFile) -> int:
    return sum(t.nbytes for name, t in gf.tensors.items() if ".ffn_pred_" in name)


def buffer_bytes(cfg: ModelConfig, batch: int, logits_rows: int, n_ctx: int, staging: int, stride: int) -> int:
    """Activation arenas of the largest graphs (one prompt batch of one layer; the output head),
    the decode graphs kept for every layer, the staging and read buffers of one layer, and a
    reserve for the runtime itself (ggml contexts, Python objects, thread stacks)."""
    qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    layer_batch = 4 * batch * (6 * cfg.d_model + 2 * qkv + 3 * cfg.n_heads * n_ctx)
    head = 4 * logits_rows * (cfg.d_model + cfg.n_vocab)
    decode = cfg.n_layers * 4 * (6 * cfg.d_model + 2 * qkv + 3 * cfg.n_heads * n_ctx)
    # staging rows, and the read buffer: coalesced spans may take in the gaps between wanted
    # records, up to the layer's whole bundle region
    io = staging * stride + min(cfg.n_ff, 2 * staging) * stride
    return layer_batch + head + decode + io + RUNTIME_RESERVE


def plan_budget(gf: GGUFFile, cfg: ModelConfig, budget: int | None, n_ctx: int, batch: int, logits_rows: int,
                slot_bytes: int, stride: int, want_fractions: list[float]) -> Plan:
    """Splits `budget` (None: room for every neuron). want_fractions[i]: the share of layer i's
    neurons a token needs (its predicted set; 1.0 without predictor). Layers get cache slots in
    proportion to it, at least MIN_CACHE_FRACTION of it, never more than the layer has; wanted
    neurons beyond a layer's cache are read and computed once per token (slower, same output)."""
    # + the file's header (metadata, the tokenizer's vocabulary), which the parser maps
    resident = gf.data_offset + sum(gf.tensor(n).nbytes for n in resident_names(gf, cfg))
    preds = predictor_bytes(gf)
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * n_ctx * 2
    per_slot = slot_bytes + 24  # rows + index bookkeeping
    n_ff = cfg.n_ff
    want = np.clip(np.asarray(want_fractions, np.float64), 1.0 / n_ff, 1.0) * n_ff
    min_slots = np.full(cfg.n_layers, max(GROUPS_MIN, int(np.ceil(MIN_CACHE_FRACTION * n_ff))))
    min_slots = np.minimum(n_ff, min_slots).astype(np.int64)

    def slots_at(c: float) -> np.ndarray:  # water level c: a layer wanting w neurons gets c * w
        return np.minimum(n_ff, np.maximum(min_slots, np.floor(c * want))).astype(np.int64)

    def total(slots: np.ndarray) -> int:
        staging = min(n_ff, max(256, int(slots.max()))) + GROUPS_MIN
        return resident + preds + kv + buffer_bytes(cfg, batch, logits_rows, n_ctx, staging, stride) + int(slots.sum()) * per_slot

    minimum = total(min_slots)
    if budget is None:
        slots = np.full(cfg.n_layers, n_ff)
        budget = total(slots)
    elif budget < minimum:
        raise BudgetTooSmall(f"--dram-budget {format_size(budget)} is below the minimum of {format_size(minimum)} "
                             f"for this model (resident weights {format_size(resident)}, predictors {format_size(preds)}, "
                             f"KV cache {format_size(kv)})")
    else:
        lo, hi = 0.0, float(n_ff / want.min())
        for _ in range(50):  # the highest water level that fits
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if total(slots_at(mid)) <= budget else (lo, mid)
        slots = slots_at(lo)
    return Plan(budget, resident, preds, kv, total(slots) - resident - preds - kv - int(slots.sum()) * per_slot,
                int(slots.sum()) * per_slot, tuple(int(x) for x in slots), slot_bytes, n_ff, minimum)
