"""Experts read into an expert cache's slots (flash/expert_cache.py, flash/expert_reads.py):
more records at once than the reads in flight, every kind, plain slots (read straight in, or
through a staging buffer where O_DIRECT cannot land in them) and repacked ones (read into a
staging buffer and repacked by ggml), each against the file's own bytes read here with plain
Python; a failed read surfaces from fetch and leaves no slot marked as holding its expert."""

from __future__ import annotations

import ctypes
import errno
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from converters.model_maker import SHAPES
from flashcli.engine.config import ModelConfig
from flashcli.engine.gguf_file import GGUFFile
from flashcli.engine.repack import repack_rows
from flashcli.flash import expert_reads
from flashcli.flash.expert_cache import ExpertCache, staging_for
from flashcli.flash.expert_reads import IN_FLIGHT, ExpertStaging
from flashcli.flash.expert_slots import KINDS, SlotPopulator


def file_bytes(path, start: int, length: int) -> np.ndarray:
    with open(path, "rb") as f:
        f.seek(start)
        return np.frombuffer(f.read(length), np.uint8)


def slot_bytes(slots, slot: int) -> np.ndarray:
    """What a slot holds: plain bytes, or ggml's repacked buffer's bytes at the slot."""
    if not slots.repacked:
        return slots.plain[slot].copy()
    at = int(slots.tensor.contents.data) + int(slot) * slots.expert_bytes
    return np.frombuffer(ctypes.string_at(at, slots.expert_bytes), np.uint8)


def expected(path, slots, expert: int) -> np.ndarray:
    """The expert's bytes in the file, repacked as ggml repacks them where its slots are repacked."""
    info = slots.info
    raw = file_bytes(path, info.offset + expert * slots.expert_bytes, slots.expert_bytes)
    return repack_rows(info.ggml_type, raw.reshape(info.ne[1], -1)).ravel() if slots.repacked else raw


def caches(path, layers, n_slots=None, threads=4):
    gf = GGUFFile(path)
    cfg = ModelConfig.from_gguf(gf)
    io, staging = ThreadPoolExecutor(threads), staging_for(gf, layers)
    made = [ExpertCache(gf, i, n_slots or cfg.n_expert, io, staging) for i in layers]
    return made, io, staging


def close(made, io, staging):
    for c in made:
        c.close()
    io.shutdown(wait=True)
    staging.close()


def resident_pages(address: int, size: int) -> np.ndarray:
    """mincore's answer for each page of [address, address + size): 1 where it is in memory."""
    page = 4096
    lo, hi = address // page * page, -(-(address + size) // page) * page
    vec = (ctypes.c_ubyte * ((hi - lo) // page))()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    assert libc.mincore(lo, hi - lo, vec) == 0, ctypes.get_errno()
    return np.frombuffer(vec, np.uint8) & 1


@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q8_0"])
def test_the_populator_maps_every_slot_in_and_changes_no_slots_bytes(made, file_type):
    """Slots filled before it runs keep their experts' bytes; afterwards every page of every
    slot, filled or not, is in memory (the kernel's mincore says so)."""
    path = made("tiny-qwen3moe", file_type)
    n_expert = SHAPES["tiny-qwen3moe"].n_expert
    made_caches, io, staging = caches(path, range(SHAPES["tiny-qwen3moe"].n_layers), n_slots=n_expert)
    try:
        filled = np.arange(0, n_expert, 3)
        for cache in made_caches:
            cache.fetch(filled, 0)
        populator = SlotPopulator([c.pool for c in made_caches])
        populator.wait()
        for cache in made_caches:
            for address, size in cache.pool.extents(0, cache.n_slots):
                assert resident_pages(address, size).all()
            for kind in KINDS:
                for e in filled:
                    np.testing.assert_array_equal(
                        slot_bytes(cache.slots[kind], cache.slot_of[e]), expected(path, cache.slots[kind], e)
                    )
        populator.close()
    finally:
        close(made_caches, io, staging)


@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q8_0"])
def test_a_fetch_of_more_experts_than_reads_in_flight_fills_every_slot_exactly(made, file_type):
    """Every expert of each layer at once (16 experts, 3 kinds: 48 records, IN_FLIGHT at a
    time), in a shuffled order, then a second fetch evicting half of them into reused slots:
    every slot holds its expert's bytes (repacked ones as ggml repacks them). The Q4_K_M file
    has repacked kinds (on CPUs that repack Q4_K) and Q6_K ones whose records are not block
    multiples (read through staging); Q8_0's are (read straight into their slots)."""
    path = made("tiny-qwen3moe", file_type)
    n_expert = SHAPES["tiny-qwen3moe"].n_expert
    assert 3 * n_expert > IN_FLIGHT
    made_caches, io, staging = caches(path, range(SHAPES["tiny-qwen3moe"].n_layers))
    try:
        rng = np.random.default_rng(1)
        for cache in made_caches:
            experts = rng.permutation(n_expert)
            slots = cache.fetch(experts, 0)
            for kind in KINDS:
                for e, s in zip(experts, slots):
                    np.testing.assert_array_equal(
                        slot_bytes(cache.slots[kind], s), expected(path, cache.slots[kind], e)
                    )
            assert cache.bytes_read >= n_expert * sum(s.expert_bytes for s in cache.slots.values())
        kinds = {(s.repacked, s.expert_bytes % 4096 == 0) for c in made_caches for s in c.slots.values()}
        print(file_type, "kinds (repacked, block multiple):", sorted(kinds))
    finally:
        close(made_caches, io, staging)
    # fewer slots than experts: the least recently used go, their slots take new experts
    (cache,), io, staging = caches(path, [0], n_slots=10)
    try:
        cache.fetch(np.arange(10), 0)
        later = np.arange(6, 16)
        slots = cache.fetch(later, 1)
        assert cache.misses == 16
        for kind in KINDS:
            for e, s in zip(later, slots):
                np.testing.assert_array_equal(slot_bytes(cache.slots[kind], s), expected(path, cache.slots[kind], e))
    finally:
        close([cache], io, staging)


def test_a_failed_read_raises_from_fetch_and_marks_nothing_it_touched_resident(made, monkeypatch):
    """One record's read fails (EIO): fetch raises it (within a timeout: no hang), the experts
    not read whole are not resident, and no slot claims an expert; fetching again reads them
    right."""
    path = made("tiny-qwen3moe", "Q4_K_M")
    (cache,), io, staging = caches(path, [1])
    down = cache.slots["down"]
    bad = down.info.offset + 5 * down.expert_bytes  # expert 5's down record
    real = expert_reads.read_fully

    def failing(fd, view, start, file_size, direct=True, calls=None):
        if start <= bad + 100 < start + len(view):
            raise OSError(errno.EIO, "injected read error")
        return real(fd, view, start, file_size, direct, calls)

    try:
        cache.fetch(np.array([0, 1]), 0)
        monkeypatch.setattr(expert_reads, "read_fully", failing)
        with ThreadPoolExecutor(1) as caller, pytest.raises(OSError, match="injected"):
            caller.submit(cache.fetch, np.arange(2, 12), 1).result(timeout=60)
        assert cache.slot_of[5] == -1 and 5 not in cache.pool.expert_in
        resident = np.flatnonzero(cache.slot_of >= 0)
        assert all(cache.pool.expert_in[cache.slot_of[e]] == e for e in resident)
        assert set(resident.tolist()) <= set(range(12)) - {5}
        monkeypatch.setattr(expert_reads, "read_fully", real)
        slots = cache.fetch(np.arange(2, 12), 2)
        for kind in KINDS:
            for e, s in zip(range(2, 12), slots):
                np.testing.assert_array_equal(slot_bytes(cache.slots[kind], s), expected(path, cache.slots[kind], e))
    finally:
        close([cache], io, staging)


def test_a_prefetch_reads_experts_whole_in_its_order_until_stopped(made, monkeypatch):
    """ExpertCache.prefetch (pre-gating's reads ahead): not stopped, every guess is read and
    resident with its bytes, counted as prefetched, not as a hit or a miss; stopped while the
    4th guess is being read, the reads started finish, no more start, and what is resident is
    whole experts, a prefix of the guesses' order; stopped before, nothing is read and no
    resident expert is evicted for the guesses. The experts left out are read by the next
    fetch, right."""
    path = made("tiny-qwen3moe", "Q4_K_M")
    n_expert = SHAPES["tiny-qwen3moe"].n_expert
    order = np.random.default_rng(3).permutation(n_expert)
    (cache,), io, staging = caches(path, [0])

    def assert_holds(experts):
        for kind in KINDS:
            for e in experts:
                slot = cache.slot_of[e]
                assert slot >= 0 and cache.pool.expert_in[slot] == e
                np.testing.assert_array_equal(slot_bytes(cache.slots[kind], slot), expected(path, cache.slots[kind], e))

    try:
        assert cache.prefetch(order[:6], 0, threading.Event()) == 6
        assert_holds(order[:6])
        assert (cache.prefetched, cache.hits, cache.misses) == (6, 0, 0)
    finally:
        close([cache], io, staging)

    (cache,), io, staging = caches(path, [0])
    stop, fill = threading.Event(), cache._fill
    fourth = cache.infos[KINDS[0]].offset + int(order[3]) * cache.slots[KINDS[0]].expert_bytes

    def stopping(kind, slot, start, buffer, failed):  # the 4th guess's first record starts
        if start == fourth:
            stop.set()
        return fill(kind, slot, start, buffer, failed)

    try:
        monkeypatch.setattr(cache, "_fill", stopping)
        read = cache.prefetch(order, 0, stop)
        monkeypatch.setattr(cache, "_fill", fill)
        assert 3 <= read < n_expert
        resident = set(np.flatnonzero(cache.slot_of >= 0).tolist())
        assert resident == set(order[:read].tolist())
        assert_holds(order[:read])
        assert cache.prefetch(order, 1, stop) == 0  # stopped already: nothing starts
        assert set(np.flatnonzero(cache.slot_of >= 0).tolist()) == resident
        cache.fetch(order, 2)
        assert (cache.hits, cache.misses) == (read, n_expert - read)
        assert_holds(order)
    finally:
        close([cache], io, staging)
    # fewer slots than guesses, all full: a prefetch stopped before it starts evicts nothing
    (cache,), io, staging = caches(path, [0], n_slots=8)
    try:
        cache.fetch(order[:8], 0)
        stopped = threading.Event()
        stopped.set()
        assert cache.prefetch(order[8:], 1, stopped) == 0
        assert_holds(order[:8])
        cache.fetch(order[:8], 2)
        assert (cache.hits, cache.misses) == (8, 8)  # the first 8 missed once, then all were there
    finally:
        close([cache], io, staging)


@pytest.mark.parametrize("direct", [True, False])
def test_read_into_gives_the_files_bytes_at_any_offset_and_address(tmp_path, direct):
    """Byte ranges starting and ending on and off blocks, into memory whose address lets O_DIRECT
    land in it or not (then through the staging buffer); buffered reads where O_DIRECT is refused."""
    data = np.random.default_rng(0).integers(0, 256, 5 * 65536 + 123, np.uint8)
    path = tmp_path / "records.bin"
    data.tofile(path)
    staging = ExpertStaging(path, 3 * 4096 + 7)
    try:
        if not direct:
            with pytest.warns(UserWarning, match="buffered"):
                staging._use_buffered(OSError(errno.EINVAL, "test"))
        a = staging.alignment
        memory = np.zeros(8 * 4096 + 4 * a, np.uint8)
        base = (-memory.ctypes.data) % 4096  # memory[base] is page aligned
        for start in (0, a, a + 1, 3 * a - 5, len(data) - 3 * 4096 - 7):
            for length in (1, a - 1, a, 2 * a + 3, 3 * 4096 + 7):
                # an address congruent to start (O_DIRECT lands in it), one off, a page's start
                for at in (base + a + start % a, base + a + (start + 1) % a, base):
                    dest = memory[at : at + length]
                    buffer = staging.take()
                    n = staging.read_into(dest, start, buffer)
                    staging.give(buffer)
                    np.testing.assert_array_equal(dest, data[start : start + length])
                    assert n >= length
    finally:
        staging.close()


@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q8_0"])
def test_a_converted_files_expert_is_one_read_and_its_slot_holds_every_kind(made, file_type, tmp_path):
    """A converted file lays each expert's gate, up and down out as one record: a fetch of n
    missing experts makes n reads of a record each (no more bytes), and each kind's slot, as the
    graph reads it (its tensor, a record apart), holds the source GGUF's bytes of that expert,
    repacked where ggml repacks them here."""
    from converters.convert import convert
    from flashcli.engine.expert_records import records_name, stacked_name

    source = made("tiny-qwen3moe", file_type)
    flash = convert(source, tmp_path / "moe.flash.gguf").output
    gf, src = GGUFFile(flash), GGUFFile(source)
    assert gf.has(records_name(0)) and stacked_name(0, "gate") not in gf.tensors
    n_layers, n_expert = SHAPES["tiny-qwen3moe"].n_layers, SHAPES["tiny-qwen3moe"].n_expert
    made_caches, io, staging = caches(flash, range(n_layers), n_slots=n_expert // 2)
    reads = []
    real = staging.read_into
    staging.read_into = lambda dest, start, buffer: reads.append((start, len(dest))) or real(dest, start, buffer)
    try:
        wanted = np.array([5, 1, 12, 7, 3])
        for cache in made_caches:
            reads.clear()
            cache.fetch(wanted, 0)
            record = gf.tensor(stacked_name(cache.pool.layers[cache.row], "gate")).stride
            assert sorted(reads) == sorted(
                (gf.tensor(records_name(cache.pool.layers[cache.row])).offset + int(e) * record, record) for e in wanted
            )
            tensors = cache.tensors(None)
            for kind in KINDS:
                t, info = tensors[kind], src.tensor(stacked_name(cache.pool.layers[cache.row], kind))
                size = info.nbytes // n_expert
                assert t.contents.nb[2] == record
                for e in wanted:
                    plain = file_bytes(source, info.offset + int(e) * size, size)
                    want = (
                        repack_rows(info.ggml_type, plain.reshape(info.ne[1], -1)).ravel()
                        if t.contents.extra
                        else plain
                    )
                    at = int(t.contents.data) + int(cache.slot_of[e]) * record
                    np.testing.assert_array_equal(np.frombuffer(ctypes.string_at(at, size), np.uint8), want)
            assert cache.bytes_read == len(wanted) * record  # the records, nothing around them
    finally:
        close(made_caches, io, staging)


def test_a_lone_missing_record_is_read_by_the_fetch_itself_and_a_failure_leaves_it_out(made, tmp_path, monkeypatch):
    """A converted file's fetch missing one expert reads its record on the calling thread (no
    I/O pool thread): its slot holds the record's bytes; a failed lone read raises from fetch and
    leaves the expert not resident; the next fetch reads it right."""
    from converters.convert import convert
    from flashcli.engine.expert_records import records_name

    flash = convert(made("tiny-qwen3moe", "Q4_K_M"), tmp_path / "moe.flash.gguf").output
    (cache,), io, staging = caches(flash, [1], n_slots=8)
    record = GGUFFile(flash).tensor(records_name(1))
    stride = cache.infos["gate"].stride
    threads, real = [], staging.read_into

    def watched(dest, start, buffer):
        threads.append(threading.current_thread())
        return real(dest, start, buffer)

    staging.read_into = watched
    try:
        cache.fetch(np.array([0, 1, 2]), 0)
        threads.clear()
        slot = cache.fetch(np.array([9]), 1)[0]
        assert threads == [threading.current_thread()]
        at = int(cache.tensors(None)["gate"].contents.data) + int(slot) * stride
        want = file_bytes(flash, record.offset + 9 * stride, stride)
        np.testing.assert_array_equal(np.frombuffer(ctypes.string_at(at, stride), np.uint8), want)

        def failing(dest, start, buffer):
            raise OSError(errno.EIO, "injected read error")

        staging.read_into = failing
        with pytest.raises(OSError, match="injected"):
            cache.fetch(np.array([4]), 2)
        assert cache.slot_of[4] == -1 and 4 not in cache.pool.expert_in
        staging.read_into = real
        slot = cache.fetch(np.array([4]), 3)[0]
        at = int(cache.tensors(None)["gate"].contents.data) + int(slot) * stride
        want = file_bytes(flash, record.offset + 4 * stride, stride)
        np.testing.assert_array_equal(np.frombuffer(ctypes.string_at(at, stride), np.uint8), want)
    finally:
        close([cache], io, staging)


def test_records_stored_for_another_cpus_repacked_kernels_are_refused(made, tmp_path, monkeypatch):
    """Records are read into their slots as stored, never repacked on load: where ggml here would
    repack a kind the file stores plain (or the other way round), loading says to convert again."""
    from converters.convert import convert
    from flashcli.engine import bundles
    from flashcli.errors import UnsupportedModel

    flash = convert(made("tiny-qwen3moe", "Q8_0"), tmp_path / "moe.flash.gguf").output
    bundles.prepacked_names(GGUFFile(flash))  # as converted here: accepted
    real = bundles.repacks
    monkeypatch.setattr(bundles, "repacks", lambda ggml_type, ne: not real(ggml_type, ne))
    with pytest.raises(UnsupportedModel, match="convert the source again"):
        bundles.prepacked_names(GGUFFile(flash))
