"""What changes while decoding, and what a pass feeds its graphs (model.py's run state).

The KV cache is llama.cpp's layout: per layer K rows [n_ctx, kv_dim] and V transposed
[kv_dim, n_ctx], both float16; masks hide the positions a token may not see, so rolling back is
moving n_past. Each sequence has its own DecodeState; a pass may carry tokens of several
(batching.py), each sequence's tokens a `Part` of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .ggml_bindings import F16

KV_PAD = 256  # attention runs over the cache window rounded up to this, as in llama.cpp
# A batch's caches hold the run's positions rounded up to this (a whole number of the f16 dot
# products' SIMD steps), not to KV_PAD: attention over such a window gives the bits of a 256
# one (measured: studies/batch_passes.py, "kv_windows"), and 64 sequences then fit a budget.
BATCH_KV_PAD = 64


def cache_positions(n_ctx: int, sequences: int = 1) -> int:
    """Positions of a KV cache for contexts of n_ctx tokens: padded as llama.cpp's for a run of
    its own, to BATCH_KV_PAD for a batch's."""
    pad = KV_PAD if sequences == 1 else BATCH_KV_PAD
    return -(-n_ctx // pad) * pad


@dataclass
class DecodeState:
    """One sequence: its KV cache (llama.cpp's layout) and its position."""

    k: list  # per layer [n_ctx, kv_dim] float16: one row per position
    v: list  # per layer [kv_dim, n_ctx] float16: transposed, one row per value dimension
    n_past: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, n_ctx: int, sequences: int = 1) -> DecodeState:
        """A cache for n_ctx positions, padded (cache_positions) for one of `sequences`."""
        n_ctx = cache_positions(n_ctx, sequences)
        return cls(
            [np.zeros((n_ctx, cfg.kv_dim), np.float16) for _ in range(cfg.n_layers)],
            [np.zeros((cfg.kv_dim, n_ctx), np.float16) for _ in range(cfg.n_layers)],
        )

    @property
    def n_ctx(self) -> int:
        return self.k[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def arrays(self) -> list:
        """(array, ggml type, ne0, ne1) of the caches as the graphs see them (gpu.Device.hold)."""
        kv = self.k[0].shape[1]
        return [(k, F16, kv, self.n_ctx) for k in self.k] + [(v, F16, 1, kv * self.n_ctx) for v in self.v]

    def window(self, n: int) -> int:
        """Cache positions that n more tokens attend over."""
        return min(-(-(self.n_past + n) // KV_PAD) * KV_PAD, self.n_ctx)


@dataclass
class Part:
    """One sequence's tokens in a pass, and how many of its last tokens want logits. `exact`:
    each of its tokens gets the bits it gets alone (drafted tokens being verified), as every
    token does in the model's exact mode."""

    state: DecodeState
    tokens: np.ndarray
    n_out: int = 1
    exact: bool = False

    @property
    def n(self) -> int:
        return len(self.tokens)


class Segment:
    """A part's place in a pass: its columns, its output rows, and the inputs of its attention
    (positions, cache rows, masks over its window)."""

    def __init__(self, cfg: ModelConfig, part: Part, start: int, out_start: int, exact: bool):
        state, n = part.state, part.n
        self.state, self.start, self.n, self.out_start, self.n_out = state, start, n, out_start, part.n_out
        self.exact = exact  # attention one token at a time
        self.window = state.window(n)
        self.k_rows = np.zeros((1, n), np.int64)
        self.v_rows = np.zeros((1, n * cfg.kv_dim), np.int64)
        self.mask = np.zeros((n, self.window), np.float32)
        self.mask_swa = np.zeros((n, self.window), np.float32) if cfg.sliding_window else None

    def fill(self, cfg: ModelConfig, pos: np.ndarray):
        n_ctx = self.state.n_ctx
        self.k_rows[0] = pos
        self.v_rows[0] = (np.arange(cfg.kv_dim)[None, :] * n_ctx + pos[:, None]).reshape(-1)
        keys = np.arange(self.window)[None, :]
        self.mask[...] = np.where(keys <= pos[:, None], 0.0, -np.inf)
        if self.mask_swa is not None:
            visible = (keys <= pos[:, None]) & (pos[:, None] - keys < cfg.sliding_window)
            self.mask_swa[...] = np.where(visible, 0.0, -np.inf)


class BatchInputs:
    """The inputs of a pass's graphs: embeddings, positions, output rows, and per part a
    Segment. Graphs bind these arrays once; each eval refills them.

    `units` and `out_units` say which columns (tokens in, rows out of the last layer) a product
    may compute together, (start, count, whole): a part's prompt batch is computed whole, as it
    is alone; the tokens that must get the bits they get alone (decoding tokens of any
    sequence; every token in exact mode) are single columns, which products group into
    batches that ggml's kernels compute as one column each (kernels.py). `batched`: the whole
    pass is one unit, on ggml's batched kernels (faster; a token's bits then depend on the
    others in the pass)."""

    def __init__(self, cfg: ModelConfig, parts: list[Part], exact: bool = False, batched: bool = False):
        self.segments = []
        start = out = 0
        for p in parts:
            self.segments.append(Segment(cfg, p, start, out, exact or p.exact))
            start, out = start + p.n, out + p.n_out
        self.n, self.n_out = start, out
        self.x = np.zeros((self.n, cfg.d_model), np.float32)
        self.pos = np.zeros((1, self.n), np.int32)
        self.out_rows = np.concatenate(
            [np.arange(s.start + s.n - s.n_out, s.start + s.n, dtype=np.int32) for s in self.segments]
        )[None, :]
        if batched and not exact:
            self.units, self.out_units = ((0, self.n, self.n > 1),), ((0, self.n_out, self.n_out > 1),)
        else:
            self.units = tuple(_units(s.start, s.n, s.exact) for s in self.segments)
            self.out_units = tuple(_units(s.out_start, s.n_out, s.exact) for s in self.segments)
        self.exact = exact

    def fill(self, cfg: ModelConfig, x: np.ndarray):
        self.x[...] = x
        for s in self.segments:
            pos = np.arange(s.state.n_past, s.state.n_past + s.n)
            self.pos[0, s.start : s.start + s.n] = pos
            s.fill(cfg, pos)


def _units(start: int, n: int, exact: bool) -> tuple:
    return (start, n, n > 1 and not exact)


def column_groups(units: tuple, chunk: int) -> list[tuple[int, int]]:
    """(first column, count) of each product to run: a whole unit alone; neighbouring single
    columns together, `chunk` at most (the batch whose columns a kernel computes as one)."""
    groups: list[list[int]] = []
    run = None
    for start, n, whole in units:
        if whole:
            groups.append([start, n])
            run = None
            continue
        for c in range(start, start + n):
            if run is None or run[1] == chunk:
                run = [c, 0]
                groups.append(run)
            run[1] += 1
    return [(a, b) for a, b in groups]


def column_runs(units: tuple) -> list[tuple[int, int, bool]]:
    """(first column, count, whole) of each product to run: a whole unit alone; neighbouring
    single columns all together (for a kernel that computes every column as one)."""
    runs: list[list] = []
    for start, n, whole in units:
        if whole or not runs or runs[-1][2]:
            runs.append([start, n, whole])
        else:
            runs[-1][1] += n
    return [(a, b, c) for a, b, c in runs]


def graph_key(parts: list[Part], exact: bool, batched: bool = False) -> tuple:
    """What a pass's graphs are built for: the caches they point at, the parts' sizes, windows."""
    return (exact, batched) + tuple(
        (p.state.k[0].ctypes.data, p.state.n_ctx, p.n, p.n_out, p.exact, p.state.window(p.n)) for p in parts
    )
