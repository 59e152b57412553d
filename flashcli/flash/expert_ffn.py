"""A mixture of experts computed outside the layer graphs (model.FFN), its experts read from disk
into each layer's expert cache as the router asks for them.

Per layer and pass: the router's graph on the FFN input gives each token's k experts and
weights; the cache makes the experts resident (reading the missing ones); the experts' graph
runs on the slots, the router's ids mapped to slots. A token's column of mul_mat_id depends only
on its experts' bytes and its own input, so the result is the resident model's bit for bit
(tests/test_moe.py checks it against llama.cpp). A prompt batch is routed whole, as llama.cpp
routes it; where its experts outnumber the slots, they run in rounds of as many as fit, each
round over all the batch's tokens. Single tokens of a pass (speculation, batches) go one at a
time.
"""

from __future__ import annotations

import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..engine import ggml, moe
from ..engine.decode_state import column_groups
from .expert_cache import ExpertCache, fill_hottest, staging_for
from .expert_slots import SlotPopulator, pools_for


class ExpertFFN:
    """The FFN of a mixture-of-experts model under a budget: `slots[i]` experts cached in layer i."""

    def __init__(
        self, gf, cfg, weights, slots: list[int], pool: ggml.ThreadPool, io_threads: int = 8, prefetch: bool = False
    ):
        if len(slots) != cfg.n_layers or min(slots) < min(cfg.n_expert_used + 1, cfg.n_expert):
            raise ValueError(f"every layer needs at least {cfg.n_expert_used + 1} expert slots (a token's and a spare)")
        self.cfg, self.weights, self.pool = cfg, weights, pool
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix="flashcli-experts")
        self._staging = staging_for(gf, range(cfg.n_layers))  # shared: layers read in turn
        self.pools = pools_for(gf, slots)
        pool_of = {layer: p for p in self.pools for layer in p.layers}
        self.caches = [ExpertCache(gf, i, n, self._io, self._staging, pool_of[i]) for i, n in enumerate(slots)]
        self._populator = SlotPopulator(self.pools)
        self.step = 0  # passes so far: an expert's recency
        self.wait_s = 0.0  # seconds spent reading experts
        self._routers: dict = {}  # (layer, n) -> router graph, kept for single tokens
        self._experts: dict = {}
        self._shared_graphs: dict = {}
        # one work buffer for every graph here (they run in turn), held by the graphs that use it
        self._work = lambda: None  # a weak reference to it
        self._working = []  # the graphs kept
        self.prefetch = prefetch
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="flashcli-prefetch")
        self._pending, self._stop = None, threading.Event()
        self._guess: dict = {}
        self.guessed = self.guessed_right = 0  # experts guessed by pre-gating, and of them used
        self.routing = RoutingStats(cfg.n_layers, cfg.n_expert, cfg.n_expert_used)
        self.warmed, self.warm_s = 0, 0.0  # experts read before the first token (warm), seconds

    def warm(self, picks: np.ndarray) -> None:
        """Before the first token, the slots filled with the experts calibration picked most
        (expert_cache.fill_hottest; picks [n_layers, n_expert]): their reads are no token's."""
        t0 = time.perf_counter()
        self.warmed = fill_hottest(self.caches, self.pools, picks)
        self.warm_s = time.perf_counter() - t0
        for cache in self.caches:
            cache.bytes_read = 0

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pools) + self._staging.nbytes

    @property
    def bytes_read(self) -> int:
        return sum(c.bytes_read for c in self.caches)

    def in_layer(self, g: ggml.Graph, layer: int, h: ggml.TensorP, units: tuple) -> tuple:
        """The router's ops in the layer's own graph (model._layer_graph), on its FFN input h
        [d, n], where the pass's tokens are routed as one group (a single token, a prompt batch):
        ((ids, int32), (weights, float32)) outputs for forward(); else () and forward routes.
        One graph less a layer; the same ops on the same input, so the same bits."""
        if len(column_groups(units, 1)) != 1:
            return ()
        router = self.weights.matrix(g, self.weights.layers[layer]["ffn_gate_inp"])
        ids, weights = moe.route(g, self.cfg, router, h)
        return (g.output(g.L.cont(g.ctx, ids)), np.int32), (g.output(weights), np.float32)

    def forward(self, layer: int, h: np.ndarray, units: tuple | None = None, ids=None, weights=None) -> np.ndarray:
        """FFN input h [n, d] -> output [n, d]; `units` (decode_state.BatchInputs) says which
        columns are single tokens, each computed alone; `ids` and `weights`: the router's
        outputs where the layer's graph ran it (in_layer). The experts of all of a pass's tokens
        are read once, together, where they fit the slots."""
        self._finish_prefetch(layer)
        n, cache, k = len(h), self.caches[layer], self.cfg.n_expert_used
        groups = column_groups(units or ((0, n, True),), 1)
        if ids is not None:
            routed = [(ids.reshape(n, k).copy(), weights.reshape(n, k).copy())]
        else:
            routed = [self._route(layer, h[first : first + count]) for first, count in groups]
        union = np.unique(np.concatenate([ids.ravel() for ids, _ in routed]))
        self.routing.add(layer, [ids for ids, _ in routed])
        self._score_prefetch(layer, union)
        together = len(union) <= cache.n_slots
        resident = (union, self._fetch(cache, union, counted=True)) if together else None
        if self.prefetch and together and layer + 1 < self.cfg.n_layers:  # never beside a batch's rounds
            self._start_prefetch(layer + 1, h)
        if len(groups) == 1:  # the union is the group's experts, and their slots are known
            out = self._group(layer, h, *routed[0], not together, resident)
        else:
            out = np.empty_like(h)
            for (first, count), (ids, weights) in zip(groups, routed):
                out[first : first + count] = self._group(layer, h[first : first + count], ids, weights, not together)
        if layer == self.cfg.n_layers - 1:
            self.step += 1
        return out

    def _fetch(self, cache: ExpertCache, experts: np.ndarray, counted: bool) -> np.ndarray:
        t0 = time.perf_counter()
        slots = cache.fetch(experts, self.step, counted)
        self.wait_s += time.perf_counter() - t0
        return slots

    def _group(
        self, layer: int, h: np.ndarray, ids: np.ndarray, weights: np.ndarray, counted: bool, resident=None
    ) -> np.ndarray:
        """The experts of tokens routed together (ids, weights [n, k]): in one go where their
        experts fit the slots, else in rounds of as many experts as fit beside k spare slots,
        every round over all the tokens (ggml's kernel for an expert depends on how many tokens
        it gets), the pairs of experts not in the round sent to the spares and dropped.
        `resident`: (the group's experts, sorted; their slots), fetched already."""
        cache, n, k = self.caches[layer], len(h), self.cfg.n_expert_used
        experts, slots = resident if resident is not None else (np.unique(ids), None)
        inverse = np.searchsorted(experts, ids)  # each pair's place in the sorted experts
        if len(experts) <= cache.n_slots:
            if slots is None:
                slots = self._fetch(cache, experts, counted)
            out = self._run_experts(layer, h, slots[inverse], weights)
        else:
            y = np.empty((n, k, self.cfg.d_model), np.float32)
            per_round = cache.n_slots - k
            for first in range(0, len(experts), per_round):
                chosen = np.arange(first, min(first + per_round, len(experts)))
                slots = self._fetch(cache, experts[chosen], counted)
                # a token's pairs outside the round go to spare slots, its j-th to the j-th spare:
                # ggml wants a token's experts distinct
                spare = np.setdiff1d(np.arange(cache.n_slots), slots)[:k]
                here = (inverse >= first) & (inverse < first + len(chosen))
                ids = np.where(here, slots[np.clip(inverse - first, 0, len(chosen) - 1)], spare[None, :])
                y[here] = self._run_experts(layer, h, ids)[here]
            out = self._weighted_sum(y, weights)
        if self.cfg.n_ff_shexp:  # on the whole group, as the resident model multiplies it
            out += self._shared(layer, h)  # float32, one addition per element: ggml_add's bits
        return out

    # --- pre-gating: the next layer's router on this layer's FFN input guesses its experts --------

    def _start_prefetch(self, layer: int, h: np.ndarray):
        ids, weights = self._route(layer, h)
        order = np.argsort(-weights.ravel(), kind="stable")  # the likeliest first
        flat = ids.ravel()[order]
        guess = flat[np.sort(np.unique(flat, return_index=True)[1])]
        if len(guess) > self.caches[layer].n_slots // 2:
            return  # a prompt's guesses would push out more than they bring
        self._guess[layer] = guess
        self._stop = threading.Event()
        self._pending = self._prefetcher.submit(self.caches[layer].prefetch, guess, self.step, self._stop)

    def _finish_prefetch(self, layer: int):
        """Stops the reads ahead of this layer: those started finish (a few, at most as many as
        the staging's buffers), the guesses not read yet are left to the true router's fetch."""
        if self._pending is not None:
            t0 = time.perf_counter()
            self._stop.set()
            self._pending.result()
            self.wait_s += time.perf_counter() - t0
            self._pending = None

    def _score_prefetch(self, layer: int, used: np.ndarray):
        guess = self._guess.pop(layer, None)
        if guess is not None:
            self.guessed += len(guess)
            self.guessed_right += len(np.intersect1d(guess, used))

    def _route(self, layer: int, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids [n, k] int32, weights [n, k] float32) of the router on h [n, d]."""
        n, k = len(h), self.cfg.n_expert_used
        key = (layer, n)
        built = self._routers.get(key)
        if built is None:
            g = ggml.Graph(self.pool, max_nodes=32)
            x_t, x = g.input(self.cfg.d_model, n)
            ids, weights = moe.route(
                g, self.cfg, self.weights.matrix(g, self.weights.layers[layer]["ffn_gate_inp"]), x_t
            )
            ids = g.output(g.L.cont(g.ctx, ids))
            weights = g.output(weights)
            self._finish(g, keep=n == 1)
            built = (g, x, ggml.as_array(ids, np.int32), g.array(weights))
            if n == 1:
                self._routers[key] = built
        g, x, ids, weights = built
        x[...] = h
        g.compute()
        return ids.reshape(n, k).copy(), weights.reshape(n, k).copy()

    def _run_experts(
        self, layer: int, h: np.ndarray, slots: np.ndarray, weights: np.ndarray | None = None
    ) -> np.ndarray:
        """For h [n, d], each token's k experts at `slots` [n, k] of the layer's cache: their
        weighted sum [n, d] with `weights` [n, k], or without weights their outputs [n, k, d]."""
        cfg, n, k = self.cfg, len(h), self.cfg.n_expert_used
        summed = weights is not None
        key = (layer, n, summed)
        built = self._experts.get(key)
        if built is None:
            g = ggml.Graph(self.pool, max_nodes=64 + 4 * k)
            L, ctx = g.L, g.ctx
            x_t, x = g.input(cfg.d_model, n)
            ids_t, ids = g.input(k, n, np.int32, ggml.I32)
            y = moe.expert_outputs(g, cfg, self.caches[layer].tensors(g), x_t, ids_t)
            w = None
            if summed:
                w_t, w = g.input(k, n)
                y = moe.weighted_sum(g, cfg, y, L.reshape_3d(ctx, w_t, 1, k, n))
            y = g.output(y)
            self._finish(g, keep=n == 1)
            built = (g, x, ids, w, g.array(y))
            if n == 1:
                self._experts[key] = built
        g, x, ids, w, y = built
        x[...], ids[...] = h, slots
        if summed:
            w[...] = weights
        g.compute()
        return y.reshape(n, cfg.d_model).copy() if summed else y.reshape(n, k, cfg.d_model).copy()

    def _weighted_sum(self, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """moe.weighted_sum of experts' outputs y [n, k, d] with weights [n, k] -> [n, d]."""
        cfg, (n, k, d) = self.cfg, y.shape
        g = ggml.Graph(self.pool, max_nodes=16 + 4 * k)
        y_t, y_in = g.input(d * k, n)
        w_t, w_in = g.input(k, n)
        L, ctx = g.L, g.ctx
        out = g.output(moe.weighted_sum(g, cfg, L.reshape_3d(ctx, y_t, d, k, n), L.reshape_3d(ctx, w_t, 1, k, n)))
        self._finish(g, keep=False)
        y_in[...], w_in[...] = y.reshape(n, k * d), weights
        g.compute()
        return g.array(out).reshape(n, d).copy()

    def _shared(self, layer: int, h: np.ndarray) -> np.ndarray:
        """qwen2moe's shared expert [n, d] on h [n, d] (resident weights)."""
        n, key = len(h), (layer, len(h))
        built = self._shared_graphs.get(key)
        if built is None:
            g = ggml.Graph(self.pool, max_nodes=32)
            x_t, x = g.input(self.cfg.d_model, n)
            product = lambda g, t, x, units: g.L.mul_mat(g.ctx, self.weights.matrix(g, t), x)  # noqa: E731
            y = g.output(moe.shared_expert(g, self.cfg, product, self.weights.layers[layer], x_t, ()))
            self._finish(g, keep=n == 1)
            built = (g, x, g.array(y))
            if n == 1:
                self._shared_graphs[key] = built
        g, x, y = built
        x[...] = h
        g.compute()
        return y.reshape(n, self.cfg.d_model).copy()  # the graph's memory goes with the graph

    def _finish(self, g: ggml.Graph, keep: bool):
        """Plans g on the one work buffer (grown to the largest need; kept graphs follow it):
        ggml's per-thread scratch is a megabyte a graph, and a layer's graphs run one at a time."""
        g.finish()
        work, need = self._work(), g.plan.work_size + 64
        if work is None or work.nbytes < need:
            old, work = work, np.empty(need, np.uint8)
            for kept in self._working:
                kept.plan.work_data = work.ctypes.data
                kept._keep = [work if x is old else x for x in kept._keep]
            self._work = weakref.ref(work)
        g._work = None  # its own goes: the shared one serves
        g.plan.work_data = work.ctypes.data
        g._keep.append(work)
        if keep:
            self._working.append(g)

    def reset(self) -> None:
        pass  # the cache keeps what it holds: a new sequence may well use the same experts

    def telemetry(self, tokens: int) -> dict:
        hits = sum(c.hits for c in self.caches)
        asked = hits + sum(c.misses for c in self.caches)
        n = max(tokens, 1)
        return {
            "expert_hit_rate": hits / asked if asked else 0.0,
            "experts_read_per_token": sum(c.misses for c in self.caches) / n,
            "bytes_read_per_token": self.bytes_read / n,
            "io_wait_ms": 1e3 * self.wait_s / n,
            "expert_slots": sum(p.n_slots for p in self.pools),
            "experts_prefetched_per_token": sum(c.prefetched for c in self.caches) / n,
            "prefetch_guessed_right": self.guessed_right / self.guessed if self.guessed else 0.0,
            "experts_warmed": self.warmed,
            "warm_s": self.warm_s,
        } | self.routing.telemetry()

    def close(self) -> None:
        self._finish_prefetch(-1)
        self._prefetcher.shutdown(wait=True)
        self._populator.close()
        for p in self.pools:
            p.close()
        self._io.shutdown(wait=False)  # no read runs: every fetch waited for its own
        self._staging.close()


class RoutingStats:
    """What the routers picked: each layer's picks (a token's experts) per expert, and how many
    of a one-token pass's experts the previous one-token pass used in the same layer (the
    locality an expert cache lives on; an even router's is about k/E)."""

    def __init__(self, n_layers: int, n_expert: int, k: int):
        self.k = k
        self.picks = np.zeros((n_layers, n_expert), np.int64)
        self._last = np.zeros((n_layers, n_expert), bool)  # each layer's last one-token pass's experts
        self._followed = [False] * n_layers  # whether that pass is the one before
        self.repeated = self.followed = 0  # experts reused from the previous token, of those asked

    def add(self, layer: int, routed: list):
        """One pass's picks in a layer: ids [n, k] of each group of its tokens."""
        ids = np.concatenate([r.ravel() for r in routed]) if len(routed) > 1 else routed[0].ravel()
        self.picks[layer] += np.bincount(ids, minlength=self.picks.shape[1])
        if len(ids) != self.k:  # a batch between tokens: no pair
            self._followed[layer] = False
            return
        last = self._last[layer]  # the previous token's experts (distinct, as a token's are)
        if self._followed[layer]:
            self.repeated += int(np.count_nonzero(last[ids]))
            self.followed += len(ids)
        last[:] = False
        last[ids] = True
        self._followed[layer] = True

    def top_share(self, fraction: float = 0.1) -> float:
        """The share of a layer's picks taken by its hottest `fraction` of experts, averaged over
        layers (an even router's is about `fraction`)."""
        used = self.picks[self.picks.sum(axis=1) > 0]
        if not len(used):
            return 0.0
        top = max(1, int(round(fraction * used.shape[1])))
        ranked = -np.sort(-used, axis=1)
        return float(np.mean(ranked[:, :top].sum(axis=1) / ranked.sum(axis=1)))

    def telemetry(self) -> dict:
        return {
            "expert_repeat_rate": self.repeated / self.followed if self.followed else 0.0,
            "expert_top_decile_share": self.top_share(),
        }
