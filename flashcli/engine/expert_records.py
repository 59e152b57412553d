"""Experts laid out as records: how a converted mixture of experts stores a layer's experts so
that one read fetches an expert.

A GGUF stacks each kind of a layer's experts in its own tensor (`blk.{i}.ffn_gate_exps.weight`
[ne0, rows, n_expert], and up, down): an expert is three reads, one in each. A converted file
stores the layer's experts in one tensor of records instead (`blk.{i}.ffn_exps.records`,
I8 [record_bytes, n_expert]): expert e's gate, up and down bytes side by side, padded to a page,
so that an expert is one read of a few MB, which this disk serves a quarter faster than three
reads of a third of it (BENCHMARKS.md, "Which experts stay"). The metadata says each kind's type
per layer and its shape. The stacked tensors' names still answer (GGUFFile.tensor): each is a
view of its kind in every record, `stride` bytes from one expert to the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("gate", "up", "down")
KEY = "flashcli.experts."  # + {kind}_type: [n_layers] ggml types; + {kind}_ne: [ne0, rows, n_expert]
# [n_layers * n_expert]: tokens of calibration text that picked each expert of each layer
# (converters/expert_calibration.py); flash generation starts with the experts picked most
PICKS = KEY + "calibration_picks"
RECORD_ALIGN = 4096  # records start on a page: read straight into page-aligned slots with O_DIRECT
I8 = 24  # ggml's GGML_TYPE_I8: the records tensor holds bytes


def stacked_name(layer: int, kind: str) -> str:
    return f"blk.{layer}.ffn_{kind}_exps.weight"


def records_name(layer: int) -> str:
    return f"blk.{layer}.ffn_exps.records"


@dataclass(frozen=True)
class RecordLayout:
    """One expert's record: each kind's bytes (KINDS order) side by side, padded to RECORD_ALIGN."""

    kind_bytes: tuple

    @property
    def offsets(self) -> tuple:
        return tuple(int(x) for x in np.cumsum((0,) + self.kind_bytes[:-1]))

    @property
    def record_bytes(self) -> int:
        return -(-sum(self.kind_bytes) // RECORD_ALIGN) * RECORD_ALIGN


def expert_bytes(ggml_type: int, ne: tuple) -> int:
    """Bytes of one expert of a stacked tensor [ne0, rows, n_expert] of this type."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    return ne[0] // block * type_size * ne[1]


def layout_of(types: tuple, shapes: tuple) -> RecordLayout:
    """The record of a layer whose kinds have these types and shapes (KINDS order)."""
    return RecordLayout(tuple(expert_bytes(t, ne) for t, ne in zip(types, shapes)))


def metadata(layer_types: list, shapes: tuple) -> dict:
    """The keys a converted file describes its records with: layer_types[i] the kinds' types of
    layer i, shapes the kinds' stacked shapes (the same in every layer)."""
    out = {KEY + f"{kind}_type": [int(types[k]) for types in layer_types] for k, kind in enumerate(KINDS)}
    out.update({KEY + f"{kind}_ne": [int(x) for x in ne] for kind, ne in zip(KINDS, shapes)})
    return out


def stacked_views(meta: dict, tensors: dict, make_info) -> dict:
    """The stacked tensors' infos of a file whose experts are records (none for other files):
    {name: make_info(name, type, ne, offset, raw, stride)}, raw a view of the kind's bytes in
    every record [n_expert, expert_bytes] (strided)."""
    if KEY + "gate_type" not in meta:
        return {}
    shapes = tuple(tuple(int(x) for x in meta[KEY + f"{kind}_ne"]) for kind in KINDS)
    out = {}
    for layer, types in enumerate(zip(*(meta[KEY + f"{kind}_type"] for kind in KINDS))):
        records = tensors.get(records_name(layer))
        if records is None:
            continue
        layout = layout_of(tuple(int(t) for t in types), shapes)
        stride, n_expert = layout.record_bytes, shapes[0][2]
        if records.ne != (stride, n_expert):
            raise ValueError(f"{records.name}: {records.ne} against records of {stride} bytes for {n_expert} experts")
        for kind, t, ne, at, size in zip(KINDS, types, shapes, layout.offsets, layout.kind_bytes):
            raw = np.lib.stride_tricks.as_strided(records.raw[at:], (n_expert, size), (stride, 1), writeable=False)
            name = stacked_name(layer, kind)
            out[name] = make_info(name, int(t), ne, records.offset + at, raw, stride)
    return out


def calibration_picks(gf, n_layers: int, n_expert: int) -> np.ndarray | None:
    """[n_layers, n_expert] calibration picks of a converted file (None: a file without them)."""
    picks = gf.get(PICKS)
    if picks is None:
        return None
    picks = np.asarray(list(picks), np.int64)
    if picks.size != n_layers * n_expert or (picks < 0).any():
        return None  # not this model's: the caches start empty, as they would without
    return picks.reshape(n_layers, n_expert)
