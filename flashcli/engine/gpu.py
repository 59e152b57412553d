"""ggml's CUDA backend (--gpu): where a graph runs is decided once, at load, by a Device.

A Device holds the CUDA backend and the tensors resident in GPU memory: the weights and the KV
caches, uploaded once and found again by the host memory they mirror. Under a GPU budget smaller
than the weights, the matrices of the last layers stay in host memory (the mapped file) and
stream: the model then runs a graph per layer, and a streamed layer's matrices are inputs of its
graph, copied into one staging area shared by all graphs right before the layer runs, once per
pass for all of the pass's tokens. Where the host has the memory, the streamed matrices are first
copied into page-locked (pinned) host memory: the GPU's copy engine reads those at the bus's full
speed, where a copy from pageable memory (the mapped file) goes through a driver bounce buffer at
a fraction of it. ggml.Graph builds the same
graph for the CPU and the GPU: on a Device, an `external` array that is resident becomes its
GPU tensor, any other one an input uploaded before each run (token embeddings, positions, masks),
the activations are placed in GPU memory by ggml-alloc, and the outputs come back after the run.
The CUDA backend is llama-cpp-python's libggml-cuda.so, present only in a CUDA build
(`make setup GPU=cuda`): without it, --gpu is a usage error.
"""

from __future__ import annotations

import ctypes as C
import os
import time

import numpy as np

from ..errors import BudgetTooSmall, NoGpu
from .ggml_bindings import InitParams, TensorP, _bind, _library_dir, _soname, lib

SETUP_HINT = "make setup GPU=cuda on a machine with an NVIDIA GPU and nvcc"
ALIGN = 256  # of tensors placed in the staging area (CUDA buffers align to 128)
STAGING_SLACK = 64 << 20  # staging beyond a layer's matrices: a pass's small inputs (x, masks, positions)
PIN_SHARE = 0.5  # of the host's available memory that page-locked copies of streamed matrices may take


def cuda_library():
    """The path of llama-cpp-python's CUDA backend library, or None (a CPU build)."""
    try:
        libdir = _library_dir()
    except ImportError:
        return None
    path = _soname(libdir, "libggml-cuda.so")
    return path if path.exists() else None


class _Cuda:
    """The CUDA backend's entry points, bound once."""

    def __init__(self, path):
        so = C.CDLL(str(path), mode=getattr(os, "RTLD_GLOBAL", 0))
        p = C.c_void_p
        self.device_count = _bind(so, "ggml_backend_cuda_get_device_count", C.c_int)
        self.init = _bind(so, "ggml_backend_cuda_init", p, C.c_int)
        self.buffer_type = _bind(so, "ggml_backend_cuda_buffer_type", p, C.c_int)
        self.host_buffer_type = _bind(so, "ggml_backend_cuda_host_buffer_type", p)
        self.description = _bind(so, "ggml_backend_cuda_get_device_description", None, C.c_int, C.c_char_p, C.c_size_t)
        self.memory = _bind(
            so, "ggml_backend_cuda_get_device_memory", None, C.c_int, C.POINTER(C.c_size_t), C.POINTER(C.c_size_t)
        )


_cuda = None


def cuda() -> _Cuda:
    """The CUDA backend, or NoGpu (one line, exit status 2) where there is none."""
    global _cuda
    if _cuda is None:
        path = cuda_library()
        if path is None:
            raise NoGpu(f"--gpu: this llama-cpp-python was built without CUDA ({SETUP_HINT})")
        lib()  # the base and CPU libraries first: the CUDA one links against them
        _cuda = _Cuda(path)
    if _cuda.device_count() < 1:
        raise NoGpu("--gpu: no CUDA device found")
    return _cuda


class Device:
    """The GPU a model runs on: its backend, buffer types, and the tensors resident there,
    by the address and size of the host memory each mirrors."""

    def __init__(self, index: int = 0, budget: int | None = None, cpu_backend: bool = False):
        """CUDA device `index`; cpu_backend: ggml's CPU backend behind the same seam instead
        (tests run this module's code where there is no GPU)."""
        self.L = lib()
        self.budget = budget  # bytes of weights the GPU may hold (None: all of them)
        self.streamed: set[int] = set()  # layers whose matrices stream (load())
        self._staging = None  # (buffer, base address, size): the streamed layers' inputs
        self._pinned: dict[tuple, np.ndarray] = {}  # (host address, bytes) -> its page-locked copy
        self.pinned_bytes = 0
        self.index = index
        if cpu_backend:
            self.cu, self.backend = None, self.L.backend_cpu_init()
            self.L.backend_cpu_set_n_threads(self.backend, 2)
            self.buft, self.name = self.L.backend_cpu_buffer_type(), "CPU (ggml backend)"
        else:
            self.cu = cuda()
            self.backend = self.cu.init(index)
            if not self.backend:
                raise NoGpu(f"--gpu: CUDA device {index} could not be initialised")
            self.buft = self.cu.buffer_type(index)
            desc = C.create_string_buffer(256)
            self.cu.description(index, desc, 256)
            self.name = desc.value.decode(errors="replace")
        self._resident: dict[tuple, TensorP] = {}  # (host address, type, ne0, ne1) -> GPU tensor
        self._contexts, self._buffers = [], []
        self.resident_bytes = 0
        self.upload_bytes = 0  # bytes copied host -> GPU by graph runs (inputs)
        self.upload_s = 0.0
        self.compute_s = 0.0

    def memory(self) -> tuple[int, int]:
        """(free, total) bytes of GPU memory."""
        free, total = C.c_size_t(), C.c_size_t()
        if self.cu is None:
            return 0, 0
        self.cu.memory(self.index, C.byref(free), C.byref(total))
        return free.value, total.value

    def load(self, weights, states):
        """Makes the weights and the KV caches of `states` resident, but for the matrices of the
        last layers where the budget does not hold them all (they stream: place_inputs)."""
        n_layers = len(weights.layers)
        layer = [weights.layer_bytes(i) for i in range(n_layers)]
        fixed = sum(a[0].nbytes for a in weights.arrays(skip_layers=range(n_layers)))
        if self.budget is not None and self.budget < fixed + sum(layer):
            room = self.budget - fixed - max(layer)  # one layer's matrices are staged at a time
            if room < 0:
                raise BudgetTooSmall(
                    f"--gpu-budget {self.budget >> 20} MiB: the head, norms and one layer's matrices need "
                    f"{(fixed + max(layer)) >> 20} MiB"
                )
            resident = int(np.searchsorted(np.cumsum(layer), room, side="right"))
            self.streamed = set(range(resident, n_layers))
            size = max(layer) + STAGING_SLACK
            ctx = self.L.init(InitParams(self.L.tensor_overhead() + 1024, None, True))
            blob = self.L.new_tensor_2d(ctx, 24, size, 1)  # I8: raw bytes
            buffer = self.L.backend_alloc_ctx_tensors_from_buft(ctx, self.buft)
            if not buffer:
                raise MemoryError(f"could not allocate {size >> 20} MiB of GPU memory to stage streamed layers")
            self._contexts.append(ctx)
            self._buffers.append(buffer)
            self._staging = (buffer, blob.contents.data, size)
            self._pin([weights.layer_matrices(i) for i in sorted(self.streamed)])
        self.hold(weights.arrays(skip_layers=sorted(self.streamed)) + [a for s in states for a in s.arrays()])

    def _pin(self, layers: list[list[np.ndarray]]):
        """Page-locked copies of the streamed layers' matrices (ggml's CUDA host buffer type:
        cudaMallocHost), in one buffer; none where they would take more than PIN_SHARE of the
        host's available memory, or the allocation fails (the copies then read the mapped file)."""
        arrays = [a for layer in layers for a in layer]
        total = sum(-(-a.nbytes // ALIGN) * ALIGN for a in arrays)
        if self.cu is None or not arrays or total > PIN_SHARE * _available_host_memory():
            return
        buffer = self.L.backend_buft_alloc_buffer(self.cu.host_buffer_type(), total)
        if not buffer:
            return
        self._buffers.append(buffer)
        base = self.L.backend_buffer_get_base(buffer)
        pinned = np.ctypeslib.as_array((C.c_uint8 * total).from_address(base))
        offset = 0
        for a in arrays:
            view = pinned[offset : offset + a.nbytes]
            view[...] = a.reshape(-1).view(np.uint8)
            self._pinned[(a.ctypes.data, a.nbytes)] = view
            offset += -(-a.nbytes // ALIGN) * ALIGN
        self.pinned_bytes = total

    def host_copy(self, data: np.ndarray) -> np.ndarray:
        """The array a graph's input is copied up from: its page-locked copy where it has one."""
        return self._pinned.get((data.ctypes.data, data.nbytes), data)

    def place_inputs(self, tensors: list):
        """Places a graph's inputs in the staging area and returns its buffer (None where there
        is none, or it is too small: the graph then gets a buffer of its own). Graphs run one at
        a time and copy their inputs up right before they run, so they all share it."""
        if self._staging is None:
            return None
        buffer, base, size = self._staging
        offsets, end = [], 0
        for t in tensors:
            offsets.append(end)
            end += -(-int(self.L.backend_buft_get_alloc_size(self.buft, t)) // ALIGN) * ALIGN
        if end > size:
            return None
        for t, offset in zip(tensors, offsets):
            if self.L.backend_tensor_alloc(buffer, t, base + offset) != 0:
                raise RuntimeError("ggml_backend_tensor_alloc failed in the GPU staging area")
        return buffer

    def hold(self, arrays: list[tuple[np.ndarray, int, int, int]]):
        """Makes resident, in one GPU buffer, each (host array, ggml type, ne0, ne1): uploaded
        now, used by graphs in place of the host array from then on (weights; KV caches, which
        the graphs then write on the GPU only)."""
        arrays = [a for a in arrays if self._key(*a) not in self._resident]
        if not arrays:
            return
        L = self.L
        ctx = L.init(InitParams(L.tensor_overhead() * len(arrays) + 1024, None, True))
        tensors = [L.new_tensor_2d(ctx, t, ne0, ne1) for _, t, ne0, ne1 in arrays]
        buffer = L.backend_alloc_ctx_tensors_from_buft(ctx, self.buft)
        if not buffer:
            L.free(ctx)
            raise MemoryError(f"could not allocate {sum(a[0].nbytes for a in arrays) >> 20} MiB of GPU memory")
        self._contexts.append(ctx)
        self._buffers.append(buffer)
        self.resident_bytes += int(L.backend_buffer_get_size(buffer))
        for (data, t, ne0, ne1), tensor in zip(arrays, tensors):
            data = np.ascontiguousarray(data)
            nbytes = L.nbytes(tensor)
            if data.nbytes < nbytes:
                raise ValueError(f"buffer of {data.nbytes} bytes cannot back a tensor of {nbytes}")
            L.backend_tensor_set(tensor, data.ctypes.data, 0, nbytes)
            self._resident[self._key(data, t, ne0, ne1)] = tensor

    @staticmethod
    def _key(data: np.ndarray, ggml_type: int, ne0: int, ne1: int) -> tuple:
        return (data.ctypes.data, int(ggml_type), int(ne0), int(ne1))

    def resident(self, data: np.ndarray, ggml_type: int, ne0: int, ne1: int) -> TensorP | None:
        return self._resident.get(self._key(data, ggml_type, ne0, ne1))

    def compute(self, graph, outputs: list) -> None:
        """Runs graph after the copies queued before it, then copies each (tensor, host array)
        of `outputs` down; returns when they are in host memory."""
        L, t = self.L, time.perf_counter()
        status = L.backend_graph_compute_async(self.backend, graph)
        if status != 0:
            L.backend_synchronize(self.backend)
            raise RuntimeError(f"ggml_backend_graph_compute failed on the GPU with status {status}")
        for tensor, host in outputs:
            L.backend_tensor_get_async(self.backend, tensor, host.ctypes.data, 0, host.nbytes)
        L.backend_synchronize(self.backend)
        self.compute_s += time.perf_counter() - t

    def telemetry(self) -> dict:
        return {
            "gpu": self.name,
            "gpu_resident_bytes": self.resident_bytes,
            "gpu_streamed_layers": len(self.streamed),
            "gpu_staging_bytes": self._staging[2] if self._staging else 0,
            "gpu_pinned_host_bytes": self.pinned_bytes,
            "gpu_upload_bytes": self.upload_bytes,
            "gpu_upload_s": round(self.upload_s, 4),  # queuing the copies up (they run with the graph)
            "gpu_compute_s": round(self.compute_s, 4),  # copies, graphs and results down, waited for
        }

    def close(self):
        for buffer in self._buffers:
            self.L.backend_buffer_free(buffer)
        for ctx in self._contexts:
            self.L.free(ctx)
        self._buffers, self._contexts, self._resident, self._pinned = [], [], {}, {}
        if self.backend:
            self.L.backend_free(self.backend)
            self.backend = None


def _available_host_memory() -> int:
    """Bytes of host memory available now (MemAvailable; all physical memory where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
