"""Where the time of a batched pass goes (issue 19): decode passes of N sequences at a budget
and with the whole model resident (reads against compute), and one matrix product of 16 tokens
on the one-column kernels that keep each token's bits, on ggml's batched kernel, and split into
row slices (repacked 8-row groups are contiguous, so a slice is a repacked tensor of its own).
Issue 24: whether KV caches smaller than llama.cpp's 256-position window change the logits
(kv_windows), and what rebuilding a pass's kept graphs costs (rebuild).
Results go to studies/results/batch_passes-<model>.json (or --out).

    python studies/batch_passes.py MODEL.flash.gguf [--budget BYTES] [--sequences 8 16] [--out FILE]
        [--only passes|product|kv_windows|rebuild ...]
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from flashcli.decoding.loader import LoadOptions, load
from flashcli.engine import ggml
from flashcli.engine.decode_state import Part, column_groups
from flashcli.engine.kernels import invariant_columns

from _results import default_out, save

PASSES = 6


def decode_passes(path, budget, n: int) -> dict:
    """PASSES decode passes of n sequences after a 40-token prompt each: ms per pass, and the
    engine's reads and waits."""
    m = load(path, LoadOptions(dram_budget=budget, n_ctx=256, sequences=n)).model
    m.eval_parts([Part(s, np.arange(1000, 1040)) for s in m.states])
    ms = []
    for step in range(PASSES):
        t0 = time.perf_counter()
        m.eval_parts([Part(s, np.array([2000 + step])) for s in m.states])
        ms.append(1e3 * (time.perf_counter() - t0))
    t = m.telemetry() if hasattr(m, "telemetry") else {}
    out = {
        "sequences": n,
        "budget": budget,
        "pass_ms": ms,
        "streamed_bytes": getattr(m, "plan", None) and m.plan.streamed_bytes,
    }
    out |= {k: t[k] for k in ("io_wait_ms_per_pass", "bytes_read_per_pass") if k in t}
    m.close()
    return out


def one_product(path, name: str, columns: int = 16) -> dict:
    """ms of `name` times `columns` tokens: one-column kernels, batched, and in row slices."""
    m = load(path, LoadOptions(n_ctx=256)).model
    t, w0 = m.gf.tensor(name), m.weights.repacked.tensors[name]
    rows, row_bytes = t.ne[1], w0.contents.nb[1]
    x = np.random.default_rng(0).standard_normal((columns, t.ne[0])).astype(np.float32)
    singles = column_groups(tuple((c, 1, False) for c in range(columns)), invariant_columns(t.ggml_type, True))

    def run(groups, slice_rows, cols=columns):
        g = ggml.Graph(m.pool, max_nodes=8192)
        L, ctx = g.L, g.ctx
        x_t, x_in = g.input(t.ne[0], cols)
        x_in[...] = x[:cols]
        out = None
        for r0 in range(0, rows, slice_rows):
            w = w0
            if slice_rows < rows:  # a header over rows [r0, r0 + slice) of the repacked data
                w = L.new_tensor_2d(g.ext, t.ggml_type, t.ne[0], min(slice_rows, rows - r0))
                w.contents.data, w.contents.buffer = w0.contents.data + r0 * row_bytes, w0.contents.buffer
                w.contents.extra = w0.contents.extra
            part = None
            for first, count in groups:
                xs = L.view_2d(ctx, x_t, t.ne[0], count, x_t.contents.nb[1], first * x_t.contents.nb[1])
                y = L.mul_mat(ctx, w, xs)
                part = y if part is None else L.concat(ctx, part, y, 1)
            out = part if out is None else L.concat(ctx, out, part, 0)
        out = g.output(out)
        g.finish()
        best = np.inf
        for _ in range(5):
            t0 = time.perf_counter()
            g.compute()
            best = min(best, time.perf_counter() - t0)
        return 1e3 * best, g.array(out).copy()

    one_ms, ref = run(singles, rows)
    batched_ms, batched = run([(0, columns)], rows)
    alone_ms, _ = run([(0, 1)], rows, cols=1)
    out = {"tensor": name, "columns": columns, "one_column_kernels_ms": one_ms, "batched_kernel_ms": batched_ms}
    out["one_token_alone_ms"] = alone_ms
    out["batched_same_bits"] = bool(np.array_equal(ref, batched))
    for s in (2048, 512):
        ms, y = run(singles, s)
        out[f"slices_of_{s}_rows_ms"], out[f"slices_of_{s}_same_bits"] = ms, bool(np.array_equal(ref, y))
    m.close()
    return out


def kv_windows(path, windows=(96, 100, 112, 128, 192), prompt: int = 24, steps: int = 70) -> dict:
    """Whether attention over a cache smaller than llama.cpp's 256-position window changes the
    bits: a greedy run with a 256-position cache (llama.cpp's, and a run of our own's), then the
    same tokens through caches of each size in `windows` (the window is then the cache). Per
    size: the steps whose logits equal the 256 run's bit for bit, and the largest difference."""
    from flashcli.engine.decode_state import DecodeState

    m = load(path, LoadOptions(dram_budget=None, n_ctx=256)).model
    tokens = list(range(1000, 1000 + prompt))

    def run(cache: DecodeState, feed: list[int] | None):
        m.state = m.states[0] = cache
        z = [m.eval(tokens)]
        fed = []
        for step in range(steps):
            t = int(np.argmax(z[-1])) if feed is None else feed[step]
            fed.append(t)
            z.append(m.eval([t]))
        return np.stack(z), fed

    def cache(n: int) -> DecodeState:
        kv, layers = m.cfg.kv_dim, m.cfg.n_layers
        return DecodeState(
            [np.zeros((n, kv), np.float16) for _ in range(layers)],
            [np.zeros((kv, n), np.float16) for _ in range(layers)],
        )

    ref, fed = run(cache(256), None)
    out = {"model": os.path.basename(str(path)), "prompt_tokens": prompt, "steps": steps, "windows": {}}
    for w in windows:
        z, _ = run(cache(w), fed)
        same = [bool(np.array_equal(a, b)) for a, b in zip(ref, z)]
        out["windows"][w] = {"steps_equal": sum(same), "of": len(same), "max_abs_diff": float(np.abs(ref - z).max())}
    return out


def rebuild_ms(path, budget, n: int) -> dict:
    """ms to build a decode pass's kept graphs for n sequences (what a change of the pass's
    sequences costs), against ms of the pass itself."""
    m = load(path, LoadOptions(dram_budget=budget, n_ctx=256, sequences=n)).model
    m.eval_parts([Part(s, np.arange(1000, 1040)) for s in m.states])
    builds, passes = [], []
    for step in range(3):
        m._decode = None  # as a change of the pass's sequences does
        t0 = time.perf_counter()
        m._graphs([Part(s, np.array([2000 + step])) for s in m.states], True)
        builds.append(1e3 * (time.perf_counter() - t0))
        t0 = time.perf_counter()
        m.eval_parts([Part(s, np.array([2000 + step])) for s in m.states])
        passes.append(1e3 * (time.perf_counter() - t0))
    m.close()
    return {"sequences": n, "budget": budget, "build_ms": builds, "pass_ms": passes}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--budget", type=int, default=None, help="bytes (default: half the source GGUF's size)")
    ap.add_argument("--sequences", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--tensor", default="blk.3.ffn_up.weight")
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", choices=["passes", "product", "kv_windows", "rebuild"], action="append")
    args = ap.parse_args()
    source = args.model.replace(".flash.gguf", ".gguf")
    budget = args.budget or os.path.getsize(source) // 2
    only = args.only or ["passes", "product", "kv_windows", "rebuild"]
    out = {}
    if "passes" in only:
        out["passes"] = [decode_passes(args.model, b, n) for n in args.sequences for b in (budget, None)]
    if "product" in only:
        out["product"] = one_product(args.model, args.tensor)
    if "kv_windows" in only:
        out["kv_windows"] = kv_windows(source)
    if "rebuild" in only:
        out["rebuild"] = [rebuild_ms(args.model, budget, n) for n in args.sequences]
    path = Path(args.out or default_out("batch_passes", args.model))
    kept = json.loads(path.read_text()) if args.only and path.exists() else {}  # the other parts' figures
    save(path, kept | out)


if __name__ == "__main__":
    main()
