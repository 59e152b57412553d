"""The flash file format: how a converted GGUF lays out the FFN (shared by flashcli and converters).

A converted file is a standard GGUF (general.alignment 4096, so every tensor starts on a page)
with `flashcli.*` metadata and one of two FFN layouts, named by `flashcli.ffn_layout`:

- "rows": the source's ffn_gate, ffn_up and ffn_down tensors, byte for byte. For models whose
  FFN activations are dense (SwiGLU, GeGLU): every neuron matters to every token, so flash
  generation keeps as many FFN tensors resident as the budget allows and streams the others
  in large sequential reads each token.
- "bundles": per layer a tensor `blk.{l}.ffn_bundle` (GGUF type I8, ne = (stride, n_ff)) with
  one record per neuron, read on demand when a predictor says the neuron will fire (ReLU):

      [ gate row i | up row i | down column i ]  -> stride bytes, no padding

  Gate and up rows are the source's bytes. The down column crosses the source's quantization
  blocks, so it is re-quantized along d_model (`down_type_for`): float types are kept (lossless),
  everything else becomes Q8_0. Re-quantizing 4-bit values to 4 or 5 bits adds a second
  rounding as large as the first, which costs far more perplexity than Q8_0's few extra bytes
  cost in size (BENCHMARKS.md, "Quality and size": bundles' down columns by type).
  Records are not padded: a direct-I/O read covers the aligned range around the records it
  wants. Neurons may be stored in any order (the FFN is a sum over neurons): the converter
  puts the most often needed first.

Everything needed to decode a record is in the metadata, one value per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from ..errors import BadModelFile, UnsupportedModel
from . import ggml
from .gguf_file import GGUFFile
from .repack import repacks, signature

# 3: rows files store the matrices ggml repacks as its repacked kernels read them; 4: a mixture's
# experts as records (expert_records.py). Version 3 files still run: nothing else changed, and a
# version 3 mixture's stacked experts are read as a GGUF's are (three reads an expert).
FORMAT_VERSION = 4
READABLE_VERSIONS = (3, 4)
FILE_ALIGN = 4096  # GGUF general.alignment of converted files: tensors start page-aligned
TYPE_I8 = int(GGMLQuantizationType.I8)
LAYOUTS = ("rows", "bundles")
FLOAT_TYPES = tuple(int(t) for t in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16))
# (floats: transposing is lossless, keep the type)
# metadata keys of a converted file
FORMAT = "flashcli.format_version"
LAYOUT = "flashcli.ffn_layout"
SOURCE = "flashcli.source.file"  # the GGUF it was converted from
ACTIVATION = "flashcli.ffn_activation"  # also read from source files (a relufied model says "relu")
K = "flashcli.bundle."  # bundles: per layer gate_type, up_type, down_type
PREDICTOR = "flashcli.predictor."  # bundles: kind, target, rank, thresholds and measured quality per layer
CALIBRATION = "flashcli.calibration."  # bundles: tokens, text
REPACKED = "flashcli.repacked"  # rows: names of the tensors stored repacked
REPACK_SIGNATURE = "flashcli.repack_signature"  # rows: repack.signature() of their types where converted
DRAFT_VOCAB = "flashcli.draft.vocabulary"  # a lean draft: the token ids of its output head's rows, in order
PREDICTOR_TENSOR = "blk.{layer}.ffn_pred_"  # + gate_a, gate_b, up_a, up_b, threshold, ...


def bits_per_weight(ggml_type: int) -> float:
    tt = ggml.type_traits(ggml_type)
    return 8.0 * tt.type_size / tt.blck_size


def down_type_for(source_type: int, d_model: int) -> int:
    """Type of a re-quantized down column of d_model values: float types are kept, others
    become Q8_0 (at least 8 bits: a second rounding no larger than a few tenths of the first)."""
    if source_type in FLOAT_TYPES:
        return source_type
    if d_model % 32:
        raise UnsupportedModel(f"d_model {d_model} is not a multiple of 32")
    return ggml.Q8_0


@dataclass(frozen=True)
class BundleLayout:
    """Where the three parts of a neuron sit inside one layer's records."""

    d_model: int
    gate_type: int
    up_type: int
    down_type: int

    @property
    def gate_bytes(self) -> int:
        return ggml.row_bytes(self.gate_type, self.d_model)

    @property
    def up_bytes(self) -> int:
        return ggml.row_bytes(self.up_type, self.d_model)

    @property
    def down_bytes(self) -> int:
        return ggml.row_bytes(self.down_type, self.d_model)

    @property
    def up_offset(self) -> int:
        return self.gate_bytes

    @property
    def down_offset(self) -> int:
        return self.gate_bytes + self.up_bytes

    @property
    def stride(self) -> int:
        return self.gate_bytes + self.up_bytes + self.down_bytes

    def encode(self, gate_rows: np.ndarray, up_rows: np.ndarray, down: np.ndarray) -> np.ndarray:
        """Records [n, stride] uint8 from source gate and up rows [n, row_bytes] and down columns
        as float32 [n, d_model] (row i = neuron i's column), quantized here."""
        records = np.empty((gate_rows.shape[0], self.stride), np.uint8)
        records[:, : self.up_offset] = gate_rows
        records[:, self.up_offset : self.down_offset] = up_rows
        records[:, self.down_offset :] = ggml.quantize_rows(down, self.down_type)
        return records

    def split(self, records: np.ndarray):
        """Views of the gate, up and down parts of records [n, stride]."""
        return (
            records[:, : self.up_offset],
            records[:, self.up_offset : self.down_offset],
            records[:, self.down_offset :],
        )

    def decode_down(self, records: np.ndarray) -> np.ndarray:
        """float32 [n, d_model] down columns of records [n, stride]."""
        return ggml.dequantize_rows(np.ascontiguousarray(self.split(records)[2]), self.down_type, self.d_model)


def bundle_name(layer: int) -> str:
    return f"blk.{layer}.ffn_bundle"


def layout_of(gf: GGUFFile) -> str | None:
    """ "rows" or "bundles" for a converted file; None for a plain GGUF."""
    version = gf.get(FORMAT)
    if version is None:
        return None
    if int(version) not in READABLE_VERSIONS:
        raise UnsupportedModel(
            f"{gf.path}: flashcli format version {version}; this flashcli reads "
            f"{' and '.join(map(str, READABLE_VERSIONS))} (convert the source again)"
        )
    layout = gf.get(LAYOUT)
    if layout not in LAYOUTS:
        raise BadModelFile(f"{gf.path}: unknown flashcli.ffn_layout {layout!r}")
    return layout


def layer_layouts(gf: GGUFFile, d_model: int, n_layers: int) -> list[BundleLayout]:
    """One BundleLayout per layer, from the metadata, checked against the bundle tensors."""
    types = [gf.get(K + key) for key in ("gate_type", "up_type", "down_type")]
    if any(t is None or len(t) != n_layers for t in types):
        raise BadModelFile(f"{gf.path}: bundle types missing from the metadata")
    layouts = [BundleLayout(d_model, int(g), int(u), int(dn)) for g, u, dn in zip(*types)]
    for i, lay in enumerate(layouts):
        t = gf.tensor(bundle_name(i))
        if t.ne[0] != lay.stride:
            raise BadModelFile(f"{gf.path}: {t.name} rows of {t.ne[0]} bytes, its layout needs {lay.stride}")
    return layouts


def layout_metadata(layouts: list[BundleLayout]) -> dict:
    return {
        K + "gate_type": [x.gate_type for x in layouts],
        K + "up_type": [x.up_type for x in layouts],
        K + "down_type": [x.down_type for x in layouts],
    }


def prepacked_names(gf: GGUFFile) -> frozenset:
    """The tensors a converted rows file stores repacked for ggml's repacked kernels, which
    differ between CPUs and builds: the file runs only where ggml repacks its types as it did
    where it was converted (the signature), so that streamed matrices need no repacking."""
    names = frozenset(gf.get(REPACKED) or ())
    if names and gf.get(REPACK_SIGNATURE) != signature({gf.tensor(n).ggml_type for n in names}):
        raise UnsupportedModel(
            f"{gf.path}: converted for another CPU's repacked kernels (or another "
            f"llama-cpp-python build): convert the source again on this machine"
        )
    for name, t in gf.views.items():  # experts in records are read as stored: never repacked on load
        if repacks(t.ggml_type, t.ne) != (name in names):
            raise UnsupportedModel(
                f"{gf.path}: its experts were converted for another CPU's repacked kernels: "
                f"convert the source again on this machine"
            )
    return names
