"""The expert cache: per layer, slots holding whole experts (gate, up and down), filled by
O_DIRECT reads of whole experts and kept by recent use — the paper's windowed neuron cache at
the granularity of an expert (the router names exactly which experts a token needs: a predictor
without misses). The window is a fading one: an expert's uses count USE_DECAY less each pass
after them, and the slot whose expert counts least goes first (a hot expert outlives a moment
without use; the least recently used goes among equals).

An expert of a stacked tensor [ne0, rows, E] is one record of `rows` rows: one read fetches it
(three for gate, up and down). A fetch's missing records, every kind, are all read at once on
the I/O pool, as many in flight as there are staging buffers (expert_reads.py). Slots of a type
that ggml repacks live in a CPU_REPACK buffer: a record is read into a staging buffer and
repacked into its slot by the thread that read it, as soon as it is read (ggml's tensor_set
runs without the GIL, beside the other reads). Others are plain bytes laid out so that O_DIRECT
reads land straight in them. The cache never holds more than its slots: `nbytes` is what it
allocated, and `hits`/`misses` count experts asked for.
"""

from __future__ import annotations

import ctypes as C
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from ..engine import ggml
from ..engine.bundles import prepacked_names
from ..engine.repack import repack_buffer_type, repacks
from .expert_reads import ExpertStaging
from .io_backends import PAGE

KINDS = ("gate", "up", "down")
# a use's weight a pass later (half after 23 passes). On the qwen3-30b-a3b shape's skewed routing
# at 50% (59 of 128 experts a layer) it left 12.7% of a 128-token reply's experts to read against
# 13.8% when only the last use counted (BENCHMARKS.md, "A fading window").
USE_DECAY = 0.97
MADV_POPULATE_WRITE = 23  # linux/mman.h, since 5.14 (Python's mmap module lacks the name)
_libc = C.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (C.c_void_p, C.c_size_t, C.c_int)


class _Slots:
    """Slots of one kind (gate, up or down) of one layer: [ne0, rows, n_slots] of the experts'
    type, in a CPU_REPACK buffer where ggml repacks the type (filled through tensor_set, which
    repacks), else plain bytes placed at the file's offset modulo a page (an expert's aligned
    blocks fall on aligned addresses: O_DIRECT reads them straight in)."""

    def __init__(self, info, n_slots: int, prepacked: bool = False):
        self.info, self.n_slots, self.prepacked = info, n_slots, prepacked
        ne0, rows, _ = info.ne
        self.expert_bytes = info.nbytes // info.ne[2]
        L = ggml.lib()
        self._ctx = L.init(ggml.InitParams(L.tensor_overhead() * 2, None, True))
        self._views, self._view_of = None, []
        self._buffer, self.tensor, self.plain, self._mm = None, None, None, None
        buft = repack_buffer_type()
        if prepacked or (buft is not None and repacks(info.ggml_type, info.ne)):  # as the plan asks it
            t = L.new_tensor_3d(self._ctx, info.ggml_type, ne0, rows, n_slots)
            self._buffer = L.backend_buft_alloc_buffer(buft, repacked_slots_bytes(n_slots, self.expert_bytes))
            if self._buffer:  # placed as the plain slots are: a converted file's experts read straight in
                base = L.backend_buffer_get_base(self._buffer)
                if L.backend_tensor_alloc(self._buffer, t, base + (info.offset - base) % PAGE) == 0:
                    self.tensor = t if t.contents.extra else None
            if self.tensor is None and self._buffer:  # ggml declined it: plain slots are exact too
                L.backend_buffer_free(self._buffer)
                self._buffer = None
        if self.tensor is None and prepacked:
            raise RuntimeError(f"{info.name}: stored repacked, but ggml declines to repack its slots")
        if self.tensor is not None:
            # a view of each slot, made once: workers fill different slots at the same time
            self._views = L.init(ggml.InitParams(L.tensor_overhead() * n_slots, None, True))
            for slot in range(n_slots):
                view = L.view_2d(
                    self._views, self.tensor, ne0, rows, self.expert_bytes // rows, slot * self.expert_bytes
                )
                L.backend_view_init(view)
                self._view_of.append(view)
        else:
            pad = info.offset % PAGE
            self._mm = mmap.mmap(-1, -(-(pad + n_slots * self.expert_bytes) // PAGE) * PAGE)
            self.plain = np.frombuffer(self._mm, np.uint8, n_slots * self.expert_bytes, pad)
            self.plain = self.plain.reshape(n_slots, self.expert_bytes)

    @property
    def repacked(self) -> bool:
        return self.tensor is not None

    @property
    def nbytes(self) -> int:
        """Bytes allocated: the repacked buffer, or the plain slots' pages."""
        if self._buffer:
            return int(ggml.lib().backend_buffer_get_size(self._buffer))
        return len(self._mm) if self._mm is not None else 0

    def fill(self, slot: int, staging: ExpertStaging, start: int, buffer: np.ndarray) -> int:
        """The expert at file offset `start` into a slot, read with `buffer`; returns the bytes read.
        Runs on an I/O thread: distinct slots may be filled at the same time."""
        if self.tensor is None:
            return staging.read_into(self.plain[slot], start, buffer)
        if self.prepacked:  # a converted file's bytes are what ggml's repacking gives: read in as they are
            at = self.tensor.contents.data + slot * self.expert_bytes
            return staging.read_into(
                np.ctypeslib.as_array((C.c_uint8 * self.expert_bytes).from_address(at)), start, buffer
            )
        raw, n = staging.read_staged(start, self.expert_bytes, buffer)
        ggml.lib().backend_tensor_set(self._view_of[slot], raw.ctypes.data, 0, self.expert_bytes)
        return n

    def extent(self, first: int, last: int) -> tuple[int, int]:
        """(address, bytes) of slots [first, last)."""
        base = self.tensor.contents.data if self.tensor is not None else self.plain.ctypes.data
        return base + first * self.expert_bytes, (last - first) * self.expert_bytes

    def tensor_in(self, g: ggml.Graph) -> ggml.TensorP:
        if self.tensor is not None:
            return self.tensor
        ne0, rows, _ = self.info.ne
        return g.external(self.plain, self.info.ggml_type, ne0, rows, self.n_slots)

    def close(self):
        L = ggml.lib()
        if self._buffer:
            L.backend_buffer_free(self._buffer)
            self._buffer = None
        self._view_of = []
        for name in ("_ctx", "_views"):
            if getattr(self, name):
                L.free(getattr(self, name))
                setattr(self, name, None)
        self.plain = self._mm = None  # dropped, not closed: a graph may still view it


class ExpertCache:
    """One layer's expert slots. `fetch(experts, step)` makes every expert of the list resident
    and returns the slot of each; the expert whose uses count least (USE_DECAY) goes first to
    make room, the least recently used among equals."""

    def __init__(self, gf, layer: int, n_slots: int, io_pool: ThreadPoolExecutor, staging: ExpertStaging):
        self.infos = {k: gf.tensor(f"blk.{layer}.ffn_{k}_exps.weight") for k in KINDS}
        self.n_expert = self.infos["up"].ne[2]
        self.n_slots = min(n_slots, self.n_expert)
        prepacked = prepacked_names(gf)  # a converted file stores them as ggml repacks them here
        self.slots = {k: _Slots(info, self.n_slots, info.name in prepacked) for k, info in self.infos.items()}
        self._io, self._staging = io_pool, staging
        self.bytes_read = 0  # bytes transferred from the file, alignment slack included
        self.slot_of = np.full(self.n_expert, -1, np.int64)
        self.expert_in = np.full(self.n_slots, -1, np.int64)
        self.last_used = np.full(self.n_slots, -1, np.int64)
        self.uses = np.zeros(self.n_expert)  # each expert's uses, faded to the pass `counted_at`
        self.counted_at = np.zeros(self.n_expert, np.int64)
        self.hits = self.misses = 0
        self.prefetched = 0  # experts read ahead of their layer (expert_ffn's pre-gating)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slots.values())

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
        self.last_used[slots] = step
        return slots

    def prefetch(self, experts: np.ndarray, step: int, stop: threading.Event) -> int:
        """Reads ahead the experts not resident, in the order given (the likeliest first), until
        `stop` is set: reads started then finish, the rest are not started, and an expert is
        resident only where every kind of it was read. Returns how many became resident."""
        experts = np.asarray(experts, np.int64)[: self.n_slots]
        missing = experts[self.slot_of[experts] < 0]
        done = self._make_resident(experts, missing, step, stop) if len(missing) else missing
        self.prefetched += len(done)
        self.last_used[self.slot_of[done]] = step
        return len(done)

    def _weight(self, experts: np.ndarray, step: int) -> np.ndarray:
        """The experts' uses, faded to pass `step`."""
        return self.uses[experts] * USE_DECAY ** (step - self.counted_at[experts]).astype(np.float64)

    def _make_resident(self, experts: np.ndarray, missing: np.ndarray, step: int, stop: threading.Event | None = None):
        """Reads `missing` (of `experts`, the others resident and kept) into the slots whose
        experts count least (empty ones first); returns the experts read whole (all of them
        unless `stop` cut the reads short)."""
        wanted = np.zeros(self.n_slots, bool)
        wanted[self.slot_of[experts[self.slot_of[experts] >= 0]]] = True
        free = np.flatnonzero(~wanted)
        held = self.expert_in[free]
        weight = np.where(held >= 0, self._weight(np.maximum(held, 0), step), -1.0)
        victims = free[np.lexsort((self.last_used[free], weight))][: len(missing)]
        old, old_used = self.expert_in[victims], self.last_used[victims]
        self.slot_of[old[old >= 0]] = -1
        self.expert_in[victims] = -1  # empty until read whole: a failed or stopped read leaves them so
        self.last_used[victims] = -1  # an empty slot is the first to be taken
        started = self._read(missing, victims, stop)
        whole = started == len(self.infos)
        self.slot_of[missing[whole]] = victims[whole]
        self.expert_in[victims[whole]] = missing[whole]
        kept = (started == 0) & (old >= 0)  # a stopped prefetch never touched these slots: they keep theirs
        self.slot_of[old[kept]], self.expert_in[victims[kept]] = victims[kept], old[kept]
        self.last_used[victims[kept]] = old_used[kept]
        return missing[whole]

    def _read(self, experts: np.ndarray, slots: np.ndarray, stop: threading.Event | None = None) -> np.ndarray:
        """Every kind of each expert into its slot: all the records submitted at once, in file
        order (with `stop`: an expert after another, in the order given, none started once it is
        set), as many in flight as the staging has buffers; returns when all started are done,
        with how many records of each expert were read. A failed read raises here, after every
        read started has ended (none writes to a slot later)."""
        records = [
            (info.offset + int(e) * self.slots[kind].expert_bytes, kind, int(slot), i)
            for i, (e, slot) in enumerate(zip(experts, slots))
            for kind, info in self.infos.items()
        ]
        if stop is None:
            records.sort()
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

    def extents(self, first: int, last: int) -> list[tuple[int, int]]:
        """(address, bytes) of slots [first, last) of every kind."""
        return [s.extent(min(first, self.n_slots), min(last, self.n_slots)) for s in self.slots.values()]

    def tensors(self, g: ggml.Graph) -> dict:
        return {k: s.tensor_in(g) for k, s in self.slots.items()}

    def close(self):
        for s in self.slots.values():
            s.close()


class SlotPopulator:
    """Maps the caches' slot memory in, on a thread of its own, from the model's load: a slot's
    first fill would otherwise take its page faults on the I/O threads, in a token's time (on the
    qwen3-30b-a3b shape, 3.0 ms an expert fetch with its slot's pages in against 7.4 ms without,
    and the slots take some twenty tokens to fill). madvise(MADV_POPULATE_WRITE) faults the pages
    in without writing to them, so it may run beside the fills; slots go in the order fetches
    take empty ones (lowest first), a few at a time in every layer. Where the kernel lacks it
    (before Linux 5.14) the pages come in at their first fill, as before."""

    CHUNK = 4  # slots per layer per step

    def __init__(self, caches: list[ExpertCache]):
        self._caches, self._stop = caches, threading.Event()
        self._thread = threading.Thread(target=self._run, name="flashcli-populate", daemon=True)
        self._thread.start()

    def _run(self):
        try:  # only on a core nothing else wants: the tokens' compute comes first
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):
            pass
        most = max((c.n_slots for c in self._caches), default=0)
        for first in range(0, most, self.CHUNK):
            for cache in self._caches:
                for address, size in cache.extents(first, first + self.CHUNK):
                    if self._stop.is_set():
                        return
                    lo, hi = address // PAGE * PAGE, -(-(address + size) // PAGE) * PAGE
                    if size and _libc.madvise(lo, hi - lo, MADV_POPULATE_WRITE) != 0:
                        return  # not in this kernel (EINVAL), or no memory: the fills fault them in

    def wait(self):
        """Waits for it to map every slot in."""
        self._thread.join()

    def close(self):
        """Stops it and waits for it (the slots' memory may be freed after)."""
        self._stop.set()
        self._thread.join()


def repacked_slots_bytes(n_slots: int, expert_bytes: int) -> int:
    """A repacked slots buffer: the slots, and room to place them at the file's offset in a page."""
    return n_slots * expert_bytes + PAGE + 64


def staging_for(gf, cfg, layers) -> ExpertStaging:
    """Staging for the expert caches of these layers of the file: buffers for its largest record."""
    largest = max(gf.tensor(f"blk.{i}.ffn_{k}_exps.weight").nbytes // cfg.n_expert for i in layers for k in KINDS)
    return ExpertStaging(gf.path, largest)


def slot_kinds(gf, layer: int) -> list[tuple[int, bool, int]]:
    """(an expert's bytes, repacked, the file's offset in a page) of each kind of the layer's
    slots, as _Slots allocates them: what the plan counts."""
    out = []
    for kind in KINDS:
        info = gf.tensor(f"blk.{layer}.ffn_{kind}_exps.weight")
        repacked = repack_buffer_type() is not None and repacks(info.ggml_type, info.ne)
        out.append((info.nbytes // info.ne[2], repacked, info.offset % PAGE))
    return out
