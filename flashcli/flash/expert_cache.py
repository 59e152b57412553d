"""The expert cache: per layer, slots holding whole experts (gate, up and down), filled by
O_DIRECT reads of whole experts and kept by recent use — the paper's windowed neuron cache at
the granularity of an expert (the router names exactly which experts a token needs: a predictor
without misses). The window is a fading one: an expert's uses count USE_DECAY less each pass
after them, and the slot whose expert counts least goes first (a hot expert outlives a moment
without use; the least recently used goes among equals). Layers whose experts have the same
types and shapes share their slots (expert_slots.ExpertPool), so the expert that goes may be
another layer's: a layer whose tokens spread over many experts holds more than one whose tokens
keep to a few (on the qwen3-30b-a3b shape's routing at 50%, 9.6% of a reply's experts were left
to read against 12.9% with each layer's slots its own: studies/moe_cache_policies.py).

A converted file lays each expert out as one record, gate, up and down side by side
(engine/expert_records.py): one read fills its slot, straight from the file, stored as ggml's
kernels read it. A GGUF's expert is three records, one in each stacked tensor [ne0, rows, E]:
slots of a type that ggml repacks live in a CPU_REPACK buffer, the record read into a staging
buffer and repacked into its slot by the thread that read it (ggml's tensor_set runs without the
GIL, beside the other reads); others are plain bytes laid out so that O_DIRECT lands in them. A
fetch's missing records are all read at once on the I/O pool, as many in flight as there are
staging buffers (expert_reads.py); a lone record is read by the fetching thread itself. The
caches never hold more than their pools' slots, and `hits`/`misses` count experts asked for.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from ..engine import ggml
from .expert_reads import ExpertStaging
from .expert_slots import KINDS, RECORD, RESERVED, ExpertPool, staged_bytes

# a use's weight a pass later (half after 23 passes). On the qwen3-30b-a3b shape's skewed routing
# at 50% (59 of 128 experts a layer) it left 12.7% of a 128-token reply's experts to read against
# 13.8% when only the last use counted (BENCHMARKS.md, "A fading window").
USE_DECAY = 0.97
WARM_WEIGHT = 1e-3  # a warm fill's weight (times its calibration share): below any use of the run


class ExpertCache:
    """One layer's experts in the slots of its pool (expert_slots.ExpertPool: its own, or one
    shared with layers of the same types and shapes). `fetch(experts, step)` makes every expert
    of the list resident and returns the slot of each; the expert of the pool whose uses count
    least (USE_DECAY), whatever its layer, goes first to make room, the least recently used among
    equals. Without a pool it makes its own of n_slots slots."""

    def __init__(self, gf, layer: int, n_slots: int, io_pool: ThreadPoolExecutor, staging: ExpertStaging, pool=None):
        self.infos = {k: gf.tensor(f"blk.{layer}.ffn_{k}_exps.weight") for k in KINDS}
        self.pool = pool or ExpertPool.of(gf, [layer], n_slots)
        self.row = self.pool.layers.index(layer)
        self.n_expert, self.n_slots, self.slots = self.pool.n_expert, self.pool.n_slots, self.pool.slots
        self._io, self._staging = io_pool, staging
        self.bytes_read = 0  # bytes transferred from the file, alignment slack included
        self.slot_of = self.pool.slot_of[self.row]  # this layer's rows of the pool's maps
        self.uses, self.counted_at = self.pool.uses[self.row], self.pool.counted_at[self.row]
        self.hits = self.misses = 0
        self.prefetched = 0  # experts read ahead of their layer (expert_ffn's pre-gating)

    def fetch(self, experts: np.ndarray, step: int, counted: bool = True) -> np.ndarray:
        """Slots [len(experts)] of the (distinct) experts, every one resident on return.
        counted=False: experts fetched already in this pass (no hits or misses)."""
        experts = np.asarray(experts, np.int64)
        if len(experts) > self.n_slots:
            raise ValueError(f"{len(experts)} experts at once in {self.n_slots} slots")
        missing = experts[self.slot_of[experts] < 0]
        if counted:
            self.hits += len(experts) - len(missing)
            self.misses += len(missing)
        if len(missing):
            self._make_resident(experts, missing, step)
        if counted:
            self.uses[experts] = self._weight(experts, step) + 1.0
            self.counted_at[experts] = step
        slots = self.slot_of[experts]
        self.pool.last_used[slots] = step
        return slots

    def prefetch(self, experts: np.ndarray, step: int, stop: threading.Event) -> int:
        """Reads ahead the experts not resident, in the order given (the likeliest first), until
        `stop` is set: reads started then finish, the rest are not started, and an expert is
        resident only where every kind of it was read. Returns how many became resident."""
        experts = np.asarray(experts, np.int64)[: self.n_slots]
        missing = experts[self.slot_of[experts] < 0]
        done = self._make_resident(experts, missing, step, stop) if len(missing) else missing
        self.prefetched += len(done)
        self.pool.last_used[self.slot_of[done]] = step
        return len(done)

    def _weight(self, experts: np.ndarray, step: int, rows=None) -> np.ndarray:
        """The experts' uses (of this layer, or of the pool's `rows`), faded to pass `step`."""
        rows = self.row if rows is None else rows
        age = (step - self.pool.counted_at[rows, experts]).astype(np.float64)
        return self.pool.uses[rows, experts] * USE_DECAY**age

    def _make_resident(self, experts: np.ndarray, missing: np.ndarray, step: int, stop: threading.Event | None = None):
        """Reads `missing` (of `experts`, the others resident and kept) into the pool's slots whose
        experts count least (empty ones first), whichever layer they are of; returns the experts
        read whole (all of them unless `stop` cut the reads short). Slots being read into are
        RESERVED: no other fetch takes them. A prefetch (`stop`, on its own thread while the
        layer before computes) takes no slot used in this pass."""
        pool = self.pool
        with pool.lock:
            wanted = np.zeros(self.n_slots, bool)
            wanted[self.slot_of[experts[self.slot_of[experts] >= 0]]] = True
            wanted |= pool.owner == RESERVED
            if stop is not None:
                wanted |= pool.last_used >= step
            free = np.flatnonzero(~wanted)
            held, rows = pool.expert_in[free], pool.owner[free]
            weight = np.where(held >= 0, self._weight(np.maximum(held, 0), step, np.maximum(rows, 0)), -1.0)
            victims = free[_least(weight, pool.last_used[free], len(missing))]
            if len(victims) < len(missing) and stop is None:
                raise RuntimeError(f"{len(missing)} experts to read, {len(victims)} slots free")
            missing = missing[: len(victims)]  # a prefetch may find fewer free slots than guesses
            old, old_row, old_used = pool.expert_in[victims], pool.owner[victims], pool.last_used[victims]
            held = old >= 0
            pool.slot_of[old_row[held], old[held]] = -1
            pool.expert_in[victims], pool.owner[victims] = -1, RESERVED  # a failed read leaves them empty
            pool.last_used[victims] = -1  # an empty slot is the first to be taken
        started = np.zeros(len(missing), np.int64)
        try:
            started = self._read(missing, victims, stop)
        finally:
            with pool.lock:
                whole = started == (1 if pool.records else len(self.infos))
                pool.owner[victims] = -1
                self.slot_of[missing[whole]] = victims[whole]
                pool.expert_in[victims[whole]], pool.owner[victims[whole]] = missing[whole], self.row
                kept = (started == 0) & held  # a stopped prefetch never touched these slots: they keep theirs
                pool.slot_of[old_row[kept], old[kept]] = victims[kept]
                pool.expert_in[victims[kept]], pool.owner[victims[kept]] = old[kept], old_row[kept]
                pool.last_used[victims[kept]] = old_used[kept]
        return missing[whole]

    def _read(self, experts: np.ndarray, slots: np.ndarray, stop: threading.Event | None = None) -> np.ndarray:
        """Every kind of each expert into its slot: all the records submitted at once, in file
        order (with `stop`: an expert after another, in the order given, none started once it is
        set), as many in flight as the staging has buffers (a lone record without `stop`: read
        here, no handoff to the pool); returns when all started are done,
        with how many records of each expert were read. A failed read raises here, after every
        read started has ended (none writes to a slot later)."""
        if self.pool.records:  # a converted file: an expert is one record, its gate first
            gate = self.infos["gate"]
            records = [
                (gate.offset + int(e) * gate.stride, RECORD, int(s), i) for i, (e, s) in enumerate(zip(experts, slots))
            ]
        else:
            records = [
                (info.offset + int(e) * info.expert_stride, kind, int(slot), i)
                for i, (e, slot) in enumerate(zip(experts, slots))
                for kind, info in self.infos.items()
            ]
        if stop is None:
            records.sort()
        if len(records) == 1 and stop is None:  # one read (a layer's lone miss): made here, without a handoff
            start, kind, slot, _ = records[0]
            self.bytes_read += self._fill(kind, slot, start, self._staging.take(), threading.Event())
            return np.ones(1, np.int64)
        futures, failed, submitted = [], threading.Event(), np.zeros(len(experts), np.int64)
        for start, kind, slot, i in records:
            buffer = self._staging.take()  # blocks while IN_FLIGHT reads run
            if failed.is_set() or (stop is not None and stop.is_set()):
                self._staging.give(buffer)
                break  # a read failed, or the prefetch was stopped: start no more
            try:
                futures.append(self._io.submit(self._fill, kind, slot, start, buffer, failed))
            except BaseException:  # the pool refused it (shut down): the buffer is not in use
                self._staging.give(buffer)
                wait(futures)
                raise
            submitted[i] += 1
        wait(futures)
        for f in futures:
            if f.exception() is not None:
                raise f.exception()
        self.bytes_read += sum(f.result() for f in futures)
        return submitted

    def _fill(self, kind: str, slot: int, start: int, buffer: np.ndarray, failed: threading.Event) -> int:
        try:
            return self.slots[kind].fill(slot, self._staging, start, buffer)
        except BaseException:
            failed.set()
            raise
        finally:
            self._staging.give(buffer)

    def tensors(self, g: ggml.Graph) -> dict:
        return self.pool.tensors(g)

    def close(self):
        self.pool.close()  # a shared pool's other caches find it closed: they close with it


def _least(weight: np.ndarray, last_used: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k least by weight, then last use, then position (np.lexsort's first k),
    sorting only those whose weight is at most the k-th least (a layer misses an expert or two
    of a pool of thousands)."""
    if k < len(weight):
        near = np.flatnonzero(weight <= np.partition(weight, k - 1)[k - 1])
        return near[np.lexsort((last_used[near], weight[near]))][:k]
    return np.lexsort((last_used, weight))[:k]


def staging_for(gf, layers) -> ExpertStaging:
    """Staging for the expert caches of these layers of the file (expert_slots.staged_bytes)."""
    return ExpertStaging(gf.path, max(staged_bytes(gf, i) for i in layers))


def fill_hottest(caches: list, pools: list, picks: np.ndarray) -> int:
    """Fills each pool's slots with the experts its layers' routers picked most on calibration
    text (picks [n_layers, n_expert], ranked by share of the layer's picks; none that it never
    picked), so that a reply's first tokens find them. Each weighs WARM_WEIGHT times its share:
    below any use of the run, whose own experts displace them first (weighted at their
    calibrated rate they outstayed the run's: BENCHMARKS.md, "slots filled from calibration").
    Returns how many experts it read."""
    read = 0
    for pool in pools:
        rows = picks[pool.layers].astype(np.float64)
        share = rows / np.maximum(rows.sum(axis=1, keepdims=True), 1.0)
        hottest = np.argsort(-share, axis=None, kind="stable")[: pool.n_slots]
        hottest = hottest[share.ravel()[hottest] > 0]
        row_of, expert_of = np.unravel_index(hottest, share.shape)
        for row, layer in enumerate(pool.layers):
            experts = np.sort(expert_of[row_of == row])
            if len(experts):
                caches[layer].fetch(experts, 0, counted=False)
                caches[layer].uses[experts] = WARM_WEIGHT * share[row, experts]
                read += len(experts)
    return read
