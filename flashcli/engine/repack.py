"""llama.cpp's repacked CPU kernels (the CPU_REPACK buffer type) for resident weights.

llama.cpp copies every matrix that ggml's CPU_REPACK buffer type takes into such a buffer,
interleaving rows in groups; ggml then runs those through its gemv/gemm kernels for the
interleaved layout. They round differently from the plain kernels, so to give llama.cpp's logits
we must run the same ones. The repack happens in ggml_backend_tensor_set; ggml_graph_compute
dispatches to the repacked kernels by the tensor's buffer type. Which types and shapes ggml takes
depends on the CPU features the wheel was built for (AVX2, AVX-512, NEON...), so `repacks()` asks
ggml, as llama.cpp's loader does, and no table of types is kept here.

A repacked copy is anonymous memory the size of the tensor (it cannot be paged back to the
file): `nbytes` counts it for the budget. The plain bytes stay in the mapped file, whose pages
the caller may drop after repacking.
"""

from __future__ import annotations

import ctypes as C
import hashlib
from functools import cache, lru_cache

import numpy as np

from . import ggml
from .weight_types import SUPPORTED_TYPES

CHUNK = 4 << 20  # bytes of rows repacked at a time
READ_AHEAD = 4  # chunks of the file read ahead of the one repacked
GROUP = 64  # rows: a multiple of every interleave ggml repacks with (4, 8 or 16 rows)
QUERY_BATCH = 512  # activation rows of the product llama.cpp's loader asks about
EXPERTS_USED = 2  # experts per token in the MUL_MAT_ID asked about (the answer does not depend on it)


def repacks(ggml_type: int, ne: tuple) -> bool:
    """Whether llama.cpp puts a weight of this type and shape (ggml order: row length, rows) in
    ggml's CPU_REPACK buffer on this CPU. Asked of ggml as llama.cpp's loader asks it
    (llama-model-loader.cpp, weight_buft_supported): the weight placed in a buffer of that type,
    does the CPU device run a MUL_MAT of it by F32 activations [ne0, 512]? The buffer type's
    supports_op says yes exactly when ggml has repacked kernels for the type and shape."""
    dims = tuple(int(n) for n in ne)
    while len(dims) > 2 and dims[-1] == 1:
        dims = dims[:-1]
    return len(dims) in (2, 3) and _repacks(int(ggml_type), *dims)


def repacked_types(ne: tuple = (4096, 4096)) -> list[str]:
    """Names of the weight types flashcli runs that ggml repacks on this CPU, for a matrix of
    shape `ne` (for logs and test output)."""
    return [name for ggml_type, name in SUPPORTED_TYPES.items() if repacks(ggml_type, ne)]


@cache
def _repacks(ggml_type: int, ne0: int, ne1: int, ne2: int = 0) -> bool:
    """ne2 > 0: a stack of ne2 matrices (experts), asked as llama.cpp asks: by a MUL_MAT_ID."""
    found = _cpu_repack()
    if found is None or ne0 % ggml.type_traits(ggml_type).blck_size:
        return False
    buft, dev, empty_buffer = found
    L = ggml.lib()
    ctx = L.init(ggml.InitParams(L.tensor_overhead() * 4, None, True))
    try:
        if ne2:
            w = L.new_tensor_3d(ctx, ggml_type, ne0, ne1, ne2)
            x = L.new_tensor_3d(ctx, ggml.F32, ne0, EXPERTS_USED, QUERY_BATCH)
            ids = L.new_tensor_2d(ctx, ggml.I32, EXPERTS_USED, QUERY_BATCH)
            product = L.mul_mat_id(ctx, w, x, ids)
        else:
            w = L.new_tensor_2d(ctx, ggml_type, ne0, ne1)
            x = L.new_tensor_2d(ctx, ggml.F32, ne0, QUERY_BATCH)
            product = L.mul_mat(ctx, w, x)
        w.contents.buffer = empty_buffer  # only its buffer type is looked at
        return bool(L.backend_dev_supports_op(dev, product))
    finally:
        L.free(ctx)


def _log_filter():
    """ggml logs a DEBUG line per repacked tensor on stderr; keep warnings and errors only."""

    def callback(level, text, _user):
        if level >= 3 and level != 5:  # WARN, ERROR (not DEBUG, INFO, CONT)
            import sys

            sys.stderr.write(text.decode("utf-8", "replace"))

    return C.CFUNCTYPE(None, C.c_int, C.c_char_p, C.c_void_p)(callback)


_LOG = None


class RepackedWeights:
    """Persistent ggml tensors in one CPU_REPACK buffer, by GGUF tensor name."""

    def __init__(self):
        L = ggml.lib()
        self.L = L
        self.tensors: dict[str, ggml.TensorP] = {}
        self.nbytes = 0
        self._buffer = None
        self._ctx = None
        found = _cpu_repack()
        self._buft = found[0] if found else None

    @property
    def available(self) -> bool:
        return self._buft is not None

    def load(
        self, weights: dict, release=None, prepacked: frozenset = frozenset(), read_ahead=None, read_into=None
    ) -> None:
        """Repacks every eligible tensor of `weights` {name: TensorInfo} (each used only as the
        first operand of a matrix product), a few megabytes of rows at a time, calling
        release(file_offset, length) on each piece's source bytes once repacked, and
        read_ahead(file_offset, length) on the pieces a few ahead of it. Ineligible
        tensors stay on the plain path. Tensors named in `prepacked` are stored repacked in the
        file already (a converted file, see repack_rows): their bytes are copied as they are.
        read_into(file_offset, length, address) (GGUFFile.read_into): reads the bytes from the
        file instead of copying them out of the tensors' mapping, which faults a page at a time."""
        if not self.available:
            return
        L = self.L
        read_ahead = None if read_into else read_ahead  # read_into reads ahead on its own
        self._ctx = L.init(ggml.InitParams(L.tensor_overhead() * (len(weights) + 1), None, True))
        self._views = L.init(ggml.InitParams(L.tensor_overhead() * 8, None, True))
        pending = []
        for name, info in weights.items():
            if not repacks(info.ggml_type, info.ne):
                continue
            t = (
                L.new_tensor_3d(self._ctx, info.ggml_type, *info.ne)
                if len(info.ne) == 3
                else L.new_tensor_2d(self._ctx, info.ggml_type, info.ne[0], info.ne[1])
            )
            pending.append((name, info, t))
        if not pending:
            return
        self._buffer = L.backend_alloc_ctx_tensors_from_buft(self._ctx, self._buft)
        if not self._buffer:
            raise MemoryError("could not allocate the repacked weights")
        for name, info, t in pending:
            if not t.contents.extra:  # the buffer declined what repacks() accepted: the plain path is safe
                if name in prepacked:
                    raise RuntimeError(f"ggml declined to run {name}, stored repacked, on its repacked kernels")
                continue
            if info.stride:  # experts in records (expert_records.py), stored repacked: an expert at a time
                self._copy_experts(info, t, read_into)
                self.tensors[name] = t
                self.nbytes += info.nbytes
                continue
            row_bytes = info.row_bytes
            rows = max(GROUP, (CHUNK // row_bytes) // GROUP * GROUP)  # whole groups of interleaved rows
            if read_ahead:
                read_ahead(info.offset, READ_AHEAD * rows * row_bytes)
            for first in range(0, info.n_rows, rows):
                n = min(rows, info.n_rows - first)
                if read_ahead and first + READ_AHEAD * rows < info.n_rows:
                    ahead = first + READ_AHEAD * rows
                    read_ahead(info.offset + ahead * row_bytes, min(rows, info.n_rows - ahead) * row_bytes)
                source = info.raw.ctypes.data + first * row_bytes
                if name in prepacked and read_into:
                    read_into(info.offset + first * row_bytes, n * row_bytes, t.contents.data + first * row_bytes)
                elif name in prepacked:
                    C.memmove(t.contents.data + first * row_bytes, source, n * row_bytes)
                else:  # (experts: rows of every matrix in turn, groups never across two: ne1 % 8 == 0)
                    if read_into:
                        staged = np.empty(n * row_bytes, np.uint8)
                        read_into(info.offset + first * row_bytes, n * row_bytes, staged.ctypes.data)
                        source = staged.ctypes.data
                    piece = L.view_2d(self._views, t, info.row_len, n, row_bytes, first * row_bytes)
                    L.backend_view_init(piece)
                    L.backend_tensor_set(piece, source, 0, n * row_bytes)
                if release:
                    release(info.offset + first * row_bytes, n * row_bytes)
                L.free(self._views)  # the view's header only; its bytes are the tensor's
                self._views = L.init(ggml.InitParams(L.tensor_overhead() * 8, None, True))
            self.tensors[name] = t
            self.nbytes += info.nbytes

    @staticmethod
    def _copy_experts(info, t, read_into=None):
        size = info.nbytes // info.ne[2]
        for e in range(info.ne[2]):
            at = t.contents.data + e * size
            if read_into:
                read_into(info.offset + e * info.stride, size, at)
            else:
                C.memmove(at, info.raw[e].ctypes.data, size)

    def close(self):
        if self._buffer:
            self.L.backend_buffer_free(self._buffer)
            self._buffer = None
        if self._ctx:
            self.L.free(self._ctx)
            self.L.free(self._views)
            self._ctx = None

    def __del__(self):
        self.close()


def repack_rows(ggml_type: int, plain: np.ndarray) -> np.ndarray:
    """The bytes ggml's repacked kernels run on for these rows (uint8 [n_rows, row_bytes], n_rows
    a multiple of GROUP): what a converted file stores, so that streaming it needs no repacking.
    ggml keeps each group of interleaved rows at the offsets of its plain rows."""
    L = ggml.lib()
    n_rows, row_bytes = plain.shape
    row_len = row_bytes * ggml.type_traits(ggml_type).blck_size // ggml.type_traits(ggml_type).type_size
    ctx = L.init(ggml.InitParams(L.tensor_overhead() * 2, None, True))
    buffer = L.backend_buft_alloc_buffer(repack_buffer_type(), plain.nbytes + 64)
    try:
        t = L.new_tensor_2d(ctx, ggml_type, row_len, n_rows)
        if L.backend_tensor_alloc(buffer, t, L.backend_buffer_get_base(buffer)) != 0 or not t.contents.extra:
            raise ValueError(f"ggml does not repack type {ggml_type} rows of {row_len}")
        plain = np.ascontiguousarray(plain)
        L.backend_tensor_set(t, plain.ctypes.data, 0, plain.nbytes)
        return np.frombuffer(C.string_at(t.contents.data, plain.nbytes), np.uint8).reshape(n_rows, row_bytes).copy()
    finally:
        L.backend_buffer_free(buffer)
        L.free(ctx)


def signature(types) -> str:
    """What ggml's repacking of each of these types gives on this CPU and build, as a digest: a
    file stored repacked runs only where its signature is the same."""
    return _signature(frozenset(int(t) for t in types))


@cache
def _signature(types: frozenset) -> str:  # the same on every call in a process: computed once
    rng = np.random.default_rng(0)
    digest = hashlib.sha256()
    for ggml_type in sorted(set(int(t) for t in types)):
        values = rng.standard_normal((GROUP, 256)).astype(np.float32)
        digest.update(f"{ggml_type}:".encode())
        digest.update(repack_rows(ggml_type, ggml.quantize_rows(values, ggml_type)).tobytes())
    return digest.hexdigest()[:32]


def repack_buffer_type():
    """ggml's CPU_REPACK buffer type (None where ggml has none): memory of this type makes
    ggml run a matrix product on the repacked kernels."""
    found = _cpu_repack()
    return found[0] if found else None


@lru_cache(maxsize=1)
def _cpu_repack():
    """(CPU_REPACK buffer type, CPU device, an empty buffer of that type kept for the queries),
    found as llama.cpp finds its CPU extra buffer types; None where ggml has none. Installs the
    log filter: ggml logs a line for every tensor it repacks."""
    global _LOG
    L = ggml.lib()
    if _LOG is None:
        _LOG = _log_filter()
        L.log_set(C.cast(_LOG, C.c_void_p), None)
    reg = L.backend_cpu_reg()
    dev = L.backend_reg_dev_get(reg, 0)
    fn = L.backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not fn:
        return None
    bufts = C.CFUNCTYPE(C.POINTER(C.c_void_p), C.c_void_p)(fn)(dev)
    i = 0
    while bufts and bufts[i]:
        if L.backend_buft_name(bufts[i]) == b"CPU_REPACK":
            return bufts[i], dev, L.backend_buft_alloc_buffer(bufts[i], 0)
        i += 1
    return None
