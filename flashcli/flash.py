"""Flash generation: the FFN computed from neurons read on demand into a budgeted cache.

Per layer, per token (the paper's techniques 1-5):
  predictor:  h[d] -> scores[n_ff] (low-rank, ggml) -> predicted neuron ids
  cache:      ids already cached are hits; room is made (window, then least recently used)
  I/O:        the missing neurons' bundles are read (one record = gate row, up row, down column)
  compute:    on every cached neuron (a superset of the predicted set: cached neurons cost no
              I/O and only improve the output): act(gate h) * (up h) -> down^T a, in ggml
Prompt tokens go through the FFN one at a time, exactly as generated ones: each token sees only
its own predicted set (the paper leaves prompt processing unoptimised too).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import budget as budget_mod
from . import ggml, predictor
from .bundles import BundleLayout, bundle_name
from .config import ModelConfig
from .gguf_file import GGUFFile
from .io_backends import ReadBuffer, open_reader
from .model import Model, default_threads
from .neuron_cache import NeuronCache

GROUPS = 8  # the down projection is split into this many partial sums, computed in parallel
ROW_PAD = GROUPS
PROMPT_BATCH = 32  # attention batch for prompts: bounds the activation buffers inside the budget


@dataclass(frozen=True)
class FlashOptions:
    """The switches of flash generation. Defaults are what `flashcli generate` uses."""

    predictor: bool = True  # off: every neuron is wanted every token
    window: int = 0  # >0: neurons unused for this many tokens leave the cache; 0: keep while room
    reader: str = "direct"  # "direct" (O_DIRECT, parallel, coalesced) or "mmap"
    io_threads: int = 8
    max_gap_bytes: int = 32768  # direct reads: neighbouring wanted records this close are read as one
    hybrid: bool = False  # ablation: half the FFN pinned in DRAM, the other half read every token
    naive: bool = False  # ablation: no cache, the whole FFN read every token
    bundled: bool = True  # off (ablation): gate row, up row and down column read as 3 separate reads


def staging_rows(n_ff: int, slots) -> int:
    """Rows of the read staging buffer: a layer's whole cache refill, or chunks of 256 when
    the cache is smaller than that (plus GROUPS zero rows for the grouped down projection)."""
    return min(n_ff, max(256, max(slots))) + GROUPS


class FlashFFN:
    fused = False

    def __init__(self, gf: GGUFFile, cfg: ModelConfig, slots: tuple, options: FlashOptions, pool: ggml.ThreadPool):
        self.gf, self.cfg, self.opt, self.pool = gf, cfg, options, pool
        self.layout = BundleLayout.from_metadata(gf, cfg.d_model)
        lay = self.layout
        self.io_pool = ThreadPoolExecutor(options.io_threads, thread_name_prefix="flashcli-io")
        self.io_buffer = ReadBuffer()
        self.readers, self.caches, self.predictors = [], [], []
        for i in range(cfg.n_layers):
            t = gf.tensor(bundle_name(i))
            kw = ({"pool": self.io_pool, "threads": options.io_threads, "buffer": self.io_buffer,
                   "max_gap_bytes": options.max_gap_bytes}
                  if options.reader == "direct" else {})
            if options.bundled:
                self.readers.append(open_reader(options.reader, gf.path, t.offset, lay.stride, cfg.n_ff, **kw))
            else:  # one reader per part, each starting at its part: three requests per neuron
                self.readers.append([open_reader(options.reader, gf.path, t.offset + off, lay.stride, cfg.n_ff, **kw)
                                     for off in (lay.gate_offset, lay.up_offset, lay.down_offset)])
            self.caches.append(NeuronCache(cfg.n_ff, slots[i], (lay.gate_bytes, lay.up_bytes, lay.down_bytes),
                                           options.window or (1 << 40), row_pad=ROW_PAD))
            self.predictors.append(_PredictorGraph(gf, i, pool) if options.predictor else None)
        self.staging = np.zeros((staging_rows(cfg.n_ff, slots), lay.stride), np.uint8)
        self.part_staging = None if options.bundled else np.zeros_like(self.staging)
        self.step = 0
        self.stats = _Stats()
        if options.hybrid:  # the first half of every layer's neurons, resident for good
            for i in range(cfg.n_layers):
                for start in range(0, cfg.n_ff // 2, len(self.staging) - GROUPS):
                    ids = np.arange(start, min(cfg.n_ff // 2, start + len(self.staging) - GROUPS))
                    ids, _ = self.caches[i].admit(ids, 0)
                    self.caches[i].insert(ids, *self._read(i, ids), 0)
                self.caches[i].pin_all()

    def reset(self):
        """A new sequence. The cache stays: its neurons serve any text."""

    def close(self):
        for rs in self.readers:
            for r in rs if isinstance(rs, list) else [rs]:
                r.close()
        self.io_pool.shutdown(wait=True)

    # --- per layer ---------------------------------------------------------------------------

    def forward(self, layer: int, h: np.ndarray) -> np.ndarray:
        """h [n, d] (FFN input of n consecutive tokens) -> FFN output [n, d]."""
        out = np.empty_like(h)
        for t in range(h.shape[0]):
            out[t] = self._one_token(layer, h[t : t + 1], self.step + t)
        if layer == self.cfg.n_layers - 1:
            self.step += h.shape[0]
            self.stats.tokens += h.shape[0]
        return out

    def _one_token(self, layer: int, h: np.ndarray, step: int) -> np.ndarray:
        cache, st = self.caches[layer], self.stats
        t0 = time.perf_counter()
        if self.opt.naive or self.opt.hybrid:
            cache.evict_all_unpinned()
        if self.predictors[layer] is not None:
            wanted = self.predictors[layer].predict(h)
        else:
            wanted = np.arange(self.cfg.n_ff)
        t1 = time.perf_counter()
        to_cache, overflow = cache.admit(wanted, step)
        st.mem_s += time.perf_counter() - t1
        st.compute_s += t1 - t0
        st.predicted += len(wanted)
        if len(to_cache):
            gate, up, down = self._read(layer, to_cache)
            t2 = time.perf_counter()
            cache.insert(to_cache, gate, up, down, step)
            st.mem_s += time.perf_counter() - t2
        t3 = time.perf_counter()
        y = _ffn_graph(self.pool, cache.gate, cache.up, cache.down, cache.n_used, self.layout, self.cfg, h)
        st.compute_s += time.perf_counter() - t3
        # what the budget cannot cache is still computed: read in chunks, used once, dropped
        chunk = len(self.staging) - GROUPS
        for start in range(0, len(overflow), chunk):
            ids = overflow[start : start + chunk]
            gate, up, _ = self._read(layer, ids)
            t4 = time.perf_counter()
            y += _ffn_graph(self.pool, gate, up, self.layout.split(self.staging)[2], len(ids), self.layout, self.cfg, h)
            st.compute_s += time.perf_counter() - t4
        st.uncached += len(overflow)
        if self.opt.window:
            t5 = time.perf_counter()
            cache.evict_outside_window(step)
            st.mem_s += time.perf_counter() - t5
        return y

    def _read(self, layer: int, ids: np.ndarray):
        """Reads the bundles of `ids` into the staging rows; returns their gate, up, down parts."""
        t0 = time.perf_counter()
        records = self.staging[: len(ids)]
        readers = self.readers[layer]
        if self.opt.bundled:
            readers = [readers]
            readers[0].read(ids, records)
        else:
            lay, tmp = self.layout, self.part_staging[: len(ids)]
            parts = ((0, lay.gate_bytes), (lay.up_offset, lay.up_bytes), (lay.down_offset, lay.down_bytes))
            for reader, (off, size) in zip(readers, parts):
                reader.read(ids, tmp)
                records[:, off : off + size] = tmp[:, :size]
        st = self.stats
        st.io_s += time.perf_counter() - t0
        st.bytes_read = sum(r.bytes_read for rs in self.readers for r in (rs if isinstance(rs, list) else [rs]))
        st.loaded += len(ids)
        return self.layout.split(records)

    def telemetry(self) -> dict:
        st, n = self.stats, max(self.stats.tokens, 1)
        hits = sum(c.hits for c in self.caches)
        misses = sum(c.misses for c in self.caches)
        ffn_neurons = self.cfg.n_layers * self.cfg.n_ff
        return {
            "io_ms": 1e3 * st.io_s / n,
            "mem_ms": 1e3 * st.mem_s / n,
            "compute_ms": 1e3 * st.compute_s / n,  # predictor + FFN; attention is in the rest
            "bytes_read_per_token": st.bytes_read / n,
            "ffn_fraction_loaded_per_token": st.loaded / n / ffn_neurons,
            "ffn_fraction_predicted_per_token": st.predicted / n / ffn_neurons,
            "ffn_fraction_uncached_per_token": st.uncached / n / ffn_neurons,
            "cache_hit_rate": hits / max(hits + misses, 1),
            "ffn_tokens": st.tokens,
        }


@dataclass
class _Stats:
    tokens: int = 0
    io_s: float = 0.0
    mem_s: float = 0.0
    compute_s: float = 0.0
    bytes_read: int = 0
    loaded: int = 0
    predicted: int = 0
    uncached: int = 0  # wanted neurons read and used without a cache slot (budget too small)


class _PredictorGraph:
    """One layer's predictor in ggml (A and B stay float16, memory-mapped): h -> predicted ids."""

    def __init__(self, gf: GGUFFile, layer: int, pool: ggml.ThreadPool):
        names = predictor.tensor_names(layer)
        gf.prefetch(n for n in names.values() if gf.has(n))
        self.threshold = _vector(gf, names["threshold"])
        self.down_norm = _vector(gf, names["down_norm"]) if gf.has(names["down_norm"]) else None
        a = gf.tensor(names["gate_a"])
        d, n_ff = a.row_len, len(self.threshold)
        g = ggml.Graph(pool, arena_bytes=4 * (d + 4 * n_ff + 4 * a.n_rows) + 4096 * 8)
        L = g.L
        h_t, self.h = g.input(d, 1)

        def low_rank(prefix):
            ta, tb = gf.tensor(names[prefix + "_a"]), gf.tensor(names[prefix + "_b"])
            wa = g.external(ta.raw, ta.ggml_type, ta.row_len, ta.n_rows)
            wb = g.external(tb.raw, tb.ggml_type, tb.row_len, tb.n_rows)
            return g.output(L.mul_mat(g.ctx, wb, L.mul_mat(g.ctx, wa, h_t)))

        self.gate = low_rank("gate")
        self.up = low_rank("up") if gf.has(names["up_a"]) else None
        self.graph = g.finish()

    def predict(self, h: np.ndarray) -> np.ndarray:
        self.h[...] = h
        self.graph.compute()
        g = self.gate[0]
        if self.up is None:
            score = g
        else:
            score = np.abs(g / (1.0 + np.exp(-g)) * self.up[0]) * self.down_norm
        return np.flatnonzero(score > self.threshold)


def _vector(gf: GGUFFile, name: str) -> np.ndarray:
    t = gf.tensor(name)
    return np.asarray(t.raw.view(np.float32), dtype=np.float32).copy()


def _ffn_graph(pool: ggml.ThreadPool, gate: np.ndarray, up: np.ndarray, down: np.ndarray, n: int,
               lay: BundleLayout, cfg: ModelConfig, h: np.ndarray) -> np.ndarray:
    """FFN output [d] of one token over neuron rows [0, n) of gate, up, down (uint8 [rows, bytes],
    rows possibly strided). `down` must have n rounded up to GROUPS rows unless n % GROUPS == 0;
    rows past n are ignored (their activation is zero-padded)."""
    if n == 0:
        return np.zeros(cfg.d_model, np.float32)
    groups = GROUPS if down.shape[0] >= -(-n // GROUPS) * GROUPS else 1
    n_pad = -(-n // groups) * groups
    g = ggml.Graph(pool, arena_bytes=4 * (6 * n_pad + (groups + 2) * cfg.d_model) + 4096 * 16, max_nodes=64)
    L = g.L
    h_t = g.external(np.ascontiguousarray(h, np.float32), ggml.F32, cfg.d_model, 1)

    def rows(arr, ggml_type, count, per_group):  # [d, per_group, count // per_group] over arr's rows
        return g.strided(arr, ggml_type, (cfg.d_model, per_group, count // per_group),
                         (arr.strides[0], arr.strides[0] * per_group))

    gate_t = L.mul_mat(g.ctx, rows(gate, lay.gate_type, n, n), h_t)  # [n, 1]
    up_t = L.mul_mat(g.ctx, rows(up, lay.up_type, n, n), h_t)
    act = L.relu(g.ctx, gate_t) if cfg.ffn_activation == "relu" else L.silu(g.ctx, gate_t)
    a = L.reshape_2d(g.ctx, L.mul(g.ctx, act, up_t), 1, n)  # [1, n]
    # down^T a as `groups` partial sums, in parallel (out_prod gives one thread per output row):
    # down rows viewed [d, n_pad/G, G], a zero-padded and viewed [1, n_pad/G, G] -> [d, 1, G]
    a = L.reshape_3d(g.ctx, L.pad(g.ctx, a, 0, n_pad - n, 0, 0), 1, n_pad // groups, groups)
    partial = g.output(L.out_prod(g.ctx, rows(down, lay.down_type, n_pad, n_pad // groups), a))  # [G, d]
    g.finish().compute()
    return partial.sum(axis=0)


class BundleDenseFFN:
    """Dense generation of a converted file: every neuron, computed in place from the
    memory-mapped bundles (no predictor, cache or reader). The reference for the flash path."""

    fused = False

    def __init__(self, gf: GGUFFile, cfg: ModelConfig, pool: ggml.ThreadPool):
        self.cfg, self.pool = cfg, pool
        self.layout = BundleLayout.from_metadata(gf, cfg.d_model)
        self.parts = [self.layout.split(gf.tensor(bundle_name(i)).rows()) for i in range(cfg.n_layers)]

    def forward(self, layer: int, h: np.ndarray) -> np.ndarray:
        gate, up, down = self.parts[layer]
        return np.stack([_ffn_graph(self.pool, gate, up, down, self.cfg.n_ff, self.layout, self.cfg, h[t : t + 1])
                         for t in range(h.shape[0])])


class FlashModel(Model):
    """A converted (.flash.gguf) model under a DRAM budget."""

    def __init__(self, path, dram_budget: int | None = None, n_threads: int | None = None,
                 n_ctx: int | None = None, options: FlashOptions = FlashOptions(), gguf_file: GGUFFile | None = None,
                 all_logits: bool = False):
        gf = gguf_file or GGUFFile(path)
        cfg = ModelConfig.from_gguf(gf)
        layout = BundleLayout.from_metadata(gf, cfg.d_model)
        n_ctx_alloc = -(-min(n_ctx or 4096, cfg.context_length) // 256) * 256
        want = [float(x) for x in gf.get("flashcli.predictor.predicted_fraction", [1.0] * cfg.n_layers)]
        if not options.predictor:
            want = [1.0] * cfg.n_layers
        self.plan = budget_mod.plan_budget(gf, cfg, dram_budget, n_ctx_alloc, PROMPT_BATCH,
                                           PROMPT_BATCH if all_logits else 1, layout.payload_bytes, layout.stride, want)
        pool = ggml.ThreadPool(n_threads or default_threads())
        ffn = FlashFFN(gf, cfg, self.plan.slots, options, pool)
        super().__init__(path, n_threads=n_threads, n_ctx=n_ctx, ffn=ffn, gguf_file=gf, pool=pool)
        self.prompt_batch = PROMPT_BATCH

    def telemetry(self) -> dict:
        return self.ffn.telemetry()
