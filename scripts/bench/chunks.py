"""A pass's prompt chunks through one repacked matrix (issue 36): each sequence's chunk multiplied
by the whole matrix in turn (the exact path before flashcli/engine/chunks.py), the chunks' groups
of four in one product with each chunk's bits (chunks.product, "packed"), and one mul_mat of
every column (llama.cpp's prompt processing of all of them at once; not each chunk's bits).

    python -m scripts.bench.chunks [--only 8B] [--chunks 12 12 13 ...] [--repeat 2] [--singles 0]

Random matrices of the repacked Q4_K shapes of scripts/bench/columns.py, copies cycled so that
the weights come from DRAM; 2 threads; milliseconds per product (median) and columns/s.
`--singles K` adds K single columns (decoding tokens) after the chunks, as a mixed pass has.
"""

from __future__ import annotations

import argparse

import numpy as np

from . import runner
from .columns import MATRICES, SPAN_BYTES, THREADS, Copies, timed

# the token counts of scale._batch_prompts(32) under the 8B's tokenizer (392 in all)
CHUNKS = (
    10,
    9,
    12,
    13,
    16,
    12,
    19,
    11,
    12,
    10,
    12,
    11,
    15,
    14,
    14,
    16,
    14,
    12,
    7,
    11,
    12,
    13,
    10,
    15,
    12,
    12,
    11,
    19,
    12,
    10,
    5,
    11,
)
METHODS = ("ggml per chunk", "packed", "ggml batched")


def graph(pool, copies: Copies, i: int, runs: list, method: str):
    from flashcli.engine import chunks, ggml
    from flashcli.engine.kernels import exact_columns

    n = sum(c for _, c, _ in runs)
    g = ggml.Graph(pool, max_nodes=16 + 4 * len(runs))
    w = copies.tensor(g, i)
    x_t, x = g.input(copies.d, n)
    x[...] = np.random.default_rng(n).standard_normal(x.shape)
    L, ctx, nb1 = g.L, g.ctx, x_t.contents.nb[1]
    kernel = exact_columns(w)
    if method == "ggml batched":
        y = L.mul_mat(ctx, w, x_t)
    elif method == "packed":
        if kernel is None or not chunks.packs(w):
            g.close()
            return None
        y = chunks.product(g, w, x_t, *chunks.split(runs), kernel)
    else:
        parts = []
        for first, count, whole in runs:
            view = L.view_2d(ctx, x_t, copies.d, count, nb1, first * nb1)
            parts.append(L.mul_mat(ctx, w, view) if whole or kernel is None else kernel(g, w, view))
        y = ggml.join_columns(g, parts)
    g.output(y)
    g.finish()
    return g


def measure(chunks, singles: int, only: str, repeats: int) -> list[dict]:
    from gguf import GGMLQuantizationType

    from flashcli.engine import ggml

    runs, at = [], 0
    for c in chunks:
        runs.append((at, c, True))
        at += c
    if singles:
        runs.append((at, singles, False))
    n = at + singles
    pool = ggml.ThreadPool(THREADS)
    out = []
    for name, type_name, d, rows in MATRICES:
        if type_name != "Q4_K" or only not in name:
            continue
        copies = Copies(int(GGMLQuantizationType[type_name]), d, rows, SPAN_BYTES)
        seconds = timed({m: [graph(pool, copies, i, runs, m) for i in range(len(copies))] for m in METHODS}, repeats)
        out += [
            {"matrix": name, "method": m, "columns": n, "ms": t * 1e3, "columns_s": n / t} for m, t in seconds.items()
        ]
        copies.close()
    pool.close()
    return out


def main():
    ap = argparse.ArgumentParser(description="prompt chunks through one matrix (prints, saves nothing)")
    ap.add_argument("--only", default="", help="only the matrices whose name contains this")
    ap.add_argument("--chunks", type=int, nargs="+", default=CHUNKS, help="the chunks' column counts")
    ap.add_argument("--singles", type=int, default=0, help="single columns after the chunks")
    ap.add_argument("--repeat", type=int, default=2, help="products per copy of the matrix and method")
    args = ap.parse_args()
    print(f"{len(args.chunks)} chunks, {sum(args.chunks)} columns, {args.singles} single; {runner.env_note()}")
    print("| matrix | method | ms | columns/s |\n|---|---|---|---|")
    for r in measure(args.chunks, args.singles, args.only, args.repeat):
        print(f"| {r['matrix']} | {r['method']} | {r['ms']:.2f} | {r['columns_s']:.0f} |")


if __name__ == "__main__":
    main()
