"""The columns kernel against ggml's own products on the same matrix (issue 36).

`python -m scripts.bench --section columns` saves bench-out/columns.json for BENCHMARKS.md;
`python -m scripts.bench.columns [--quick] [--only ffn_down] [--counts 2 4]` prints the table without saving (a smoke run).

Random matrices with the shapes and types of the two models the issue names (Qwen2.5 1.5B:
ffn_up 1536 -> 8960 in Q4_K, ffn_down 8960 -> 1536 in Q6_K; Llama 3.1 8B: 4096 -> 14336 in Q4_K,
14336 -> 4096 in Q6_K), repacked where ggml repacks the type on this CPU, as flashcli loads them.
Each product runs on 2 threads over the next of several copies of its matrix, together larger
than the last-level cache, so the weights come from DRAM as in a model's pass. Per column count:
  ggml batched   one mul_mat of every column: ggml's batched kernels (llama.cpp's batched decoding;
                 not each column's one-column bits)
  ggml groups    the exact path without the library: mul_mats of as many columns as ggml computes
                 as one column each (kernels.invariant_columns), concatenated
  columns        the library as flashcli uses it: its own kernel where the CPU runs one (Q4_K in
                 ggml's 8x8 layout, plain Q6_K), else ggml's one-column kernel a column at a time
  ggml per column  the library on ggml's one-column kernel, a tile of rows at a time (the
                 fallback where our kernels do not run)
Each cell: milliseconds per product (median), weights' GB/s and columns per second.
"""

from __future__ import annotations

import argparse
import time
from functools import cache

import numpy as np

from . import runner

THREADS = 2
COUNTS = (1, 2, 4, 16, 64)
MATRICES = (  # name, type, row length, rows
    ("1.5B ffn_up", "Q4_K", 1536, 8960),
    ("1.5B ffn_down", "Q6_K", 8960, 1536),
    ("1.5B output", "Q6_K", 1536, 151936),  # the head a verifying pass multiplies every token by
    ("8B ffn_up", "Q4_K", 4096, 14336),
    ("8B ffn_down", "Q6_K", 14336, 4096),
)
SPAN_BYTES = 512 << 20  # copies of a matrix together at least this large: out of any cache
METHODS = ("ggml batched", "ggml groups", "ggml per column", "columns")


class Copies:
    """Copies of one random matrix, repacked where ggml repacks its type (as flashcli loads it)."""

    def __init__(self, ggml_type: int, d: int, rows: int, span: int):
        from flashcli.engine.kernels import ProbeTensor, encode_rows
        from flashcli.engine.repack import RepackedWeights, repacks

        rng = np.random.default_rng(0)
        raw = np.concatenate(
            [
                encode_rows(rng.standard_normal((min(512, rows - r), d)).astype(np.float32), ggml_type)
                for r in range(0, rows, 512)
            ]
        )
        self.ggml_type, self.d, self.rows, self.nbytes = ggml_type, d, rows, raw.nbytes
        self.repacked = repacks(ggml_type, (d, rows))
        count = max(2, -(-span // raw.nbytes))
        self.raws = [raw.copy() for _ in range(count)]
        self.held = []
        if self.repacked:
            for i, r in enumerate(self.raws):
                held = RepackedWeights()
                held.load({f"w{i}": ProbeTensor(ggml_type, d, rows, r)})
                self.held.append(held)
            self.raws = []

    def __len__(self):
        return len(self.held) or len(self.raws)

    def tensor(self, g, i: int):
        if self.held:
            return self.held[i].tensors[f"w{i}"]
        return g.external(self.raws[i], self.ggml_type, self.d, self.rows)

    def close(self):
        for h in self.held:
            h.close()


def graph(pool, copies: Copies, i: int, n: int, method: str):
    from flashcli.engine import ggml
    from flashcli.engine.kernels import exact_columns, invariant_columns

    g = ggml.Graph(pool, max_nodes=8 + 3 * n)
    w = copies.tensor(g, i)
    x_t, x = g.input(copies.d, n)
    x[...] = np.random.default_rng(n).standard_normal(x.shape)
    L, ctx = g.L, g.ctx
    if method == "ggml batched":
        y = L.mul_mat(ctx, w, x_t)
    elif method in ("columns", "ggml per column"):
        kernel = exact_columns(w) if method == "columns" else ggml_s_kernel(w)
        if kernel is None:
            g.close()
            return None
        y = kernel(g, w, x_t)
    else:
        chunk, nb1, y = invariant_columns(copies.ggml_type, copies.repacked), x_t.contents.nb[1], None
        for first in range(0, n, chunk):
            count = min(chunk, n - first)
            part = L.mul_mat(ctx, w, L.view_2d(ctx, x_t, copies.d, count, nb1, first * nb1))
            y = part if y is None else L.concat(ctx, y, part, 1)
    g.output(y)
    g.finish()
    return g


def ggml_s_kernel(w):
    """The library on ggml's one-column kernel for w, where its bits match (else None)."""
    from flashcli.engine import columns

    return _checked_ggml_kernel(w.contents.type, columns.layout(w))


@cache  # held for the process: a graph points at the kernel's spec
def _checked_ggml_kernel(ggml_type: int, shape: int | None):
    from flashcli.engine import columns
    from flashcli.engine.kernels import columns_match

    kernel = columns.kernel(ggml_type, shape)
    return kernel if kernel is not None and columns_match(kernel, shape) else None


def measure(pool, copies: Copies, n: int, repeats: int) -> list[dict]:
    """Every method at n columns (medians, timed())."""
    seconds = timed({m: [graph(pool, copies, i, n, m) for i in range(len(copies))] for m in METHODS}, repeats)
    return [
        {"n": n, "method": m, "ms": s * 1e3, "gb_s": copies.nbytes / s / 1e9, "columns_s": n / s}
        for m, s in seconds.items()
    ]


def timed(graphs: dict, repeats: int) -> dict:
    """{method: median seconds a compute} for graphs {method: one graph per copy of the matrix, or
    [None, ...] where the method does not run}: the methods' computes alternated (one of each in
    turn, over the copies) so that the machine's drifts fall on all of them alike; every graph
    closed after."""
    graphs = {m: gs for m, gs in graphs.items() if gs[0] is not None}
    for gs in graphs.values():  # once over every copy: page faults and first-touch out of the timing
        for g in gs:
            g.compute()
    times = {m: [] for m in graphs}
    for r in range(repeats * max(len(gs) for gs in graphs.values())):
        for m, gs in graphs.items():
            g = gs[r % len(gs)]
            t = time.perf_counter()
            g.compute()
            times[m].append(time.perf_counter() - t)
    for gs in graphs.values():
        for g in gs:
            g.close()
    return {m: runner.median(t) for m, t in times.items()}


def measure_all(quick: bool = False, only: str = "", counts=COUNTS) -> dict:
    from gguf import GGMLQuantizationType

    from flashcli.engine import columns, ggml

    pool = ggml.ThreadPool(THREADS)
    out = {"machine": runner.env_note(), "threads": THREADS, "library": columns.library() is not None, "matrices": []}
    out["counts"] = list(counts)
    for name, type_name, d, rows in MATRICES[:2] if quick else MATRICES:
        if only not in name:
            continue
        copies = Copies(int(GGMLQuantizationType[type_name]), d, rows, (SPAN_BYTES // 8) if quick else SPAN_BYTES)
        results = []
        for n in counts:
            results += measure(pool, copies, n, 2 if quick else 5)
        out["matrices"].append(
            {
                "name": name,
                "type": type_name,
                "repacked": copies.repacked,
                "d": d,
                "rows": rows,
                "bytes": copies.nbytes,
                "results": results,
            }
        )
        copies.close()
    pool.close()
    return out


def run(quick: bool = False):
    runner.save("columns", measure_all(quick))


def columns_section(d: dict | None = None) -> str:
    d = d if d is not None else runner.load("columns")
    if not d:
        return ""
    out = [
        "## Exact batches: the columns kernel against ggml's products\n",
        "`python -m scripts.bench --section columns` (scripts/bench/columns.py): random matrices of the "
        "1.5B's and the 8B's shapes and types, repacked where ggml repacks them here, warm but out of cache "
        f"(copies of the matrix cycled), {d['threads']} threads; {d['machine']}. Each cell: ms per product, "
        "GB/s of weights, columns/s. ggml batched: one mul_mat of all the columns (llama.cpp's batched "
        "kernels, not each column's own bits); ggml groups: the exact path without the library (mul_mats of "
        "as many columns as ggml computes as one column each); ggml per column: the library on ggml's "
        "one-column kernel, a tile of rows through every column; columns: the library as flashcli runs it (its "
        "own kernel for repacked Q4_K and plain Q6_K where the CPU runs one), every column with the bits it gets "
        "alone." + ("" if d["library"] else " **The library was not built: no columns figures.**") + "\n",
    ]
    for m in d["matrices"]:
        kind = "repacked" if m["repacked"] else "plain"
        out += [
            f"\n{m['name']}: {m['type']} {kind}, {m['d']} -> {m['rows']} ({runner.mib(m['bytes']):.1f} MiB)\n",
            "| columns | " + " | ".join(METHODS) + " | columns / ggml batched |",
            "|---|" + "---|" * (len(METHODS) + 1),
        ]
        for n in d.get("counts", COUNTS):
            by = {r["method"]: r for r in m["results"] if r["n"] == n}
            cells = [
                f"{by[k]['ms']:.2f} ms, {by[k]['gb_s']:.1f} GB/s, {by[k]['columns_s']:.0f}/s" if k in by else "-"
                for k in METHODS
            ]
            both = "columns" in by and "ggml batched" in by
            ratio = f"{by['ggml batched']['ms'] / by['columns']['ms']:.2f}x" if both else "-"
            out.append(f"| {n} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description="the columns kernel against ggml's products (prints, saves nothing)")
    ap.add_argument("--quick", action="store_true", help="the 1.5B's two matrices, fewer copies and repeats")
    ap.add_argument("--only", default="", help="only the matrices whose name contains this (e.g. ffn_down)")
    ap.add_argument("--counts", type=int, nargs="+", default=COUNTS, help=f"column counts (default {COUNTS})")
    args = ap.parse_args()
    print(columns_section(measure_all(args.quick, args.only, tuple(args.counts))))


if __name__ == "__main__":
    main()
