"""Flash generation for sparse FFNs (the "bundles" layout): the paper's techniques 1-5.

Per layer, for a batch of n tokens (one when decoding):
  predictor:  h[n, d] -> each token's predicted neuron ids (low-rank, ggml); their union
  cache:      cached ones are hits; the others get free or evicted slots (window, then least
              recently used), or, past the cache's capacity, are read and used once
  I/O:        the missing neurons' records (gate row, up row, down column) are read from disk
              in coalesced direct reads, in the background...
  compute:    ...while the FFN runs over the cache's slots, each token masked to its own
              predicted set; then over the records just read; then they enter the cache.
Which neurons a token uses depends only on its predicted set, never on what the cache happens
to hold: the budget changes speed (and the order of a float sum), not the neurons.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..engine import ggml
from ..engine.bundles import BundleLayout, bundle_name
from ..engine.config import ModelConfig
from ..engine.gguf_file import GGUFFile
from .budget_parts import STAGING_ROWS
from .io_backends import ReadBuffer, open_reader
from .neuron_cache import NeuronCache
from .predictor import PredictorGraph, has_predictor

GROUPS = 8  # a single token's down projection is split into this many partial sums, run in parallel
STAGING_BUCKET = 128  # records-read graphs are built for row counts rounded up to this


@dataclass(frozen=True)
class NeuronOptions:
    predictor: bool = True  # off: every neuron is wanted by every token
    sparsity: float | None = None  # None: the calibrated thresholds; else the share of neurons skipped per token
    window: int = 0  # >0: neurons unused for this many tokens leave the cache; 0: keep while room
    reader: str = "direct"  # "direct" (O_DIRECT, parallel, coalesced) or "mmap"
    io_threads: int = 8
    max_gap_bytes: int = 16384  # direct reads: neighbouring wanted records this close are read as one
    overlap: bool = True  # compute on cached neurons while the missing ones are read
    hybrid: bool = False  # ablation: half the FFN pinned in DRAM, the other half read every token
    naive: bool = False  # ablation: no cache, the whole FFN read every token
    bundled: bool = True  # off (ablation): gate row, up row and down column read as 3 separate requests


class RecordsGraph:
    """The FFN over R neurons (gate, up, down rows: contiguous uint8 [R, bytes] each) for n
    tokens, masked per token: y[n, d] = sum over rows r of mask[t, r] * act(gate_r . h_t) *
    (up_r . h_t) * down_r. (Contiguous rows: ggml's batched kernels address rows by whole
    blocks, so a row stride that is not a multiple of the block size would misread.)"""

    def __init__(self, pool: ggml.ThreadPool, parts: tuple, layout: BundleLayout, activation: str, n: int):
        from ..engine.model import glu

        R, d = parts[0].shape[0], layout.d_model
        groups = GROUPS if n == 1 and R % GROUPS == 0 else 1
        g = ggml.Graph(pool, max_nodes=32)
        L, ctx = g.L, g.ctx
        h_t, self.h = g.input(d, n)
        mask_t, self.mask = g.input(R, n)

        def rows(array, ggml_type, per_group):  # [d, per_group, R / per_group]
            return g.strided(
                array, ggml_type, (d, per_group, R // per_group), (array.strides[0], array.strides[0] * per_group)
            )

        gate = L.mul_mat(ctx, rows(parts[0], layout.gate_type, R), h_t)  # [R, n]
        up = L.mul_mat(ctx, rows(parts[1], layout.up_type, R), h_t)
        a = L.mul(ctx, glu(g, activation, L.reshape_2d(ctx, gate, R, n), L.reshape_2d(ctx, up, R, n)), mask_t)
        down = rows(parts[2], layout.down_type, R // groups)
        if n == 1:  # [d, R/G, G] x [1, R/G, G] -> [d, 1, G]: G partial sums, one thread each
            y = L.out_prod(ctx, down, L.reshape_3d(ctx, a, 1, R // groups, groups))
        else:  # [d, R] x [n, R] -> [d, n]
            y = L.out_prod(ctx, down, L.cont(ctx, L.transpose(ctx, a)))
        y = g.output(y)
        g.finish()
        self.g, self.n, self.groups = g, n, groups
        self.y = g.array(y)

    def __call__(self, h: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self.h[...] = h
        self.mask[...] = mask
        self.g.compute()
        return self.y.sum(axis=0, keepdims=True) if self.n == 1 else self.y.copy()


class NeuronFFN:
    fused = False

    def __init__(
        self,
        gf: GGUFFile,
        cfg: ModelConfig,
        layouts: list[BundleLayout],
        slots: tuple,
        options: NeuronOptions,
        pool: ggml.ThreadPool,
    ):
        self.gf, self.cfg, self.layouts, self.opt, self.pool = gf, cfg, layouts, options, pool
        self.use_predictor = options.predictor and has_predictor(gf) and not (options.naive or options.hybrid)
        self.io_pool = ThreadPoolExecutor(options.io_threads, thread_name_prefix="flashcli-io")
        self.read_job = ThreadPoolExecutor(1, thread_name_prefix="flashcli-read")
        self.io_buffer = ReadBuffer()
        self.readers, self.caches, self.predictors = [], [], []
        for i, lay in enumerate(layouts):
            t = gf.tensor(bundle_name(i))
            kw = (
                {
                    "pool": self.io_pool,
                    "threads": options.io_threads,
                    "buffer": self.io_buffer,
                    "max_gap_bytes": options.max_gap_bytes,
                }
                if options.reader == "direct"
                else {}
            )
            if options.bundled:
                self.readers.append([open_reader(options.reader, gf.path, t.offset, lay.stride, cfg.n_ff, **kw)])
            else:  # one reader per part: three requests per neuron
                self.readers.append(
                    [
                        open_reader(
                            options.reader, gf.path, t.offset + off, lay.stride, cfg.n_ff, record_bytes=size, **kw
                        )
                        for off, size in (
                            (0, lay.gate_bytes),
                            (lay.up_offset, lay.up_bytes),
                            (lay.down_offset, lay.down_bytes),
                        )
                    ]
                )
            self.caches.append(
                NeuronCache(
                    cfg.n_ff,
                    slots[i],
                    (lay.gate_bytes, lay.up_bytes, lay.down_bytes),
                    options.window or (1 << 40),
                    row_pad=GROUPS,
                )
            )
            self.predictors.append(
                PredictorGraph(gf, i, pool, cfg.ffn_activation, options.sparsity) if self.use_predictor else None
            )
        # records read for one layer, viewed [rows, that layer's stride], and their parts
        rows = STAGING_ROWS
        self._staging = np.zeros(rows * max(x.stride for x in layouts), np.uint8)
        self._staging_parts = [
            np.zeros(rows * max(getattr(x, k) for x in layouts), np.uint8)
            for k in ("gate_bytes", "up_bytes", "down_bytes")
        ]
        self._graphs = {}  # (layer, kind, rows, n) -> RecordsGraph
        self.step = 0
        self.stats = Stats()
        if options.hybrid:  # the first half of every layer's neurons, resident for good
            for i in range(cfg.n_layers):
                ids, slots_for, _ = self.caches[i].admit(np.arange(cfg.n_ff // 2), -1)
                for s in range(0, len(ids), STAGING_ROWS):
                    self._read(i, ids[s : s + STAGING_ROWS])
                    self.caches[i].insert(
                        ids[s : s + STAGING_ROWS],
                        slots_for[s : s + STAGING_ROWS],
                        self.staging_parts(i, len(ids[s : s + STAGING_ROWS])),
                        -1,
                    )
                self.caches[i].pin_all()

    def reset(self):
        """A new sequence. The cache stays: its neurons serve any text."""

    def close(self):
        for readers in self.readers:
            for r in readers:
                r.close()
        self.read_job.shutdown(wait=True)
        self.io_pool.shutdown(wait=True)

    @property
    def nbytes(self) -> int:
        return (
            sum(c.nbytes for c in self.caches)
            + self._staging.nbytes
            + sum(p.nbytes for p in self._staging_parts)
            + self.io_buffer.nbytes
        )

    # --- per layer ---------------------------------------------------------------------------

    def forward(self, layer: int, h: np.ndarray, units: tuple | None = None) -> np.ndarray:
        """h [n, d] (FFN input of n consecutive tokens) -> FFN output [n, d]."""
        cfg, cache, st, n = self.cfg, self.caches[layer], self.stats, h.shape[0]
        step = self.step
        t0 = time.perf_counter()
        if self.opt.naive or self.opt.hybrid:
            cache.evict_all_unpinned()
        if self.predictors[layer] is not None:
            wanted = self.predictors[layer].predict(h)  # per token, ascending ids
            union = np.unique(np.concatenate(wanted)) if n > 1 else wanted[0]
        else:
            union = np.arange(cfg.n_ff)
            wanted = [union] * n
        t1 = time.perf_counter()
        to_cache, slots, overflow = cache.admit(union, step)
        missing = np.concatenate([to_cache, overflow])
        mask = cache.mask(wanted)
        t2 = time.perf_counter()
        st.compute_s += t1 - t0
        st.mem_s += t2 - t1
        st.predicted += sum(len(w) for w in wanted)
        # the misses go in chunks of STAGING_ROWS (the staging buffers' size); the first is read
        # while the cached neurons compute
        chunks = [missing[s : s + STAGING_ROWS] for s in range(0, len(missing), STAGING_ROWS)]
        pending = self.read_job.submit(self._read, layer, chunks[0]) if chunks else None
        if pending is not None and not self.opt.overlap:
            pending.result()
        y = self._graph(layer, "cache", cache.parts, n)(h, mask)  # hits, while the misses are read
        st.compute_s += time.perf_counter() - t2
        for k, chunk in enumerate(chunks):
            t3 = time.perf_counter()
            pending.result() if k == 0 else self._read(layer, chunk)
            t4 = time.perf_counter()
            st.io_wait_s += t4 - t3
            rows = -(-len(chunk) // STAGING_BUCKET) * STAGING_BUCKET
            parts = self.staging_parts(layer, rows)
            for part in parts:
                part[len(chunk) :] = 0  # masked rows must still be finite numbers
            miss_mask = np.zeros((n, rows), np.float32)
            for t, w in enumerate(wanted):
                miss_mask[t, : len(chunk)] = np.isin(chunk, w)
            y += self._graph(layer, "read", parts, n)(h, miss_mask)
            t5 = time.perf_counter()
            first = k * STAGING_ROWS  # the chunk's neurons that get a cache slot
            m = max(0, min(len(to_cache) - first, len(chunk)))
            cache.insert(to_cache[first : first + m], slots[first : first + m], tuple(p[:m] for p in parts), step)
            st.compute_s += t5 - t4
            st.mem_s += time.perf_counter() - t5
        st.uncached += len(overflow)
        if self.opt.window:
            cache.evict_outside_window(step + n - 1)
        if layer == 0:
            st.tokens += n  # the last layer runs on the output rows only
        if layer == cfg.n_layers - 1:
            self.step += st.tokens - self.step
        return y

    def staging(self, layer: int, rows: int) -> np.ndarray:
        stride = self.layouts[layer].stride
        return self._staging[: rows * stride].reshape(rows, stride)

    def staging_parts(self, layer: int, rows: int) -> tuple:
        lay = self.layouts[layer]
        return tuple(
            buf[: rows * b].reshape(rows, b)
            for buf, b in zip(self._staging_parts, (lay.gate_bytes, lay.up_bytes, lay.down_bytes))
        )

    def _read(self, layer: int, ids: np.ndarray):
        """Reads the records of `ids` and splits them into the staging parts' rows [0, len(ids))."""
        t0 = time.perf_counter()
        lay = self.layouts[layer]
        records = self.staging(layer, len(ids))
        readers = self.readers[layer]
        if len(readers) == 1:
            readers[0].read(ids, records)
        else:
            for reader, start in zip(readers, (0, lay.up_offset, lay.down_offset)):
                part = np.empty((len(ids), reader.record_bytes), np.uint8)
                reader.read(ids, part)
                records[:, start : start + reader.record_bytes] = part
        for part, split in zip(self.staging_parts(layer, len(ids)), lay.split(records)):
            part[...] = split
        st = self.stats
        st.io_s += time.perf_counter() - t0
        st.loaded += len(ids)

    def _graph(self, layer: int, kind: str, parts: tuple, n: int) -> RecordsGraph:
        # the cache's graphs are the layer's; the staging buffers are shared, and so are the
        # graphs over them, by every layer of the same layout
        key = (layer if kind == "cache" else self.layouts[layer], kind, parts[0].shape[0], n)
        graph = self._graphs.get(key)
        if graph is None:
            if n > 1:  # a prompt batch's graphs are not kept past its layer: one layer's at a time
                self._graphs = {k: v for k, v in self._graphs.items() if k[3] == 1 or k[0] == key[0]}
            graph = self._graphs[key] = RecordsGraph(self.pool, parts, self.layouts[layer], self.cfg.ffn_activation, n)
        return graph

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for readers in self.readers for r in readers)

    def telemetry(self, tokens: int) -> dict:
        st, n = self.stats, max(self.stats.tokens, 1)
        hits = sum(c.hits for c in self.caches)
        misses = sum(c.misses for c in self.caches)
        ffn_neurons = self.cfg.n_layers * self.cfg.n_ff
        bytes_read = self.bytes_read
        reads = sum(r.n_reads for readers in self.readers for r in readers)
        return {
            "io_ms": 1e3 * st.io_s / n,  # time the reads took (in the background when overlapped)
            "io_wait_ms": 1e3 * st.io_wait_s / n,  # time computation waited for them
            "mem_ms": 1e3 * st.mem_s / n,
            "ffn_compute_ms": 1e3 * st.compute_s / n,  # predictor + FFN
            "bytes_read_per_token": bytes_read / n,
            "reads_per_token": reads / n,
            "ffn_fraction_loaded_per_token": st.loaded / n / ffn_neurons,
            "ffn_fraction_used_per_token": st.predicted / n / ffn_neurons,
            "ffn_fraction_uncached_per_token": st.uncached / n / ffn_neurons,
            "cache_hit_rate": hits / max(hits + misses, 1),
        }


@dataclass
class Stats:
    tokens: int = 0
    io_s: float = 0.0
    io_wait_s: float = 0.0
    mem_s: float = 0.0
    compute_s: float = 0.0
    loaded: int = 0
    predicted: int = 0  # (token, neuron) pairs used
    uncached: int = 0  # wanted neurons read and used without a cache slot (budget too small)
