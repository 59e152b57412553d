"""Which of ggml's matrix kernels give a token's column of a product the same bits whatever the
batch it is computed in.

Verifying drafted tokens runs several tokens through the target in one pass; for the output to
be the target's own token for token, each of them must get exactly the logits that decoding it
alone would give. ggml picks kernels by batch size and CPU: on the machines measured, plain
K-quant products switch to a tiled kernel from 8 columns, repacked ones to a gemm for each group
of 4, and float weights to llamafile's sgemm from 2, each rounding differently from the
one-column path (BENCHMARKS.md). So we measure, on the CPU at hand, the largest batch whose
columns equal one-column products, and a verification splits products into batches of that.

Where the columns library (columns.py) runs a type, exact_columns gives its kernel instead: it
multiplies any number of columns with each column's one-column bits, so no split is needed.
It is used only once its bits, on a probe matrix, equal ggml's one-column products.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from gguf import GGMLQuantizationType

from . import columns, ggml

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
    raw = encode_rows(values, ggml_type)
    pool = ggml.ThreadPool(2)
    held = None
    if repacked:
        if not repacks(ggml_type, (d, rows)):
            return MAX_COLUMNS
        held = RepackedWeights()
        held.load({"probe": ProbeTensor(ggml_type, d, rows, raw)})
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


def exact_columns(w: ggml.TensorP) -> columns.ColumnKernel | None:
    """The columns library's kernel for weight tensor w (as it sits in a graph: plain, or in
    ggml's repacked buffer), where its columns equal ggml's one-column products bit for bit;
    None where it does not, or the library is not there."""
    return _checked_kernel(int(w.contents.type), columns.layout(w))


@cache
def _checked_kernel(ggml_type: int, layout: int | None) -> columns.ColumnKernel | None:
    return next((k for k in columns.kernels(ggml_type, layout) if columns_match(k, layout)), None)


CHECK_SHAPE = (768, 48, 6)  # row length (3 K-quant super-blocks), rows (whole groups of 16), columns


def columns_match(kernel: columns.ColumnKernel, layout: int | None, shape=CHECK_SHAPE, seed: int = 0) -> bool:
    """Whether `kernel`, on a random matrix of its type (repacked as ggml repacks it here, where
    `layout` is not None, and then in that very layout), gives every column the bits of ggml's
    one-column product of it, on a pool of two threads (the rows split between them)."""
    from .repack import RepackedWeights, repacks

    d, rows, n = shape
    rng = np.random.default_rng(seed)
    raw = encode_rows(rng.standard_normal((rows, d)).astype(np.float32), kernel.ggml_type)
    x = rng.standard_normal((n, d)).astype(np.float32)
    pool, held = ggml.ThreadPool(2), None
    try:
        if layout is not None:
            if not repacks(kernel.ggml_type, (d, rows)):
                return False
            held = RepackedWeights()
            held.load({"probe": ProbeTensor(kernel.ggml_type, d, rows, raw)})
            if "probe" not in held.tensors or columns.layout(held.tensors["probe"]) != layout:
                return False

        def product(first: int, cols: int, by_columns: bool) -> np.ndarray:
            g = ggml.Graph(pool, max_nodes=8)
            w = held.tensors["probe"] if held else g.external(raw, kernel.ggml_type, d, rows)
            x_t, x_in = g.input(d, cols)
            x_in[...] = x[first : first + cols]
            y = g.output(kernel(g, w, x_t) if by_columns else g.L.mul_mat(g.ctx, w, x_t))
            g.finish()
            g.compute()
            return g.array(y).copy()

        alone = np.concatenate([product(j, 1, False) for j in range(n)])
        return np.array_equal(product(0, n, True).view(np.uint32), alone.view(np.uint32))
    finally:
        if held:
            held.close()
        pool.close()


def encode_rows(values: np.ndarray, ggml_type: int) -> np.ndarray:
    """float32 rows [n, d] -> their bytes in ggml_type [n, row bytes] (probe matrices)."""
    if ggml_type == GGMLQuantizationType.F32:
        return values.view(np.uint8).reshape(len(values), -1).copy()
    if ggml_type == GGMLQuantizationType.F16:
        return values.astype(np.float16).view(np.uint8).reshape(len(values), -1).copy()
    if ggml_type == GGMLQuantizationType.BF16:
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(len(values), -1).copy()
    return np.ascontiguousarray(ggml.quantize_rows(values, ggml_type))


class ProbeTensor:
    """The few fields of a TensorInfo that RepackedWeights.load reads."""

    def __init__(self, ggml_type, d, rows, raw):
        self.ggml_type, self.ne, self.raw = ggml_type, (d, rows), raw
        self.n_rows, self.row_len, self.row_bytes, self.nbytes, self.offset = rows, d, raw.shape[1], raw.nbytes, 0
        self.stride = 0  # stored whole
