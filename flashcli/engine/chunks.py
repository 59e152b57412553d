"""A pass's prompt chunks through a repacked matrix in one product, each chunk with the bits
ggml's product gives it alone (issue 36).

ggml multiplies n columns by a repacked matrix (repack.cpp, forward_mul_mat) as groups of four
(quantized together into the layout's interleaved blocks, then its gemm) and the last n % 4 one at
a time (the gemv). Each group of four gets its outputs from its own four columns only, so the
groups of several sequences' chunks, laid side by side, can go through one product: ggml's gemm
then runs them many at a time (16 columns a block with AVX-512) instead of a chunk's few, and the
weights come from memory once instead of once per chunk. The chunks' last columns, which ggml
runs one at a time, join the pass's single tokens on the columns kernel (columns.py), which
gives each the one-column bits. The results are put back in the pass's order.

Whether the groups really are independent of their neighbours is ggml's kernel's business, not
a promise: `packs` checks it on a probe matrix, on this CPU, before anything relies on it.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from . import columns, ggml
from .ggml_bindings import I32, TensorP

GROUP = 4  # columns ggml's repacked products quantize and multiply together
PROBE_CHUNKS = (5, 7, 4, 9, 13, 6, 1, 12, 2, 19)  # groups straddling every block boundary of 16


def split(runs: list[tuple[int, int, bool]]) -> tuple[list[int], list[int]] | None:
    """(columns of the chunks' groups of four, every other column), in the pass's order, for runs
    (first, count, whole); None where packing gains nothing (fewer than two chunks with a group)."""
    grouped, single = [], []
    for first, count, whole in runs:
        n = count - count % GROUP if whole else 0
        grouped += range(first, first + n)
        single += range(first + n, first + count)
    with_group = sum(1 for _, count, whole in runs if whole and count >= GROUP)
    return (grouped, single) if with_group >= 2 else None


def product(g: ggml.Graph, w: TensorP, x: TensorP, grouped: list[int], single: list[int], by_columns) -> TensorP:
    """w x for a pass's columns x [d, n]: `grouped` (split()) in one ggml product, `single` on the
    columns kernel `by_columns`, the outputs [rows, n] in x's order."""
    L, ctx = g.L, g.ctx
    order = np.array(grouped + single, dtype=np.int32)
    back = np.empty_like(order)
    back[order] = np.arange(len(order), dtype=np.int32)
    parts = [L.mul_mat(ctx, w, L.get_rows(ctx, x, g.external(order[: len(grouped)], I32, len(grouped))))]
    if single:
        x_single = L.get_rows(ctx, x, g.external(order[len(grouped) :], I32, len(single)))
        parts.append(by_columns(g, w, x_single))
    y = ggml.join_columns(g, parts)
    return L.get_rows(ctx, y, g.external(back, I32, len(back)))


def packs(w: TensorP) -> bool:
    """Whether chunks' groups multiplied together by w's kernel get the bits each chunk gets
    alone, on this CPU (checked once per type and layout)."""
    layout = columns.layout(w)
    return layout is not None and _packs(int(w.contents.type), layout)


@cache
def _packs(ggml_type: int, layout: int) -> bool:
    from .kernels import CHECK_SHAPE, ProbeTensor, encode_rows, exact_columns
    from .repack import RepackedWeights, repacks

    d, rows, _ = CHECK_SHAPE
    if not repacks(ggml_type, (d, rows)):
        return False
    rng = np.random.default_rng(1)
    raw = encode_rows(rng.standard_normal((rows, d)).astype(np.float32), ggml_type)
    x = rng.standard_normal((sum(PROBE_CHUNKS), d)).astype(np.float32)
    runs, at = [], 0
    for c in PROBE_CHUNKS:
        runs.append((at, c, True))
        at += c
    pool, held = ggml.ThreadPool(2), RepackedWeights()
    try:
        held.load({"probe": ProbeTensor(ggml_type, d, rows, raw)})
        w = held.tensors.get("probe")
        if w is None or columns.layout(w) != layout or exact_columns(w) is None:
            return False

        def run(build) -> np.ndarray:
            g = ggml.Graph(pool, max_nodes=16 + 4 * len(runs))
            x_t, x_in = g.input(d, len(x))
            x_in[...] = x
            y = g.output(build(g, x_t))
            g.finish()
            g.compute()
            out = g.array(y).copy()
            g.close()
            return out

        def alone(g, x_t):
            nb1 = x_t.contents.nb[1]
            views = [g.L.view_2d(g.ctx, x_t, d, c, nb1, first * nb1) for first, c, _ in runs]
            return ggml.join_columns(g, [g.L.mul_mat(g.ctx, w, v) for v in views])

        together = run(lambda g, x_t: product(g, w, x_t, *split(runs), exact_columns(w)))
        return np.array_equal(together.view(np.uint32), run(alone).view(np.uint32))
    finally:
        held.close()
        pool.close()
