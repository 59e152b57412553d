"""A mixture of experts' stacked experts written as records (flashcli/engine/expert_records.py):
per layer, expert e's gate, up and down side by side, each as ggml's repacked kernels read it
where they run it on this CPU, so that one read fills a slot and the expert is ready as it lands.
"""

from __future__ import annotations

import numpy as np

from flashcli.engine import expert_records as er
from flashcli.engine.repack import repack_rows

from .gguf_writer import TensorSpec
from .tensor_source import TensorSource


def records_spec(src: TensorSource, layer: int, repacked: set) -> TensorSpec:
    """Layer `layer`'s records tensor, read from the source's three stacked tensors an expert at a
    time (ahead, on the source's pool); the kinds named in `repacked` in ggml's repacked layout."""
    stacked = [src.gf.tensor(er.stacked_name(layer, kind)) for kind in er.KINDS]
    layout = er.layout_of(tuple(t.ggml_type for t in stacked), tuple(t.ne for t in stacked))
    n_expert, stride = stacked[0].ne[2], layout.record_bytes

    def record(e: int) -> np.ndarray:
        out = np.zeros(stride, np.uint8)
        for t, at, size in zip(stacked, layout.offsets, layout.kind_bytes):
            rows = src.rows(t, e * t.ne[1], t.ne[1])  # expert e's rows [rows, row_bytes]
            out[at : at + size] = (repack_rows(t.ggml_type, rows) if t.name in repacked else rows).reshape(-1)
        return out

    return TensorSpec(
        er.records_name(layer), (stride, n_expert), er.I8, stride * n_expert, lambda: src.ahead(record, range(n_expert))
    )


def records_metadata(src: TensorSource, n_layers: int) -> dict:
    """The keys that describe the records (each kind's type per layer, and its shape)."""
    stacked = [[src.gf.tensor(er.stacked_name(i, kind)) for kind in er.KINDS] for i in range(n_layers)]
    return er.metadata([tuple(t.ggml_type for t in layer) for layer in stacked], tuple(t.ne for t in stacked[0]))
