"""ggml's CUDA backend (--gpu): where a graph runs is decided once, at load, by a Device.

A Device holds the CUDA backend and the tensors resident in GPU memory: the weights and the KV
caches, uploaded once and found again by the host memory they mirror. ggml.Graph builds the same
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

from .errors import NoGpu
from .ggml_bindings import InitParams, TensorP, _bind, _library_dir, _soname, lib

SETUP_HINT = "make setup GPU=cuda on a machine with an NVIDIA GPU and nvcc"


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

    def __init__(self, index: int = 0):
        self.cu = cuda()
        self.L = lib()
        self.index = index
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
        self.cu.memory(self.index, C.byref(free), C.byref(total))
        return free.value, total.value

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

    def compute(self, graph) -> None:
        t = time.perf_counter()
        status = self.L.backend_graph_compute(self.backend, graph)
        self.compute_s += time.perf_counter() - t
        if status != 0:
            raise RuntimeError(f"ggml_backend_graph_compute failed on the GPU with status {status}")

    def telemetry(self) -> dict:
        return {
            "gpu": self.name,
            "gpu_resident_bytes": self.resident_bytes,
            "gpu_upload_bytes": self.upload_bytes,
            "gpu_upload_s": round(self.upload_s, 4),
            "gpu_compute_s": round(self.compute_s, 4),
        }

    def close(self):
        for buffer in self._buffers:
            self.L.backend_buffer_free(buffer)
        for ctx in self._contexts:
            self.L.free(ctx)
        self._buffers, self._contexts, self._resident = [], [], {}
        if self.backend:
            self.L.backend_free(self.backend)
            self.backend = None
