"""Which of ggml's matrix kernels give a token's column of a product the same bits whatever the
batch it is computed in.

Verifying drafted tokens runs several tokens through the target in one pass; for the output to
be the target's own token for token, each of them must get exactly the logits that decoding it
alone would give. ggml picks kernels by batch size and CPU: on the machines measured, plain
K-quant products switch to a tiled kernel from 8 columns, repacked ones to a gemm for each group
of 4, and float weights to llamafile's sgemm from 2, each rounding differently from the
one-column path (BENCHMARKS.md). So we measure, on the CPU at hand, the largest batch whose
columns equal one-column products, and a verification splits products into batches of that.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from gguf import GGMLQuantizationType

from . import ggml

MAX_COLUMNS = 16
PROBE_ROWS = 16
PROBE_ROW_LEN = 256  # one K-quant super-block


@cache
def invariant_columns(ggml_type: int, repacked: bool) -> int:
    """The largest n <= MAX_COLUMNS such that every batch of up to n columns gives the bits of
    one-column products, for weights of this type (repacked: on ggml's repacked kernels)."""
    from .repack import RepackedWeights, repacks

    rng = np.random.default_rng(0)
    d, rows = PROBE_ROW_LEN, PROBE_ROWS
    values = rng.standard_normal((rows, d)).astype(np.float32)
    raw = _encode(values, ggml_type)
    pool = ggml.ThreadPool(2)
    held = None
    if repacked:
        if not repacks(ggml_type, (d, rows)):
            return MAX_COLUMNS
        held = RepackedWeights()
        held.load({"probe": _Probe(ggml_type, d, rows, raw)})
    x = rng.standard_normal((MAX_COLUMNS, d)).astype(np.float32)

    def product(first: int, cols: int) -> np.ndarray:
        g = ggml.Graph(pool, max_nodes=8)
        w = held.tensors["probe"] if held else g.external(raw, ggml_type, d, rows)
        x_t, x_in = g.input(d, cols)
        x_in[...] = x[first : first + cols]
        y = g.output(g.L.mul_mat(g.ctx, w, x_t))
        g.finish()
        g.compute()
        return g.array(y).copy()

    try:
        alone = np.concatenate([product(j, 1) for j in range(MAX_COLUMNS)])
        for n in range(2, MAX_COLUMNS + 1):
            if not np.array_equal(product(0, n), alone[:n]):
                return n - 1
        return MAX_COLUMNS
    finally:
        if held:
            held.close()
        pool.close()


def _encode(values: np.ndarray, ggml_type: int) -> np.ndarray:
    if ggml_type == GGMLQuantizationType.F32:
        return values.view(np.uint8).reshape(len(values), -1).copy()
    if ggml_type == GGMLQuantizationType.F16:
        return values.astype(np.float16).view(np.uint8).reshape(len(values), -1).copy()
    if ggml_type == GGMLQuantizationType.BF16:
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(len(values), -1).copy()
    return np.ascontiguousarray(ggml.quantize_rows(values, ggml_type))


class _Probe:
    """The few fields of a TensorInfo that RepackedWeights.load reads."""

    def __init__(self, ggml_type, d, rows, raw):
        self.ggml_type, self.ne, self.raw = ggml_type, (d, rows), raw
        self.n_rows, self.row_len, self.row_bytes, self.nbytes, self.offset = rows, d, raw.shape[1], raw.nbytes, 0
