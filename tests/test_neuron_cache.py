"""The neuron cache: slot moves, capacity, window and LRU eviction, pinning."""

from __future__ import annotations

import numpy as np
import pytest

from flashcli.neuron_cache import NeuronCache


def rows(ids, width=4):
    """Row content that encodes the neuron id, so a misplaced row is visible."""
    ids = np.asarray(ids)
    return np.repeat(ids[:, None] % 251, width, axis=1).astype(np.uint8)


def check_consistent(c: NeuronCache):
    used = c.neuron_of[: c.n_used]
    assert (used >= 0).all() and len(set(used.tolist())) == c.n_used
    assert (c.slot_of[used] == np.arange(c.n_used)).all()
    assert (c.slot_of >= 0).sum() == c.n_used
    assert (c.neuron_of[c.n_used :] == -1).all()
    for m in (c.gate, c.up, c.down):
        assert (m[: c.n_used] == rows(used, m.shape[1])).all()


def fill(c, ids, step):
    ins, over = c.admit(np.asarray(ids), step)
    c.insert(ins, rows(ins, 4), rows(ins, 4), rows(ins, 4), step)
    return ins, over


def test_admit_insert_hits_and_misses():
    c = NeuronCache(100, 10, (4, 4, 4), window=1 << 40)
    ins, over = fill(c, [5, 1, 9], 0)
    assert ins.tolist() == [1, 5, 9] and len(over) == 0
    ins, over = fill(c, [1, 2, 9], 1)
    assert ins.tolist() == [2] and c.hits == 2 and c.misses == 4
    check_consistent(c)


def test_deleting_moves_last_rows_into_holes_and_never_reallocates():
    c = NeuronCache(100, 8, (4, 4, 4), window=2)
    gate_buffer = c.gate.ctypes.data
    fill(c, [0, 1, 2, 3], 0)
    fill(c, [10, 11, 12, 13], 1)
    c.last_used[:] = [0, 2, 0, 2, 2, 2, 0, 2]  # neurons 0, 2, 12 stale at step 2 with window 2
    c.evict_outside_window(2)
    assert sorted(c.neuron_of[: c.n_used].tolist()) == [1, 3, 10, 11, 13]
    # holes below the new end were filled by the surviving tail rows, order otherwise kept
    assert c.neuron_of[: c.n_used].tolist() == [11, 1, 13, 3, 10]
    check_consistent(c)
    assert c.gate.ctypes.data == gate_buffer


def test_capacity_lru_and_overflow():
    c = NeuronCache(100, 4, (4, 4, 4), window=1 << 40)
    fill(c, [0, 1], 0)
    fill(c, [2, 3], 1)
    # 4 wanted, 2 cached (2, 3 used now); LRU evicts 0 and 1 first; nothing used at step 2 leaves
    ins, over = fill(c, [2, 3, 50, 51, 52], 2)
    assert ins.tolist() == [50, 51] and over.tolist() == [52]
    assert sorted(c.neuron_of[: c.n_used].tolist()) == [2, 3, 50, 51]
    assert c.n_used == c.capacity
    check_consistent(c)


def test_window_keeps_recent_tokens_only():
    c = NeuronCache(100, 50, (4, 4, 4), window=3)
    for step in range(6):
        fill(c, [step * 10, step * 10 + 1], step)
        c.evict_outside_window(step)
        assert sorted(c.neuron_of[: c.n_used].tolist()) == sorted(
            n for s in range(max(0, step - 2), step + 1) for n in (s * 10, s * 10 + 1))
    check_consistent(c)


def test_pinned_slots_survive():
    c = NeuronCache(100, 6, (4, 4, 4), window=1)
    fill(c, [7, 8, 9], 0)
    c.pin_all()
    fill(c, [20, 21, 22], 1)
    c.evict_all_unpinned()
    assert c.neuron_of[: c.n_used].tolist() == [7, 8, 9]
    ins, over = fill(c, [30, 31, 32, 33], 5)
    assert len(ins) == 3 and len(over) == 1  # pinned slots are never evicted
    check_consistent(c)


def test_nbytes_is_honest():
    c = NeuronCache(1000, 100, (10, 20, 30), window=1, row_pad=8)
    arrays = (c.gate, c.up, c.down, c.slot_of, c.neuron_of, c.last_used)
    assert c.nbytes == sum(a.nbytes for a in arrays)
    assert c.gate.shape == (104, 10)
    with pytest.raises(ValueError):
        c.insert(np.arange(101), rows(range(101), 10), rows(range(101), 20), rows(range(101), 30), 0)
