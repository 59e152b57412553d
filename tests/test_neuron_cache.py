"""The neuron cache: slots stay put, capacity, window and LRU eviction, pinning, per-token masks."""

from __future__ import annotations

import numpy as np
import pytest

from flashcli.flash.neuron_cache import NeuronCache

PARTS = (4, 6, 2)


def rows(ids, width):
    """Row content that encodes the neuron id, so a misplaced row is visible."""
    ids = np.asarray(ids)
    return np.repeat(ids[:, None] % 251, width, axis=1).astype(np.uint8)


def parts(ids):
    return tuple(rows(ids, w) for w in PARTS)


def check_consistent(c: NeuronCache):
    used = np.flatnonzero(c.neuron_of >= 0)
    neurons = c.neuron_of[used]
    assert len(set(neurons.tolist())) == len(neurons)
    assert (c.slot_of[neurons] == used).all()
    assert (c.slot_of >= 0).sum() == len(used) == c.n_used
    for part, width in zip(c.parts, PARTS):
        assert (part[used] == rows(neurons, width)).all()


def fill(c, ids, step):
    ins, slots, over = c.admit(np.sort(np.asarray(ids)), step)
    c.insert(ins, slots, parts(ins), step)
    return ins, over


def test_admit_insert_hits_and_misses():
    c = NeuronCache(100, 10, PARTS, window=1 << 40)
    ins, over = fill(c, [5, 1, 9], 0)
    assert ins.tolist() == [1, 5, 9] and len(over) == 0
    ins, over = fill(c, [1, 2, 9], 1)
    assert ins.tolist() == [2] and c.hits == 2 and c.misses == 4
    check_consistent(c)


def test_slots_never_move_and_nothing_is_reallocated():
    c = NeuronCache(100, 8, PARTS, window=2)
    buffers = [p.ctypes.data for p in c.parts]
    fill(c, [0, 1, 2, 3], 0)
    where = c.slot_of[[0, 1, 2, 3]].copy()
    fill(c, [10, 11, 12, 13], 1)
    c.evict_outside_window(2)  # neurons of step 0 leave; those of step 1 keep their slots
    assert sorted(c.neuron_of[c.neuron_of >= 0].tolist()) == [10, 11, 12, 13]
    fill(c, [1, 20], 2)
    assert [p.ctypes.data for p in c.parts] == buffers
    assert set(c.slot_of[[1, 20]].tolist()) <= set(where.tolist())  # took the freed slots
    check_consistent(c)


def test_lru_evicts_oldest_and_never_a_wanted_neuron():
    c = NeuronCache(100, 4, PARTS, window=1 << 40)
    fill(c, [1, 2], 0)
    fill(c, [3, 4], 1)
    ins, over = fill(c, [2, 5], 2)  # full: 1 (step 0) goes, 2 is wanted now and stays
    assert ins.tolist() == [5] and len(over) == 0
    assert c.slot_of[1] == -1 and c.slot_of[2] >= 0
    ins, over = fill(c, [6, 7, 8, 9, 10], 3)  # wants more than the capacity
    assert len(ins) == 4 and over.tolist() == [10]
    check_consistent(c)


def test_mask_marks_each_tokens_own_neurons():
    c = NeuronCache(50, 8, PARTS, window=1 << 40)
    fill(c, [3, 4, 7, 9], 0)
    m = c.mask([np.array([3, 9]), np.array([4, 7, 40])])  # 40 is not cached: no slot to mark
    assert m.shape == (2, c.capacity) and m.sum() == 4
    assert m[0, c.slot_of[3]] == m[0, c.slot_of[9]] == 1 and m[0, c.slot_of[4]] == 0
    assert m[1, c.slot_of[4]] == m[1, c.slot_of[7]] == 1


def test_pinned_neurons_survive_everything():
    c = NeuronCache(100, 6, PARTS, window=1)
    fill(c, [1, 2, 3], 0)
    c.pin_all()
    c.evict_all_unpinned()
    c.evict_outside_window(10)
    fill(c, [50, 51, 52, 53], 11)  # only the three unpinned slots are free
    assert all(c.slot_of[x] >= 0 for x in (1, 2, 3))
    check_consistent(c)


def test_capacity_is_rounded_up_to_the_row_pad_and_bounded():
    assert NeuronCache(100, 10, PARTS, window=1, row_pad=8).capacity == 16
    assert NeuronCache(12, 50, PARTS, window=1, row_pad=8).capacity == 16
    with pytest.raises(ValueError):
        NeuronCache(100, 0, PARTS, window=1)


def test_insert_into_an_occupied_slot_is_refused():
    c = NeuronCache(10, 4, PARTS, window=1 << 40)
    fill(c, [1], 0)
    with pytest.raises(ValueError):
        c.insert(np.array([2]), np.array([c.slot_of[1]]), parts([2]), 1)
