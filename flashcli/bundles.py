"""The bundle format: each FFN neuron as one fixed-size record on disk (reader and writer).

Record i of layer l, in tensor `blk.{l}.ffn_bundle` (GGUF type I8, ne = (stride, n_ff)):

    [ gate row i | up row i | down column i | zero padding ]  -> `stride` bytes

Gate and up rows are the source's bytes, untouched. The down column crosses the source's
quantization blocks, so it is re-quantized along d_model (see `down_type_for`). The stride is a
multiple of RECORD_ALIGN and every bundle tensor starts on a FILE_ALIGN boundary, so a direct-I/O
read of one neuron, or of a run of neighbours, needs no bytes beyond alignment padding.
Everything needed to decode a record is in the file's metadata (`flashcli.*` keys).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ggml
from .errors import BadModelFile, UnsupportedModel
from .gguf_file import GGUFFile

FORMAT_VERSION = 1
FILE_ALIGN = 4096  # GGUF general.alignment of converted files: bundle tensors start page-aligned
RECORD_ALIGN = 512  # record stride granularity (the smallest direct-I/O sector size)
TYPE_I8 = 24
FLOAT_TYPES = {0: 0, 1: 1, 30: 30}  # F32, F16, BF16: transposing is lossless, keep the type
Q8_0 = 8


def down_type_for(source_type: int) -> int:
    """Type of the re-quantized down column: the source's own for float types, else Q8_0, which
    has at least the precision of every quantized type we read (8 bits per weight, one scale per 32)."""
    return FLOAT_TYPES.get(source_type, Q8_0)


@dataclass(frozen=True)
class BundleLayout:
    """Where the three parts of a neuron sit inside its record."""

    d_model: int
    gate_type: int
    up_type: int
    down_type: int
    gate_bytes: int
    up_bytes: int
    down_bytes: int
    stride: int

    @property
    def gate_offset(self) -> int:
        return 0

    @property
    def up_offset(self) -> int:
        return self.gate_bytes

    @property
    def down_offset(self) -> int:
        return self.gate_bytes + self.up_bytes

    @property
    def payload_bytes(self) -> int:
        return self.gate_bytes + self.up_bytes + self.down_bytes

    @classmethod
    def for_types(cls, d_model: int, gate_type: int, up_type: int, down_source_type: int) -> "BundleLayout":
        down_type = down_type_for(down_source_type)
        gate_bytes = ggml.row_bytes(gate_type, d_model)
        up_bytes = ggml.row_bytes(up_type, d_model)
        down_bytes = ggml.row_bytes(down_type, d_model)
        payload = gate_bytes + up_bytes + down_bytes
        return cls(d_model, gate_type, up_type, down_type, gate_bytes, up_bytes, down_bytes,
                   -(-payload // RECORD_ALIGN) * RECORD_ALIGN)

    def metadata(self) -> dict:
        return {
            "flashcli.bundle.stride": self.stride,
            "flashcli.bundle.alignment": FILE_ALIGN,
            "flashcli.bundle.record_alignment": RECORD_ALIGN,
            "flashcli.bundle.gate_type": self.gate_type,
            "flashcli.bundle.up_type": self.up_type,
            "flashcli.bundle.down_type": self.down_type,
            "flashcli.bundle.gate_bytes": self.gate_bytes,
            "flashcli.bundle.up_bytes": self.up_bytes,
            "flashcli.bundle.down_bytes": self.down_bytes,
        }

    @classmethod
    def from_metadata(cls, gf: GGUFFile, d_model: int) -> "BundleLayout":
        version = gf.get("flashcli.format_version")
        if version is None:
            raise BadModelFile(f"{gf.path}: not a flashcli file (run `flashcli convert` first)")
        if int(version) != FORMAT_VERSION:
            raise UnsupportedModel(f"{gf.path}: flashcli format version {version}; this flashcli reads {FORMAT_VERSION}")
        k = "flashcli.bundle."
        layout = cls(d_model, *(int(gf.get(k + n)) for n in (
            "gate_type", "up_type", "down_type", "gate_bytes", "up_bytes", "down_bytes", "stride")))
        if layout.payload_bytes > layout.stride:
            raise BadModelFile(f"{gf.path}: bundle layout does not fit its stride")
        return layout

    # --- records -----------------------------------------------------------------------------

    def encode_layer(self, gate_rows: np.ndarray, up_rows: np.ndarray, down: np.ndarray) -> np.ndarray:
        """Records [n_ff, stride] uint8 for one layer.

        gate_rows, up_rows: source bytes [n_ff, row_bytes]; down: float32 [n_ff, d_model] (the
        source down matrix transposed: row i is neuron i's column), quantized here.
        """
        n_ff = gate_rows.shape[0]
        records = np.zeros((n_ff, self.stride), np.uint8)
        records[:, : self.gate_bytes] = gate_rows
        records[:, self.up_offset : self.down_offset] = up_rows
        records[:, self.down_offset : self.payload_bytes] = ggml.quantize_rows(down, self.down_type)
        return records

    def split(self, records: np.ndarray):
        """Views of the gate, up and down parts of records [n, stride]."""
        return (records[:, : self.gate_bytes], records[:, self.up_offset : self.down_offset],
                records[:, self.down_offset : self.payload_bytes])

    def decode_down(self, records: np.ndarray) -> np.ndarray:
        """float32 [n, d_model] down columns of records [n, stride]."""
        return ggml.dequantize_rows(np.ascontiguousarray(self.split(records)[2]), self.down_type, self.d_model)


def bundle_name(layer: int) -> str:
    return f"blk.{layer}.ffn_bundle"
