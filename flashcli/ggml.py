"""ctypes bindings to the ggml libraries that llama-cpp-python ships, and a small graph runner.

Only what flashcli uses is bound: building graphs of matrix products and elementwise ops over
tensors whose data live in our own memory (memory-mapped weights, numpy buffers), and running
them on a persistent thread pool. Quantized matrix work thus runs in llama.cpp's own kernels.
"""

from __future__ import annotations

import ctypes as C
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q

GGML_MAX_DIMS = 4
GGML_MAX_OP_PARAMS = 64
GGML_MAX_SRC = 10
GGML_MAX_NAME = 64
GGML_MAX_N_THREADS = 512

F32, F16, BF16, I32, I64 = (int(t) for t in (Q.F32, Q.F16, Q.BF16, Q.I32, Q.I64))
Q4_0, Q4_K, Q6_K, Q8_0, IQ4_NL = (int(t) for t in (Q.Q4_0, Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.IQ4_NL))


class Tensor(C.Structure):
    """Mirror of `struct ggml_tensor` (ggml.h); checked against ggml_get_data at load."""

    pass


Tensor._fields_ = [
    ("type", C.c_int),
    ("buffer", C.c_void_p),
    ("ne", C.c_int64 * GGML_MAX_DIMS),
    ("nb", C.c_size_t * GGML_MAX_DIMS),
    ("op", C.c_int),
    ("op_params", C.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", C.c_int32),
    ("src", C.POINTER(Tensor) * GGML_MAX_SRC),
    ("view_src", C.POINTER(Tensor)),
    ("view_offs", C.c_size_t),
    ("data", C.c_void_p),
    ("name", C.c_char * GGML_MAX_NAME),
    ("extra", C.c_void_p),
    ("padding", C.c_char * 8),
]
TensorP = C.POINTER(Tensor)


class InitParams(C.Structure):
    _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", C.c_void_p), ("no_alloc", C.c_bool)]


class CPlan(C.Structure):
    _fields_ = [
        ("work_size", C.c_size_t),
        ("work_data", C.c_void_p),
        ("n_threads", C.c_int),
        ("threadpool", C.c_void_p),
        ("abort_callback", C.c_void_p),
        ("abort_callback_data", C.c_void_p),
        ("use_ref", C.c_bool),
    ]


class ThreadpoolParams(C.Structure):
    _fields_ = [
        ("cpumask", C.c_bool * GGML_MAX_N_THREADS),
        ("n_threads", C.c_int),
        ("prio", C.c_int),
        ("poll", C.c_uint32),
        ("strict_cpu", C.c_bool),
        ("paused", C.c_bool),
    ]


class TypeTraits(C.Structure):
    _fields_ = [
        ("type_name", C.c_char_p),
        ("blck_size", C.c_int64),
        ("blck_size_interleave", C.c_int64),
        ("type_size", C.c_size_t),
        ("is_quantized", C.c_bool),
        ("to_float", C.c_void_p),
        ("from_float_ref", C.c_void_p),
    ]


TO_FLOAT = C.CFUNCTYPE(None, C.c_void_p, C.c_void_p, C.c_int64)


def _library_dir() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise ImportError("llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)")
    return Path(spec.origin).parent / "lib"


def _soname(libdir: Path, name: str) -> Path:
    versioned = libdir / (name + ".0")
    return versioned if versioned.exists() else libdir / name


def _bind(lib, name, restype, *argtypes):
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


class _Lib:
    """The bound functions, loaded once per process."""

    def __init__(self):
        libdir = _library_dir()
        mode = getattr(os, "RTLD_GLOBAL", 0)
        # the names libllama links against: the wheel ships libggml-base.so and .so.0 as two
        # files, and loading the other name would put a second ggml, with its own state, in the
        # process beside llama.cpp's
        base = C.CDLL(str(_soname(libdir, "libggml-base.so")), mode=mode)
        cpu = C.CDLL(str(_soname(libdir, "libggml-cpu.so")), mode=mode)
        p, i64, f32, sz = C.c_void_p, C.c_int64, C.c_float, C.c_size_t
        T = TensorP
        self.init = _bind(base, "ggml_init", p, InitParams)
        self.free = _bind(base, "ggml_free", None, p)
        self.tensor_overhead = _bind(base, "ggml_tensor_overhead", sz)
        self.graph_overhead_custom = _bind(base, "ggml_graph_overhead_custom", sz, sz, C.c_bool)
        self.new_tensor_2d = _bind(base, "ggml_new_tensor_2d", T, p, C.c_int, i64, i64)
        self.new_tensor_3d = _bind(base, "ggml_new_tensor_3d", T, p, C.c_int, i64, i64, i64)
        self.get_data = _bind(base, "ggml_get_data", p, T)
        self.nbytes = _bind(base, "ggml_nbytes", sz, T)
        self.row_size = _bind(base, "ggml_row_size", sz, C.c_int, i64)
        # ops: (ctx, tensors...) -> tensor, as llama.cpp's graphs use them
        for name in ("mul_mat", "out_prod", "add", "mul", "get_rows", "swiglu_split", "geglu_split", "reglu_split"):
            setattr(self, name, _bind(base, "ggml_" + name, T, p, T, T))
        for name in ("cont", "transpose"):
            setattr(self, name, _bind(base, "ggml_" + name, T, p, T))
        self.set_rows = _bind(base, "ggml_set_rows", T, p, T, T, T)
        self.concat = _bind(base, "ggml_concat", T, p, T, T, C.c_int)
        self.scale = _bind(base, "ggml_scale", T, p, T, f32)
        self.rms_norm = _bind(base, "ggml_rms_norm", T, p, T, f32)
        self.soft_max_ext = _bind(base, "ggml_soft_max_ext", T, p, T, T, f32, f32)
        self.permute = _bind(base, "ggml_permute", T, p, T, C.c_int, C.c_int, C.c_int, C.c_int)
        self.cont_2d = _bind(base, "ggml_cont_2d", T, p, T, i64, i64)
        self.reshape_2d = _bind(base, "ggml_reshape_2d", T, p, T, i64, i64)
        self.reshape_3d = _bind(base, "ggml_reshape_3d", T, p, T, i64, i64, i64)
        self.view_2d = _bind(base, "ggml_view_2d", T, p, T, i64, i64, sz, sz)
        self.view_3d = _bind(base, "ggml_view_3d", T, p, T, i64, i64, i64, sz, sz, sz)
        self.rope_ext = _bind(
            base, "ggml_rope_ext", T, p, T, T, T, C.c_int, C.c_int, C.c_int, f32, f32, f32, f32, f32, f32
        )
        self.new_graph_custom = _bind(base, "ggml_new_graph_custom", p, p, sz, C.c_bool)
        self.build_forward_expand = _bind(base, "ggml_build_forward_expand", None, p, T)
        self.get_type_traits = _bind(base, "ggml_get_type_traits", C.POINTER(TypeTraits), C.c_int)
        self.quantize_chunk = _bind(base, "ggml_quantize_chunk", sz, C.c_int, p, p, i64, i64, i64, p)
        self.threadpool_params_default = _bind(base, "ggml_threadpool_params_default", ThreadpoolParams, C.c_int)
        self.log_set = _bind(base, "ggml_log_set", None, p, p)
        self.log_get = _bind(base, "ggml_log_get", None, C.POINTER(p), C.POINTER(p))
        self.set_output = _bind(base, "ggml_set_output", None, T)
        self.gallocr_new = _bind(base, "ggml_gallocr_new", p, p)
        self.gallocr_alloc_graph = _bind(base, "ggml_gallocr_alloc_graph", C.c_bool, p, p)
        self.gallocr_reserve = _bind(base, "ggml_gallocr_reserve", C.c_bool, p, p)
        self.gallocr_get_buffer_size = _bind(base, "ggml_gallocr_get_buffer_size", sz, p, C.c_int)
        self.gallocr_free = _bind(base, "ggml_gallocr_free", None, p)
        self.backend_cpu_buffer_type = _bind(base, "ggml_backend_cpu_buffer_type", p)
        # backend API, for the CPU_REPACK buffer type (see repack.py)
        self.backend_cpu_reg = _bind(cpu, "ggml_backend_cpu_reg", p)
        self.backend_reg_dev_get = _bind(base, "ggml_backend_reg_dev_get", p, p, sz)
        self.backend_reg_get_proc_address = _bind(base, "ggml_backend_reg_get_proc_address", p, p, C.c_char_p)
        self.backend_buft_name = _bind(base, "ggml_backend_buft_name", C.c_char_p, p)
        self.backend_alloc_ctx_tensors_from_buft = _bind(base, "ggml_backend_alloc_ctx_tensors_from_buft", p, p, p)
        self.backend_buft_alloc_buffer = _bind(base, "ggml_backend_buft_alloc_buffer", p, p, sz)
        self.backend_dev_supports_op = _bind(base, "ggml_backend_dev_supports_op", C.c_bool, p, T)
        self.backend_buffer_free = _bind(base, "ggml_backend_buffer_free", None, p)
        self.backend_buffer_get_base = _bind(base, "ggml_backend_buffer_get_base", p, p)
        self.backend_tensor_alloc = _bind(base, "ggml_backend_tensor_alloc", C.c_int, p, T, p)
        self.reset = _bind(base, "ggml_reset", None, p)
        self.backend_buffer_get_size = _bind(base, "ggml_backend_buffer_get_size", sz, p)
        self.backend_tensor_set = _bind(base, "ggml_backend_tensor_set", None, T, p, sz, sz)
        self.backend_view_init = _bind(base, "ggml_backend_view_init", C.c_int, T)
        self.cpu_init = _bind(cpu, "ggml_cpu_init", None)
        self.threadpool_new = _bind(cpu, "ggml_threadpool_new", p, C.POINTER(ThreadpoolParams))
        self.threadpool_free = _bind(cpu, "ggml_threadpool_free", None, p)
        self.graph_plan = _bind(cpu, "ggml_graph_plan", CPlan, p, C.c_int, p)
        self.graph_compute = _bind(cpu, "ggml_graph_compute", C.c_int, p, C.POINTER(CPlan))
        self.cpu_init()
        self._check_layout()

    def _check_layout(self):
        ctx = self.init(InitParams(1 << 16, None, False))
        try:
            t = self.new_tensor_2d(ctx, F32, 3, 5)
            if t.contents.data != self.get_data(t) or tuple(t.contents.ne[:2]) != (3, 5):
                raise ImportError("ggml_tensor layout differs from flashcli's mirror; wrong llama-cpp-python version")
        finally:
            self.free(ctx)


@lru_cache(maxsize=1)
def lib() -> _Lib:
    return _Lib()


# --- quant types as data ---------------------------------------------------------------------


def type_traits(ggml_type: int) -> TypeTraits:
    return lib().get_type_traits(ggml_type).contents


def check_row_len(ggml_type: int, n: int):
    """Rows must hold whole blocks (32 values; 256 for K-quants), or ggml writes out of bounds."""
    block = type_traits(ggml_type).blck_size
    if n % block:
        raise ValueError(f"rows of {n} values do not split into blocks of {block} for ggml type {ggml_type}")


def row_bytes(ggml_type: int, n: int) -> int:
    return int(lib().row_size(ggml_type, n))


def dequantize_rows(raw: np.ndarray, ggml_type: int, row_len: int) -> np.ndarray:
    """Raw bytes of whole rows (n_rows, row_bytes) -> float32 (n_rows, row_len), in ggml."""
    raw = np.ascontiguousarray(raw)
    check_row_len(ggml_type, row_len)
    n_rows = raw.size // row_bytes(ggml_type, row_len)
    out = np.empty((n_rows, row_len), dtype=np.float32)
    if ggml_type == F32:
        out[...] = raw.view(np.float32).reshape(n_rows, row_len)
        return out
    to_float = TO_FLOAT(type_traits(ggml_type).to_float)
    to_float(raw.ctypes.data, out.ctypes.data, n_rows * row_len)
    return out


def quantize_rows(values: np.ndarray, ggml_type: int) -> np.ndarray:
    """float32 (n_rows, row_len) -> raw bytes (n_rows, row_bytes) of ggml_type, in ggml."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    n_rows, row_len = values.shape
    check_row_len(ggml_type, row_len)
    rb = row_bytes(ggml_type, row_len)
    out = np.empty((n_rows, rb), dtype=np.uint8)
    if ggml_type == F32:
        out.view(np.float32)[...] = values
        return out
    lib().quantize_chunk(ggml_type, values.ctypes.data, out.ctypes.data, 0, n_rows, row_len, None)
    return out


# --- graphs ------------------------------------------------------------------------------------


class ThreadPool:
    """A persistent ggml thread pool; graphs run on it without spawning threads per call."""

    def __init__(self, n_threads: int):
        self.n_threads = max(1, int(n_threads))
        params = lib().threadpool_params_default(self.n_threads)
        params.poll = 0  # sleep between graphs: numpy runs on the same cores in between
        self.handle = lib().threadpool_new(C.byref(params))

    def close(self):
        if self.handle:
            lib().threadpool_free(self.handle)
            self.handle = None

    def __del__(self):
        self.close()


def as_array(t: TensorP, dtype=np.float32) -> np.ndarray:
    """A numpy view of an F32 tensor's data as [rows, ne0] (rows = ne1*ne2*ne3), C order."""
    ne = list(t.contents.ne)
    shape = (int(np.prod(ne[1:])), ne[0])
    count = shape[0] * shape[1]
    buf = (C.c_char * (count * np.dtype(dtype).itemsize)).from_address(t.contents.data)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


class Graph:
    """One ggml compute graph. Op results are placed by ggml's graph allocator (ggml-alloc, as
    llama.cpp does), which reuses memory between ops that do not overlap in time, so a whole
    model's graph costs about two layers of activations; inputs and weights point at any memory.

    Usage: g = Graph(pool); w = g.external(raw, type, ne0, n_rows); x_t, x = g.input(...);
    y = ops...; g.output(y); g.finish(); y_arr = g.array(y); then g.compute() as often as needed.
    """

    def __init__(self, pool: ThreadPool, max_nodes: int = 64):
        L = lib()
        self.pool = pool
        self.L = L
        self._keep = []  # memory the graph points at must outlive it
        # no_alloc contexts: they hold tensor headers only (ggml-alloc places the data)
        meta = L.tensor_overhead() * max_nodes + L.graph_overhead_custom(max_nodes, False)
        self.ctx = L.init(InitParams(meta + 4096, None, True))
        self.ext = L.init(InitParams(L.tensor_overhead() * max_nodes, None, True))
        if not self.ctx or not self.ext:
            raise MemoryError("ggml_init failed")
        self.graph = L.new_graph_custom(self.ctx, max_nodes, False)
        self.plan = None
        self._work = None
        self._galloc = None
        self._shared = None

    def external(self, data: np.ndarray, ggml_type: int, ne0: int, ne1: int = 1) -> TensorP:
        """A 2-D tensor whose data is `data` (not copied): weights, caches, input buffers."""
        t = self.L.new_tensor_2d(self.ext, ggml_type, ne0, ne1)
        nbytes = self.L.nbytes(t)
        if data.nbytes < nbytes or not data.flags.c_contiguous:
            raise ValueError(f"buffer of {data.nbytes} bytes cannot back a tensor of {nbytes}")
        t.contents.data = data.ctypes.data
        self._keep.append(data)
        return t

    def strided(self, data: np.ndarray, ggml_type: int, ne: tuple, nb: tuple) -> TensorP:
        """A 3-D tensor over `data` (a numpy array or view, not copied) with byte strides
        nb[1], nb[2] between rows and planes: a window of a cache, strided rows of a record."""
        t = self.L.new_tensor_3d(self.ext, ggml_type, *ne)
        t.contents.nb[1], t.contents.nb[2] = nb
        t.contents.nb[3] = nb[1] * ne[2]
        extent = (ne[2] - 1) * nb[1] + (ne[1] - 1) * nb[0] + self.L.row_size(ggml_type, ne[0])
        span = sum((n - 1) * st for n, st in zip(data.shape, data.strides)) + data.itemsize
        if min(data.strides) < 0 or extent > span:
            raise ValueError("strided tensor reaches past its buffer")
        t.contents.data = data.ctypes.data
        self._keep.append(data)
        return t

    def input(self, ne0: int, ne1: int = 1, dtype=np.float32, ggml_type: int = F32) -> tuple[TensorP, np.ndarray]:
        """An input tensor and the numpy array [ne1, ne0] to write it through."""
        buf = np.zeros((ne1, ne0), dtype=dtype)
        return self.external(buf, ggml_type, ne0, ne1), buf

    def expand(self, t: TensorP) -> TensorP:
        """Adds t and what it depends on to the graph, in order (ops run in the order added)."""
        self.L.build_forward_expand(self.graph, t)
        return t

    def output(self, t: TensorP) -> TensorP:
        """Marks t as a result: its memory is not reused by later ops. Read it with array()."""
        self.L.set_output(t)
        return self.expand(t)

    def array(self, t: TensorP) -> np.ndarray:
        """A numpy view [rows, ne0] of an F32 result (valid after finish())."""
        return as_array(t)

    def finish(self, shared: SharedActivations | None = None):
        """Places the activations (in `shared`'s buffer, for graphs that run one after another:
        SharedActivations.finish does it for all of them) and plans the computation."""
        L = self.L
        self._shared = shared
        self._galloc = shared.galloc if shared else L.gallocr_new(L.backend_cpu_buffer_type())
        if not L.gallocr_alloc_graph(self._galloc, self.graph):
            raise MemoryError("ggml could not allocate the graph's activations")
        self.plan = L.graph_plan(self.graph, self.pool.n_threads, self.pool.handle)
        if self.plan.work_size and shared is None:
            self._work = np.empty(self.plan.work_size + 64, dtype=np.uint8)
            self.plan.work_data = self._work.ctypes.data
        return self

    @property
    def activation_bytes(self) -> int:
        """Bytes of ggml-alloc's buffer (0 for a graph in a shared one: SharedActivations has it)."""
        return int(self.L.gallocr_get_buffer_size(self._galloc, 0)) if self._galloc and not self._shared else 0

    def compute(self):
        status = self.L.graph_compute(self.graph, C.byref(self.plan))
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute failed with status {status}")

    def close(self):
        if self.ctx:
            if self._galloc and not self._shared:
                self.L.gallocr_free(self._galloc)
            self._galloc = self._shared = None
            self.L.free(self.ctx)
            self.L.free(self.ext)
            self.ctx = self.ext = None

    def __del__(self):
        self.close()


class SharedActivations:
    """One activation buffer and one work buffer for graphs run one after another (a pass's
    layer graphs, kept between passes): the memory of one layer, not of every layer. Each
    graph's results are read (copied into the next one's input) before the next runs."""

    def __init__(self, graphs: list[Graph]):
        L = lib()
        self.galloc, self.work = L.gallocr_new(L.backend_cpu_buffer_type()), None
        for g in graphs:  # the largest need of any, so that placing one never moves the others
            if not L.gallocr_reserve(self.galloc, g.graph):
                raise MemoryError("ggml could not allocate the graphs' activations")
        size = self.nbytes
        for g in graphs:
            g.finish(self)
        if self.nbytes != size:
            raise RuntimeError("the shared activation buffer moved while graphs were placed in it")
        work = max((g.plan.work_size for g in graphs), default=0)
        self.work = np.empty(work + 64, dtype=np.uint8)
        for g in graphs:
            g.plan.work_data = self.work.ctypes.data
            g._keep.append(self)

    @property
    def nbytes(self) -> int:
        return int(lib().gallocr_get_buffer_size(self.galloc, 0)) if self.galloc else 0

    def close(self):
        if self.galloc:
            lib().gallocr_free(self.galloc)
            self.galloc = None

    def __del__(self):
        self.close()
