"""ctypes bindings to the ggml libraries that llama-cpp-python ships: mirrors of the structs
flashcli touches (checked against the library at load) and the functions it calls, bound once
per process by lib(). Only what flashcli uses is bound; ggml.py builds on them.
"""

from __future__ import annotations

import ctypes as C
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

from gguf import GGMLQuantizationType as Q

GGML_MAX_DIMS = 4
GGML_MAX_OP_PARAMS = 64
GGML_MAX_SRC = 10
GGML_MAX_NAME = 64
GGML_MAX_N_THREADS = 512

PREC_F32 = 10  # enum ggml_prec: accumulate in float32 (ggml_prec_set_acc)
F32, F16, BF16, I8, I32, I64 = (int(t) for t in (Q.F32, Q.F16, Q.BF16, Q.I8, Q.I32, Q.I64))
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


class TypeTraitsCPU(C.Structure):
    """Mirror of `struct ggml_type_traits_cpu` (ggml-cpu.h): the kernels ggml-cpu runs for a type."""

    _fields_ = [("from_float", C.c_void_p), ("vec_dot", C.c_void_p), ("vec_dot_type", C.c_int), ("nrows", C.c_int64)]


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
        for name in ("cont", "transpose", "tanh", "swiglu"):
            setattr(self, name, _bind(base, "ggml_" + name, T, p, T))
        # mixtures of experts (llama.cpp's build_moe_ffn)
        for name in ("soft_max", "sum_rows", "silu"):
            setattr(self, name, _bind(base, "ggml_" + name, T, p, T))
        self.div = _bind(base, "ggml_div", T, p, T, T)
        self.mul_mat_id = _bind(base, "ggml_mul_mat_id", T, p, T, T, T)
        self.clamp = _bind(base, "ggml_clamp", T, p, T, f32, f32)
        self.argsort_top_k = _bind(base, "ggml_argsort_top_k", T, p, T, C.c_int)
        self.set_rows = _bind(base, "ggml_set_rows", T, p, T, T, T)
        self.concat = _bind(base, "ggml_concat", T, p, T, T, C.c_int)
        self.set_2d_inplace = _bind(base, "ggml_set_2d_inplace", T, p, T, T, sz, sz)
        self.scale = _bind(base, "ggml_scale", T, p, T, f32)
        self.rms_norm = _bind(base, "ggml_rms_norm", T, p, T, f32)
        self.soft_max_ext = _bind(base, "ggml_soft_max_ext", T, p, T, T, f32, f32)
        self.permute = _bind(base, "ggml_permute", T, p, T, C.c_int, C.c_int, C.c_int, C.c_int)
        self.cont_2d = _bind(base, "ggml_cont_2d", T, p, T, i64, i64)
        self.reshape_2d = _bind(base, "ggml_reshape_2d", T, p, T, i64, i64)
        self.reshape_3d = _bind(base, "ggml_reshape_3d", T, p, T, i64, i64, i64)
        self.view_2d = _bind(base, "ggml_view_2d", T, p, T, i64, i64, sz, sz)
        # ops that run our own code (columns.py): (ctx, type, ne0..ne3, args, n_args, fun, n_tasks, userdata)
        self.custom_4d = _bind(
            base, "ggml_custom_4d", T, p, C.c_int, i64, i64, i64, i64, C.POINTER(T), C.c_int, p, C.c_int, p
        )
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
        self.prec_set_acc = _bind(base, "ggml_prec_set_acc", C.c_bool, T, C.c_int)
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
        # running graphs on another backend (gpu.py): CUDA's
        self.backend_tensor_get = _bind(base, "ggml_backend_tensor_get", None, T, p, sz, sz)
        self.backend_graph_compute = _bind(base, "ggml_backend_graph_compute", C.c_int, p, p)
        self.backend_graph_compute_async = _bind(base, "ggml_backend_graph_compute_async", C.c_int, p, p)
        self.backend_tensor_set_async = _bind(base, "ggml_backend_tensor_set_async", None, p, T, p, sz, sz)
        self.backend_tensor_get_async = _bind(base, "ggml_backend_tensor_get_async", None, p, T, p, sz, sz)
        self.backend_synchronize = _bind(base, "ggml_backend_synchronize", None, p)
        self.backend_free = _bind(base, "ggml_backend_free", None, p)
        self.backend_buft_get_alloc_size = _bind(base, "ggml_backend_buft_get_alloc_size", sz, p, T)
        self.backend_cpu_init = _bind(cpu, "ggml_backend_cpu_init", p)
        self.backend_cpu_set_n_threads = _bind(cpu, "ggml_backend_cpu_set_n_threads", None, p, C.c_int)
        self.cpu_init = _bind(cpu, "ggml_cpu_init", None)
        self.get_type_traits_cpu = _bind(cpu, "ggml_get_type_traits_cpu", C.POINTER(TypeTraitsCPU), C.c_int)
        self.cpu_library = cpu  # ggml-cpu's exported kernels, looked up by name (columns.py)
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
