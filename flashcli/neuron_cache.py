"""The per-layer neuron cache: recently used FFN neurons kept in DRAM (the paper's technique 4).

Each layer owns three preallocated matrices, one row per slot: gate rows, up rows and down
columns, in their stored (quantized) form, so ggml computes straight on rows [0, n_used).
Nothing is reallocated or copied whole per token:
- deleting a neuron moves the last occupied row into its slot (one row copy per part);
- new neurons are appended after the last occupied row.
Eviction keeps the neurons used by the last `window` tokens; when the capacity cannot hold the
window, the least recently used neurons outside the current token's set go first.
"""

from __future__ import annotations

import numpy as np


class NeuronCache:
    def __init__(self, n_neurons: int, capacity: int, part_bytes: tuple[int, int, int], window: int,
                 row_pad: int = 1):
        if capacity < 1:
            raise ValueError("a neuron cache needs at least one slot")
        self.n_neurons = n_neurons
        self.capacity = min(capacity, n_neurons)
        self.window = max(1, window)
        gate_b, up_b, down_b = part_bytes
        rows = -(-self.capacity // row_pad) * row_pad  # zero rows past capacity let ggml work in groups
        self.gate = np.zeros((rows, gate_b), np.uint8)
        self.up = np.zeros((rows, up_b), np.uint8)
        self.down = np.zeros((rows, down_b), np.uint8)
        self.slot_of = np.full(n_neurons, -1, np.int64)  # neuron -> slot, -1 when absent
        self.neuron_of = np.full(self.capacity, -1, np.int64)  # slot -> neuron
        self.last_used = np.full(self.capacity, -(1 << 62), np.int64)  # slot -> token step
        self.n_used = 0
        self.pinned = 0  # slots [0, pinned) never move nor leave (the "hybrid" ablation)
        self.hits = self.misses = self.evictions = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.gate, self.up, self.down, self.slot_of, self.neuron_of, self.last_used))

    @property
    def slot_bytes(self) -> int:
        return self.gate.shape[1] + self.up.shape[1] + self.down.shape[1]

    def contains(self, ids: np.ndarray) -> np.ndarray:
        return self.slot_of[ids] >= 0

    def admit(self, wanted: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Marks the cached neurons of `wanted` as used at `step` and makes room for the others.

        Returns (to_insert, overflow), both ascending: the missing neurons that fit in the cache
        once room is made, and those that do not (the caller reads and uses them just once).
        """
        wanted = np.asarray(wanted, np.int64)
        if len(wanted) > 1 and not (np.diff(wanted) > 0).all():  # predictors give sorted ids already
            wanted = np.unique(wanted)
        slots = self.slot_of[wanted]
        present = slots >= 0
        self.last_used[slots[present]] = step
        missing = wanted[~present]
        self.hits += int(present.sum())
        self.misses += len(missing)
        free = self.capacity - self.n_used
        if len(missing) > free:
            self._evict(len(missing) - free, step)
            free = self.capacity - self.n_used
        return missing[:free], missing[free:]

    def insert(self, ids: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray, step: int):
        """Appends neurons `ids` (not cached, fitting the free capacity) with their rows."""
        n = len(ids)
        s = slice(self.n_used, self.n_used + n)
        if s.stop > self.capacity:
            raise ValueError("insert beyond the cache capacity: call admit first")
        self.gate[s], self.up[s], self.down[s] = gate, up, down
        self.neuron_of[s] = ids
        self.slot_of[ids] = np.arange(s.start, s.stop)
        self.last_used[s] = step
        self.n_used += n

    def pin_all(self):
        """Makes every occupied slot permanent."""
        self.pinned = self.n_used

    def evict_all_unpinned(self):
        """Empties the cache but for pinned slots (the naive and hybrid ablations)."""
        self._delete(np.arange(self.pinned, self.n_used))

    def evict_outside_window(self, step: int):
        """Drops neurons not used within the window ending at `step` (called once per token)."""
        used = self.last_used[self.pinned : self.n_used]
        stale = np.nonzero(used <= step - self.window)[0] + self.pinned
        self._delete(stale)

    def _evict(self, n: int, step: int):
        """Frees n slots: least recently used first, never a neuron used at `step`."""
        used = self.last_used[self.pinned : self.n_used]
        candidates = np.nonzero(used < step)[0]
        order = candidates[np.argsort(used[candidates], kind="stable")][:n] + self.pinned
        self._delete(order)

    def _delete(self, slots: np.ndarray):
        """Deletes slots by moving the last occupied rows into the holes they leave."""
        slots = np.unique(np.asarray(slots, np.int64))
        if len(slots) == 0:
            return
        new_n = self.n_used - len(slots)
        holes = slots[slots < new_n]  # freed slots below the new end get filled...
        tail = np.arange(new_n, self.n_used)
        movers = tail[~np.isin(tail, slots)]  # ...by the surviving rows beyond it
        self.slot_of[self.neuron_of[slots]] = -1
        for m in (self.gate, self.up, self.down):
            m[holes] = m[movers]
        self.neuron_of[holes] = self.neuron_of[movers]
        self.last_used[holes] = self.last_used[movers]
        self.slot_of[self.neuron_of[holes]] = holes
        self.neuron_of[new_n : self.n_used] = -1
        self.n_used = new_n
        self.evictions += len(slots)
