"""llama.cpp's repacked CPU kernels (the CPU_REPACK buffer type) for resident weights.

llama.cpp copies every Q4_0, Q4_K and IQ4_NL matrix it multiplies (rows a multiple of 8) into a
CPU_REPACK buffer, interleaving 8 rows per block; ggml then runs those through its gemv/gemm
kernels for the interleaved layout. They round differently from the plain kernels, so to give
llama.cpp's logits we must run the same ones. The repack happens in ggml_backend_tensor_set;
ggml_graph_compute dispatches to the repacked kernels by the tensor's buffer type. Which types
are repacked is decided at ggml's compile time (AVX2 on x86), so we ask ggml, not a table.

A repacked copy is anonymous memory the size of the tensor (it cannot be paged back to the
file): `nbytes` counts it for the budget. The plain bytes stay in the mapped file, whose pages
the caller may drop after repacking.
"""

from __future__ import annotations

import ctypes as C

from . import ggml

CHUNK = 4 << 20  # bytes of rows repacked at a time


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
        global _LOG
        L = ggml.lib()
        self.L = L
        self.tensors: dict[str, ggml.TensorP] = {}
        self.nbytes = 0
        self._buffer = None
        self._ctx = None
        self._buft = _repack_buffer_type(L)
        if self._buft is not None and _LOG is None:
            _LOG = _log_filter()
            L.log_set(C.cast(_LOG, C.c_void_p), None)

    @property
    def available(self) -> bool:
        return self._buft is not None

    def load(self, weights: dict, release=None) -> None:
        """Repacks every eligible tensor of `weights` {name: TensorInfo} (each used only as the
        first operand of a matrix product), a few megabytes of rows at a time, calling
        release(file_offset, length) on each piece's source bytes once repacked. Ineligible
        tensors stay on the plain path."""
        if not self.available:
            return
        L = self.L
        self._ctx = L.init(ggml.InitParams(L.tensor_overhead() * (len(weights) + 1), None, True))
        self._views = L.init(ggml.InitParams(L.tensor_overhead() * 8, None, True))
        pending = []
        for name, info in weights.items():
            if info.ggml_type not in (ggml.Q4_0, ggml.Q4_K, ggml.IQ4_NL) or len(info.ne) != 2 or info.ne[1] % 8:
                continue
            t = L.new_tensor_2d(self._ctx, info.ggml_type, info.ne[0], info.ne[1])
            pending.append((name, info, t))
        if not pending:
            return
        self._buffer = L.backend_alloc_ctx_tensors_from_buft(self._ctx, self._buft)
        if not self._buffer:
            raise MemoryError("could not allocate the repacked weights")
        for name, info, t in pending:
            if not t.contents.extra:  # ggml declined this tensor: leave it on the plain path
                continue
            row_bytes = info.row_bytes
            rows = max(8, (CHUNK // row_bytes) // 8 * 8)  # whole groups of 8 interleaved rows
            for first in range(0, info.n_rows, rows):
                n = min(rows, info.n_rows - first)
                piece = L.view_2d(self._views, t, info.row_len, n, row_bytes, first * row_bytes)
                L.backend_view_init(piece)
                L.backend_tensor_set(piece, info.raw.ctypes.data + first * row_bytes, 0, n * row_bytes)
                if release:
                    release(info.offset + first * row_bytes, n * row_bytes)
                L.free(self._views)  # the view's header only; its bytes are the tensor's
                self._views = L.init(ggml.InitParams(L.tensor_overhead() * 8, None, True))
            self.tensors[name] = t
            self.nbytes += info.nbytes

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


def _repack_buffer_type(L):
    reg = L.backend_cpu_reg()
    dev = L.backend_reg_dev_get(reg, 0)
    fn = L.backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not fn:
        return None
    bufts = C.CFUNCTYPE(C.POINTER(C.c_void_p), C.c_void_p)(fn)(dev)
    i = 0
    while bufts and bufts[i]:
        if L.backend_buft_name(bufts[i]) == b"CPU_REPACK":
            return bufts[i]
        i += 1
    return None
