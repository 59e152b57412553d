"""The per-layer neuron cache: recently used FFN neurons kept in DRAM (the paper's technique 4).

Each layer owns three preallocated matrices of `capacity` rows: gate rows, up rows and down
columns, in their stored (quantized) form, each contiguous so that ggml computes on them as
they are. The FFN runs over every slot, with a per-token mask that keeps only the neurons that
token wants, so slots never move: a neuron keeps its slot until evicted, a new one takes a
free or evicted slot. Nothing is reallocated or compacted per token.
Eviction keeps the neurons used by the last `window` tokens; when the capacity cannot hold the
window, the least recently used neurons outside the current tokens' sets go first.
"""

from __future__ import annotations

import numpy as np


class NeuronCache:
    def __init__(self, n_neurons: int, capacity: int, part_bytes: tuple, window: int, row_pad: int = 1):
        if capacity < 1:
            raise ValueError("a neuron cache needs at least one slot")
        self.n_neurons = n_neurons
        self.capacity = -(-min(capacity, n_neurons) // row_pad) * row_pad
        self.window = max(1, window)
        self.parts = tuple(np.zeros((self.capacity, b), np.uint8) for b in part_bytes)  # gate, up, down
        self.slot_of = np.full(n_neurons, -1, np.int64)  # neuron -> slot, -1 when absent
        self.neuron_of = np.full(self.capacity, -1, np.int64)  # slot -> neuron, -1 when free
        self.last_used = np.full(self.capacity, -(1 << 62), np.int64)  # slot -> token step
        self.pinned = np.zeros(self.capacity, bool)  # never evicted (the "hybrid" ablation)
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.parts, self.slot_of, self.neuron_of, self.last_used, self.pinned))

    @property
    def n_used(self) -> int:
        return int((self.neuron_of >= 0).sum())

    def admit(self, wanted: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Marks the cached neurons of `wanted` (ascending ids) as used at `step` and finds slots
        for the others. Returns (to_insert, their slots, overflow): the missing neurons that get
        a slot (free, or evicted: least recently used first, never one in `wanted`), and those
        that do not fit (the caller reads and uses them just once)."""
        wanted = np.asarray(wanted, np.int64)
        slots = self.slot_of[wanted]
        present = slots >= 0
        self.last_used[slots[present]] = step
        missing = wanted[~present]
        self.hits += int(present.sum())
        self.misses += len(missing)
        free = np.flatnonzero(self.neuron_of < 0)
        if len(missing) > len(free):
            evictable = np.flatnonzero((self.neuron_of >= 0) & ~self.pinned & (self.last_used < step))
            victims = evictable[np.argsort(self.last_used[evictable], kind="stable")][: len(missing) - len(free)]
            self._evict(victims)
            free = np.concatenate([free, victims])
        n = min(len(missing), len(free))
        return missing[:n], free[:n], missing[n:]

    def insert(self, ids: np.ndarray, slots: np.ndarray, parts: tuple, step: int):
        """Puts neurons `ids` (from admit) with their rows (gate, up, down: [n, bytes] each)
        into `slots`."""
        if len(ids) == 0:
            return
        if (self.neuron_of[slots] >= 0).any():
            raise ValueError("insert into an occupied slot: call admit first")
        for mine, theirs in zip(self.parts, parts):
            mine[slots] = theirs
        self.neuron_of[slots] = ids
        self.slot_of[ids] = slots
        self.last_used[slots] = step

    def mask(self, wanted_per_token: list) -> np.ndarray:
        """float32 [n_tokens, capacity]: 1 where the slot holds a neuron that token wants."""
        out = np.zeros((len(wanted_per_token), self.capacity), np.float32)
        for t, wanted in enumerate(wanted_per_token):
            slots = self.slot_of[wanted]
            out[t, slots[slots >= 0]] = 1.0
        return out

    def pin_all(self):
        """Makes every occupied slot permanent."""
        self.pinned |= self.neuron_of >= 0

    def evict_all_unpinned(self):
        """Empties the cache but for pinned slots (the naive and hybrid ablations)."""
        self._evict(np.flatnonzero((self.neuron_of >= 0) & ~self.pinned))

    def evict_outside_window(self, step: int):
        """Drops neurons not used within the window ending at `step` (called once per token)."""
        self._evict(np.flatnonzero((self.neuron_of >= 0) & ~self.pinned & (self.last_used <= step - self.window)))

    def _evict(self, slots: np.ndarray):
        if len(slots) == 0:
            return
        self.slot_of[self.neuron_of[slots]] = -1
        self.neuron_of[slots] = -1
