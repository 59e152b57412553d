"""The memory an expert cache keeps experts in: slots of whole records (a converted file: an
expert's gate, up and down side by side, one read), or of one kind each (a GGUF's stacked
tensors), in ggml's repacked buffer where ggml repacks the type, else laid out for O_DIRECT; and
pools of them shared by the layers whose experts have the same types and shapes, so that a layer
whose tokens spread over more experts may hold more of them than one whose tokens keep to a few
(expert_cache.py decides which experts stay).
"""

from __future__ import annotations

import ctypes as C
import mmap
import os
import threading

import numpy as np

from ..engine import ggml
from ..engine.bundles import prepacked_names
from ..engine.repack import repack_buffer_type, repacks
from .expert_reads import ExpertStaging
from .io_backends import PAGE

KINDS = ("gate", "up", "down")
RECORD = "record"  # the key of a pool's slots of whole experts (_RecordSlots)
RESERVED = -2  # ExpertPool.owner of a slot being read into
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


class _RecordSlots:
    """Slots of whole experts, as a converted file lays them out (engine/expert_records.py): a
    slot is a record (gate, up and down side by side), filled by one read straight from the file;
    a tensor of each kind views the slots at its place in the record, a record from one expert to
    the next. In ggml's CPU_REPACK buffer where a kind is stored repacked (ggml finds its
    repacked kernels by the buffer; the plain kinds beside them run on the plain ones), else in
    ggml's CPU buffer; placed at the file's offset in a page, so that O_DIRECT lands in place."""

    def __init__(self, infos: dict, n_slots: int, prepacked: frozenset):
        gate = infos["gate"]
        self.n_slots, self.record_bytes = n_slots, gate.stride  # the gate starts the record
        L = ggml.lib()
        stored_repacked = any(info.name in prepacked for info in infos.values())
        buft = repack_buffer_type() if stored_repacked else L.backend_cpu_buffer_type()
        self._buffer = L.backend_buft_alloc_buffer(buft, repacked_slots_bytes(n_slots, self.record_bytes))
        if not self._buffer:
            raise MemoryError(f"could not allocate {n_slots} expert slots of {self.record_bytes} bytes")
        base = L.backend_buffer_get_base(self._buffer)
        self.base = base + (gate.offset - base) % PAGE
        self._ctx = L.init(ggml.InitParams(L.tensor_overhead() * len(infos), None, True))
        self.tensors = {}
        for kind, info in infos.items():
            t = L.new_tensor_3d(self._ctx, info.ggml_type, info.ne[0], info.ne[1], n_slots)
            t.contents.nb[2] = self.record_bytes
            if L.backend_tensor_alloc(self._buffer, t, self.base + info.offset - gate.offset) != 0:
                raise MemoryError(f"{info.name}: ggml could not place its slots")
            if (info.name in prepacked) != bool(t.contents.extra):
                raise RuntimeError(f"{info.name}: stored repacked, but ggml declines to repack its slots")
            self.tensors[kind] = t

    @property
    def expert_bytes(self) -> int:
        """A slot's bytes: a whole record."""
        return self.record_bytes

    @property
    def nbytes(self) -> int:
        return int(ggml.lib().backend_buffer_get_size(self._buffer)) if self._buffer else 0

    def fill(self, slot: int, staging: ExpertStaging, start: int, buffer: np.ndarray) -> int:
        """The expert whose record starts at file offset `start` into a slot: one read."""
        at = self.base + slot * self.record_bytes
        dest = np.ctypeslib.as_array((C.c_uint8 * self.record_bytes).from_address(at))
        return staging.read_into(dest, start, buffer)

    def extent(self, first: int, last: int) -> tuple[int, int]:
        return self.base + first * self.record_bytes, (last - first) * self.record_bytes

    def close(self):
        L = ggml.lib()
        if self._buffer:
            L.backend_buffer_free(self._buffer)
            self._buffer = None
        if self._ctx:
            L.free(self._ctx)
            self._ctx = None
        self.tensors = {}


class ExpertPool:
    """Slots of every kind shared by `layers` (their experts of the same types and shapes), and
    who holds each: `owner[s]` the row (the layer's index in `layers`; RESERVED while a read
    fills it) and `expert_in[s]` the expert in slot s (-1: empty), `last_used[s]` its last
    pass; per row, `slot_of[row, e]` the slot of expert e (-1: not resident), and each expert's
    uses faded to pass `counted_at` (expert_cache.USE_DECAY)."""

    def __init__(self, slots: dict, layers: list, n_expert: int, n_slots: int):
        self.slots, self.layers, self.n_expert, self.n_slots = slots, list(layers), n_expert, n_slots
        self.records = RECORD in slots  # an expert is one read (a converted file), else one a kind
        rows = len(self.layers)
        self.slot_of = np.full((rows, n_expert), -1, np.int64)
        self.uses = np.zeros((rows, n_expert))
        self.counted_at = np.zeros((rows, n_expert), np.int64)
        self.owner = np.full(n_slots, -1, np.int64)
        self.expert_in = np.full(n_slots, -1, np.int64)
        self.last_used = np.full(n_slots, -1, np.int64)
        self.lock = threading.Lock()  # a prefetch picks its slots on a thread of its own

    @classmethod
    def of(cls, gf, layers: list, n_slots: int) -> ExpertPool:
        """A pool of n_slots slots (at most every expert of every layer) for these layers of the
        file, placed at the first layer's offsets in a page."""
        infos = {k: gf.tensor(f"blk.{layers[0]}.ffn_{k}_exps.weight") for k in KINDS}
        n_expert = infos["up"].ne[2]
        n_slots = min(n_slots, n_expert * len(layers))
        prepacked = prepacked_names(gf)  # a converted file stores them as ggml repacks them here
        if infos["gate"].stride:
            return cls({RECORD: _RecordSlots(infos, n_slots, prepacked)}, layers, n_expert, n_slots)
        return cls(
            {k: _Slots(info, n_slots, info.name in prepacked) for k, info in infos.items()}, layers, n_expert, n_slots
        )

    def tensors(self, g: ggml.Graph) -> dict:
        """The slots of each kind as the first operand of mul_mat_id in graph g."""
        if self.records:
            return dict(self.slots[RECORD].tensors)
        return {k: s.tensor_in(g) for k, s in self.slots.items()}

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slots.values())

    def extents(self, first: int, last: int) -> list[tuple[int, int]]:
        """(address, bytes) of slots [first, last) of every kind."""
        return [s.extent(min(first, self.n_slots), min(last, self.n_slots)) for s in self.slots.values()]

    def close(self):
        for s in self.slots.values():
            s.close()


def pool_layers(gf, n_layers: int) -> tuple:
    """The layers of the file that share a pool of slots: those whose experts have the same
    types, shapes and storage (every kind), in layer order."""
    prepacked = prepacked_names(gf)
    groups: dict = {}
    for layer in range(n_layers):
        infos = [gf.tensor(f"blk.{layer}.ffn_{k}_exps.weight") for k in KINDS]
        key = tuple((i.ggml_type, tuple(i.ne), i.name in prepacked, i.stride) for i in infos)
        groups.setdefault(key, []).append(layer)
    return tuple(tuple(layers) for layers in groups.values())


def pools_for(gf, slots: list) -> list:
    """The file's ExpertPools (pool_layers), each of its layers' slots together (slots[i] for
    layer i)."""
    return [ExpertPool.of(gf, list(layers), sum(slots[i] for i in layers)) for layers in pool_layers(gf, len(slots))]


class SlotPopulator:
    """Maps the pools' slot memory in, on a thread of its own, from the model's load: a slot's
    first fill would otherwise take its page faults on the I/O threads, in a token's time (on the
    qwen3-30b-a3b shape, 3.0 ms an expert fetch with its slot's pages in against 7.4 ms without,
    and the slots take some twenty tokens to fill). madvise(MADV_POPULATE_WRITE) faults the pages
    in without writing to them, so it may run beside the fills; slots go in the order fetches
    take empty ones (lowest first), a few at a time in every pool. Where the kernel lacks it
    (before Linux 5.14) the pages come in at their first fill, as before."""

    CHUNK = 4  # slots per pool per step

    def __init__(self, pools: list[ExpertPool]):
        self._pools, self._stop = pools, threading.Event()
        self._thread = threading.Thread(target=self._run, name="flashcli-populate", daemon=True)
        self._thread.start()

    def _run(self):
        try:  # only on a core nothing else wants: the tokens' compute comes first
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):
            pass
        most = max((p.n_slots for p in self._pools), default=0)
        for first in range(0, most, self.CHUNK):
            for pool in self._pools:
                for address, size in pool.extents(first, first + self.CHUNK):
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


def slot_kinds(gf, layer: int) -> tuple:
    """(bytes a slot, in a ggml buffer, the file's offset in a page) of each array of the layer's
    slots as ExpertPool allocates them (one of whole records for a converted file, else one a
    kind): what the plan counts."""
    infos = [gf.tensor(f"blk.{layer}.ffn_{kind}_exps.weight") for kind in KINDS]
    if infos[0].stride:
        return ((infos[0].stride, True, infos[0].offset % PAGE),)
    return tuple(
        (i.expert_stride, repack_buffer_type() is not None and repacks(i.ggml_type, i.ne), i.offset % PAGE)
        for i in infos
    )


def staged_bytes(gf, layer: int) -> int:
    """The largest read of the layer's experts a staging buffer may have to hold whole: a kind of a
    GGUF's stacked experts (one that ggml repacks is read there and repacked from it); none for
    records, which land in their slots (a page-aligned read of page-aligned records)."""
    infos = [gf.tensor(f"blk.{layer}.ffn_{kind}_exps.weight") for kind in KINDS]
    return 0 if infos[0].stride else max(i.expert_stride for i in infos)
