"""What flashcli runs in ggml: quant types as data (row sizes, quantize and dequantize rows)
and a small graph runner (graphs of matrix products and elementwise ops over tensors whose
data live in our own memory: memory-mapped weights, numpy buffers), on a persistent thread
pool. Quantized matrix work thus runs in llama.cpp's own kernels. The ctypes bindings
underneath are ggml_bindings.py.
"""

from __future__ import annotations

import ctypes as C
import os
import time

import numpy as np

from .ggml_bindings import (  # noqa: F401  (the bindings' names flashcli uses, through this module)
    F16,
    F32,
    I8,
    I32,
    I64,
    Q8_0,
    TO_FLOAT,
    InitParams,
    TensorP,
    TypeTraits,
    lib,
)

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


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS)
        return os.cpu_count() or 1


class ThreadPool:
    """A persistent ggml thread pool; graphs run on it without spawning threads per call.
    n_threads None (or 0): a thread per core this process may run on."""

    def __init__(self, n_threads: int | None = None):
        self.n_threads = max(1, int(n_threads or available_cores()))
        params = lib().threadpool_params_default(self.n_threads)
        params.poll = 0  # sleep between graphs: numpy runs on the same cores in between
        self.handle = lib().threadpool_new(C.byref(params))

    def close(self):
        if self.handle:
            lib().threadpool_free(self.handle)
            self.handle = None

    def __del__(self):
        self.close()


def join_columns(g: Graph, parts: list) -> TensorP:
    """F32 tensors [ne0, n_i] side by side, [ne0, sum n_i]. On the CPU each is set into its place
    in one tensor (ggml_set_2d_inplace: every column copied once); on a GPU, where ggml may lack
    that op, joined in pairs, then pairs of pairs (each column copied log2(len(parts)) times).
    Joining them one after another copied the first columns once per later part: ggml_concat
    took 6% of the 8B's batch run."""
    if len(parts) == 1:
        return parts[0]
    L, ctx = g.L, g.ctx
    if g.device is None:
        out = L.new_tensor_2d(ctx, F32, parts[0].contents.ne[0], sum(p.contents.ne[1] for p in parts))
        nb1 = out.contents.nb[1]
        at = 0
        for p in parts:
            out = L.set_2d_inplace(ctx, out, p, nb1, at * nb1)
            at += p.contents.ne[1]
        return out
    while len(parts) > 1:
        pairs = range(0, len(parts) - 1, 2)
        parts = [L.concat(ctx, parts[i], parts[i + 1], 1) for i in pairs] + parts[len(parts) // 2 * 2 :]
    return parts[0]


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

    On a `device` (gpu.Device) the same graph runs on the GPU: external arrays resident there
    are their GPU tensors, other ones inputs copied up before each run, the outputs' arrays
    copied down after it.
    """

    def __init__(self, pool: ThreadPool, max_nodes: int = 64, device=None):
        L = lib()
        self.pool = pool
        self.device = device
        self._inputs = []  # on a device: (tensor, host array, page-locked) copied up before each run
        self._input_tensors = {}  # on a device: (host address, bytes, type, shape) -> its input tensor
        self._pack = None  # on a device: (host buffer, tensor over the GPU range, [(offset, array)])
        self._pack_ctx = None
        self._outputs = {}  # on a device: tensor address -> (tensor, host array) copied down after
        self._input_buffer = None
        self.L = L
        self._keep = []  # memory the graph points at must outlive it
        # no_alloc contexts: they hold tensor headers only (ggml-alloc places the data)
        meta = L.tensor_overhead() * max_nodes + L.graph_overhead_custom(max_nodes, False)
        self.ctx = L.init(InitParams(meta + 4096, None, True))
        self.ext = L.init(InitParams(L.tensor_overhead() * max_nodes, None, True))
        if not self.ctx or not self.ext:
            raise MemoryError("ggml_init failed")
        self.graph = L.new_graph_custom(self.ctx, max_nodes, False)
        # tensors pointed at new bytes before each run, by name (weight_stream's streamed matrices)
        self.placeholders: dict[str, TensorP] = {}
        self.plan = None
        self._work = None
        self._galloc = None
        self._shared = None

    def external(self, data: np.ndarray, ggml_type: int, ne0: int, ne1: int = 1, ne2: int = 1) -> TensorP:
        """A 2-D tensor (3-D with ne2 > 1: a stack of matrices, experts) whose data is `data` (not
        copied): weights, caches, input buffers."""
        if self.device is not None and ne2 == 1:
            resident = self.device.resident(data, ggml_type, ne0, ne1)
            if resident is not None:
                return resident
        key = (data.ctypes.data, data.nbytes, int(ggml_type), ne0, ne1, ne2)
        if self.device is not None and key in self._input_tensors:  # a mask in every layer: one copy
            return self._input_tensors[key]
        if ne2 > 1:
            t = self.L.new_tensor_3d(self.ext, ggml_type, ne0, ne1, ne2)
        else:
            t = self.L.new_tensor_2d(self.ext, ggml_type, ne0, ne1)
        # experts laid out as records (expert_records.py): [ne2, an expert's bytes], a record apart
        strided = ne2 > 1 and data.ndim == 2 and data.shape[0] == ne2 and data.strides[1] == 1
        if strided and self.device is None:
            t.contents.nb[2] = data.strides[0]
        nbytes = self.L.nbytes(t) if not strided else data.shape[1] * ne2
        if data.nbytes < nbytes or not (data.flags.c_contiguous or strided and self.device is None):
            raise ValueError(f"buffer of {data.nbytes} bytes cannot back a tensor of {nbytes}")
        if self.device is not None:  # placed in GPU memory by finish(), filled by compute()
            source = self.device.host_copy(data)
            self._inputs.append((t, source, source is not data))
            self._input_tensors[key] = t
            self._keep.append(data)
            return t
        t.contents.data = data.ctypes.data
        self._keep.append(data)
        return t

    def strided(self, data: np.ndarray, ggml_type: int, ne: tuple, nb: tuple) -> TensorP:
        """A 3-D tensor over `data` (a numpy array or view, not copied) with byte strides
        nb[1], nb[2] between rows and planes: a window of a cache, strided rows of a record."""
        if self.device is not None:
            raise NotImplementedError("strided host tensors do not run on the GPU")
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
        if self.device is not None:
            self._outputs[C.addressof(t.contents)] = (t, None)
        return self.expand(t)

    def array(self, t: TensorP) -> np.ndarray:
        """A numpy view [rows, ne0] of an F32 result (valid after finish())."""
        if self.device is not None:
            return self._outputs[C.addressof(t.contents)][1]
        return as_array(t)

    def finish(self, shared: SharedActivations | None = None):
        """Places the activations (in `shared`'s buffer, for graphs that run one after another:
        SharedActivations.finish does it for all of them) and plans the computation."""
        L = self.L
        if self.device is not None:
            return self._finish_on_device(shared)
        self._shared = shared
        self._galloc = shared.galloc if shared else L.gallocr_new(L.backend_cpu_buffer_type())
        if not L.gallocr_alloc_graph(self._galloc, self.graph):
            raise MemoryError("ggml could not allocate the graph's activations")
        self.plan = L.graph_plan(self.graph, self.pool.n_threads, self.pool.handle)
        if self.plan.work_size and shared is None:
            self._work = np.empty(self.plan.work_size + 64, dtype=np.uint8)
            self.plan.work_data = self._work.ctypes.data
        return self

    def _finish_on_device(self, shared):
        L, dev = self.L, self.device
        self._inputs.sort(key=lambda i: i[2])  # the small inputs first, side by side: see _pack_inputs
        buffer = dev.place_inputs([t for t, _, _ in self._inputs]) if self._inputs else None
        if self._inputs and buffer is None:
            buffer = self._input_buffer = L.backend_alloc_ctx_tensors_from_buft(self.ext, dev.buft)
            if not self._input_buffer:
                raise MemoryError("could not allocate a graph's inputs in GPU memory")
        self._pack_inputs(buffer)
        self._shared = shared
        self._galloc = shared.galloc if shared else L.gallocr_new(dev.buft)
        if not L.gallocr_alloc_graph(self._galloc, self.graph):
            raise MemoryError("ggml could not allocate the graph's activations in GPU memory")
        for key, (t, _) in self._outputs.items():
            ne = list(t.contents.ne)
            self._outputs[key] = (t, np.zeros((int(np.prod(ne[1:])), ne[0]), np.float32))
        return self

    def _pack_inputs(self, buffer):
        """The small inputs (all but page-locked weights: token rows, masks, positions, some
        hundred a layer for a pass of many sequences) go up as one copy of the GPU range they
        occupy, gathered in a host buffer laid out as that range: one copy costs what one small
        copy costs (microseconds), where some ten thousand a pass took tens of milliseconds."""
        small = [(t, data) for t, data, pinned in self._inputs if not pinned]
        if len(small) < 2:
            return
        L = self.L
        lo = min(t.contents.data for t, _ in small)
        hi = max(t.contents.data + L.nbytes(t) for t, _ in small)
        self._pack_ctx = L.init(InitParams(L.tensor_overhead() + 256, None, True))
        span = L.new_tensor_2d(self._pack_ctx, I8, hi - lo, 1)
        if L.backend_tensor_alloc(buffer, span, lo) != 0:
            raise RuntimeError("ggml_backend_tensor_alloc failed over a graph's inputs")
        parts = [(t.contents.data - lo, data.reshape(-1).view(np.uint8)[: L.nbytes(t)]) for t, data in small]
        self._pack = (np.zeros(hi - lo, np.uint8), span, parts)
        self._inputs = [i for i in self._inputs if i[2]]

    @property
    def activation_bytes(self) -> int:
        """Bytes of ggml-alloc's buffer (0 for a graph in a shared one: SharedActivations has it)."""
        return int(self.L.gallocr_get_buffer_size(self._galloc, 0)) if self._galloc and not self._shared else 0

    def compute(self):
        if self.device is not None:
            return self._compute_on_device()
        status = self.L.graph_compute(self.graph, C.byref(self.plan))
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute failed with status {status}")

    def _compute_on_device(self):
        """Inputs up, the graph, outputs down: all queued on the GPU's stream, one wait at the
        end (a wait per copy cost tens of microseconds each, some ten copies a layer)."""
        L, dev = self.L, self.device
        start = time.perf_counter()
        if self._pack is not None:
            host, span, parts = self._pack
            for offset, data in parts:
                host[offset : offset + len(data)] = data
            L.backend_tensor_set_async(dev.backend, span, host.ctypes.data, 0, host.nbytes)
            dev.upload_bytes += host.nbytes
        for t, data, _ in self._inputs:
            n = L.nbytes(t)
            L.backend_tensor_set_async(dev.backend, t, data.ctypes.data, 0, n)
            dev.upload_bytes += n
        dev.upload_s += time.perf_counter() - start
        dev.compute(self.graph, list(self._outputs.values()))

    def close(self):
        if self._pack_ctx:
            self.L.free(self._pack_ctx)
            self._pack_ctx = self._pack = None
        if self._input_buffer:
            self.L.backend_buffer_free(self._input_buffer)
            self._input_buffer = None
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
        device = graphs[0].device if graphs else None
        buft = device.buft if device is not None else L.backend_cpu_buffer_type()
        self.galloc, self.work = L.gallocr_new(buft), None
        for g in graphs:  # the largest need of any, so that placing one never moves the others
            if not L.gallocr_reserve(self.galloc, g.graph):
                raise MemoryError("ggml could not allocate the graphs' activations")
        size = self.nbytes
        for g in graphs:
            g.finish(self)
        if self.nbytes != size:
            raise RuntimeError("the shared activation buffer moved while graphs were placed in it")
        if device is not None:  # the GPU's kernels need no work buffer
            for g in graphs:
                g._keep.append(self)
            return
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


def glu(g: Graph, activation: str, gate: TensorP, up: TensorP) -> TensorP:
    """act(gate) * up, in ggml's fused op for the activation (as llama.cpp's graphs)."""
    op = {"silu": g.L.swiglu_split, "gelu": g.L.geglu_split, "relu": g.L.reglu_split}[activation]
    return op(g.ctx, gate, up)
