"""The expert cache: per layer, slots holding whole experts (gate, up and down), filled by
O_DIRECT reads of whole experts and kept by recent use — the paper's windowed neuron cache at
the granularity of an expert (the router names exactly which experts a token needs: a predictor
without misses).

An expert of a stacked tensor [ne0, rows, E] is one record of `rows` rows: one read fetches it
(three for gate, up and down). Slots of a type that ggml repacks live in a CPU_REPACK buffer and
are repacked as they are filled, so the experts run on the kernels llama.cpp runs them on;
others are plain bytes. The cache never holds more than its slots: `nbytes` is what it
allocated, and `hits`/`misses` count experts asked for.
"""

from __future__ import annotations

import ctypes as C
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..engine import ggml
from ..engine.bundles import prepacked_names
from ..engine.repack import repack_buffer_type, repacks
from .io_backends import DirectReader, ReadBuffer

KINDS = ("gate", "up", "down")
STAGING_EXPERTS = 4  # experts read at a time into the staging buffer before they go to slots


class _Slots:
    """Slots of one kind (gate, up or down) of one layer: [ne0, rows, n_slots] of the experts'
    type, in a CPU_REPACK buffer where ggml repacks the type (filled through tensor_set, which
    repacks), else plain bytes."""

    def __init__(self, info, n_slots: int, prepacked: bool = False):
        self.info, self.n_slots, self.prepacked = info, n_slots, prepacked
        ne0, rows, _ = info.ne
        self.expert_bytes = info.nbytes // info.ne[2]
        L = ggml.lib()
        self._ctx = L.init(ggml.InitParams(L.tensor_overhead() * 2, None, True))
        self._views = L.init(ggml.InitParams(L.tensor_overhead() * 4, None, True))
        self._buffer, self.tensor, self.plain = None, None, None
        buft = repack_buffer_type()
        if prepacked or (buft is not None and repacks(info.ggml_type, (ne0, rows, n_slots))):
            t = L.new_tensor_3d(self._ctx, info.ggml_type, ne0, rows, n_slots)
            self._buffer = L.backend_buft_alloc_buffer(buft, L.nbytes(t) + 64)
            if self._buffer and L.backend_tensor_alloc(self._buffer, t, L.backend_buffer_get_base(self._buffer)) == 0:
                self.tensor = t if t.contents.extra else None
            if self.tensor is None and self._buffer:  # ggml declined it: plain slots are exact too
                L.backend_buffer_free(self._buffer)
                self._buffer = None
        if self.tensor is None and prepacked:
            raise RuntimeError(f"{info.name}: stored repacked, but ggml declines to repack its slots")
        if self.tensor is None:
            self.plain = np.zeros((n_slots, self.expert_bytes), np.uint8)

    @property
    def repacked(self) -> bool:
        return self.tensor is not None

    @property
    def nbytes(self) -> int:
        return self.n_slots * self.expert_bytes

    def put(self, slot: int, raw: np.ndarray):
        """Expert bytes as the file holds them (plain, or repacked where it stores them so) into a slot."""
        if self.tensor is None:
            self.plain[slot] = raw
            return
        if self.prepacked:  # the bytes ggml's repacking would give: copied as they are
            C.memmove(self.tensor.contents.data + slot * self.expert_bytes, raw.ctypes.data, self.expert_bytes)
            return
        L, rows = ggml.lib(), self.info.ne[1]
        view = L.view_2d(
            self._views, self.tensor, self.info.ne[0], rows, self.expert_bytes // rows, slot * self.expert_bytes
        )
        L.backend_view_init(view)
        L.backend_tensor_set(view, raw.ctypes.data, 0, self.expert_bytes)
        L.free(self._views)  # the view's header only
        self._views = L.init(ggml.InitParams(L.tensor_overhead() * 4, None, True))

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
        for name in ("_ctx", "_views"):
            if getattr(self, name):
                L.free(getattr(self, name))
                setattr(self, name, None)


class ExpertCache:
    """One layer's expert slots. `fetch(experts, step)` makes every expert of the list resident
    and returns the slot of each; what was used least recently goes first to make room."""

    def __init__(self, gf, layer: int, n_slots: int, io_pool: ThreadPoolExecutor, buffer: ReadBuffer):
        self.infos = {k: gf.tensor(f"blk.{layer}.ffn_{k}_exps.weight") for k in KINDS}
        self.n_expert = self.infos["up"].ne[2]
        self.n_slots = min(n_slots, self.n_expert)
        prepacked = prepacked_names(gf)  # a converted file stores them as ggml repacks them here
        self.slots = {k: _Slots(info, self.n_slots, info.name in prepacked) for k, info in self.infos.items()}
        self.readers = {
            k: DirectReader(
                gf.path, info.offset, info.nbytes // self.n_expert, self.n_expert, pool=io_pool, buffer=buffer
            )
            for k, info in self.infos.items()
        }
        self.slot_of = np.full(self.n_expert, -1, np.int64)
        self.expert_in = np.full(self.n_slots, -1, np.int64)
        self.last_used = np.full(self.n_slots, -1, np.int64)
        self.hits = self.misses = 0
        self.prefetched = 0  # experts read ahead of their layer (expert_ffn's pre-gating)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slots.values())

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for r in self.readers.values())

    def fetch(self, experts: np.ndarray, step: int, counted: bool = True) -> np.ndarray:
        """Slots [len(experts)] of the (distinct) experts, every one resident on return.
        counted=False: a prefetch, or experts fetched already in this pass (no hits or misses)."""
        experts = np.asarray(experts, np.int64)
        if len(experts) > self.n_slots:
            raise ValueError(f"{len(experts)} experts at once in {self.n_slots} slots")
        missing = experts[self.slot_of[experts] < 0]
        if counted:
            self.hits += len(experts) - len(missing)
            self.misses += len(missing)
        else:
            self.prefetched += len(missing)
        if len(missing):
            wanted = np.zeros(self.n_slots, bool)
            wanted[self.slot_of[experts[self.slot_of[experts] >= 0]]] = True
            free = np.flatnonzero(~wanted)
            victims = free[np.argsort(self.last_used[free], kind="stable")][: len(missing)]
            old = self.expert_in[victims]
            self.slot_of[old[old >= 0]] = -1
            self._read(missing, victims)
            self.slot_of[missing] = victims
            self.expert_in[victims] = missing
        slots = self.slot_of[experts]
        self.last_used[slots] = step
        return slots

    def _read(self, experts: np.ndarray, slots: np.ndarray):
        for first in range(0, len(experts), STAGING_EXPERTS):
            ids, into = experts[first : first + STAGING_EXPERTS], slots[first : first + STAGING_EXPERTS]
            for kind, reader in self.readers.items():
                staged = np.empty((len(ids), reader.record_bytes), np.uint8)
                reader.read(ids, staged)
                for raw, slot in zip(staged, into):
                    self.slots[kind].put(int(slot), raw)

    def tensors(self, g: ggml.Graph) -> dict:
        return {k: s.tensor_in(g) for k, s in self.slots.items()}

    def close(self):
        for r in self.readers.values():
            r.close()
        for s in self.slots.values():
            s.close()
