"""Several activation columns through one matrix, each column with the bits that ggml's
one-column product gives it, the weights brought into cache once for all of them (issue 36).

ggml picks its kernel by the number of columns (kernels.py): past a few, a token's column is
computed in a different order than alone, so exact batches used to multiply a few columns at a
time and read every weight once per group. Here every column goes through the function ggml
itself runs for a lone column (the repacked layout's gemv, or the type's vec_dot for plain
rows), found in ggml by name; a small C library (native/columns.c, built by scripts/setup.sh)
only orders the calls: a tile of rows, then every column over it while it is in cache. For the
types of the Q4_K_M models the issue measures it also has kernels of its own (native/q4_K_8x8.c
for ggml's repacked Q4_K, native/q6_K.c for plain Q6_K) that unpack a row's weights once for all
the columns and round exactly as ggml's one-column kernel does: the one-column kernel's cost is
mostly unpacking, so calling it per column saves reads but little time. It runs as two ggml
custom ops inside the graph, on ggml's threads, each thread its share of the rows.

Nothing here decides what the CPU can do: the layout of a repacked tensor is read from the
tensor (the C++ traits object ggml attached to it), and kernels.exact_columns checks the path's
bits against ggml's own one-column product before anything uses it. Where the library was not
built, does not match this ggml, or the check fails, callers keep the one-column groups.
"""

from __future__ import annotations

import ctypes as C
from functools import lru_cache
from pathlib import Path

from . import ggml
from .ggml_bindings import Q6_K, Tensor, TensorP

LIBRARY = Path(__file__).parent / "native" / "libcolumns.so"
ABI = 4  # FC_COLUMNS_ABI in columns.c: a library built from another version is not used
# A tile of weight rows stays in the per-core L2 while every column runs over it (2 MB on the
# Xeons measured, 256 KB on old desktops): small enough for the smallest, large enough that a
# gemv call covers many interleaved groups
TILE_BYTES = 128 << 10
ALL_THREADS = -1  # GGML_N_TASKS_MAX: a custom op runs on every thread of the graph's pool
VPTR_OFFSET = 2 * C.sizeof(C.c_void_p)  # Itanium C++ ABI: an object's vptr points past offset-to-top and typeinfo


class _Spec(C.Structure):
    """Mirror of `struct fc_columns` (columns.c): the kernels a product op calls."""

    _fields_ = [
        ("quantize", C.c_void_p),
        ("gemv", C.c_void_p),
        ("vec_dot", C.c_void_p),
        ("group", C.c_int64),
        ("tile_bytes", C.c_int64),
        ("fused", C.c_int64),
    ]


@lru_cache(maxsize=1)
def library() -> C.CDLL | None:
    """The built library, where it exists and agrees with flashcli's mirror of ggml_tensor."""
    if not LIBRARY.exists():
        return None
    try:
        lib = C.CDLL(str(LIBRARY))
        if lib.fc_columns_abi() != ABI:
            return None
        offsets = (C.c_int64 * 5)()
        lib.fc_tensor_offsets(offsets)
    except (OSError, AttributeError):
        return None
    mirror = [Tensor.ne.offset, Tensor.nb.offset, Tensor.src.offset, Tensor.data.offset, C.sizeof(Tensor)]
    return lib if list(offsets) == mirror else None


class ColumnKernel:
    """One kind of weight (a type, as plain rows or in one repacked layout) through the
    library's ops: w x for activations x [d, n], column by column on ggml's one-column kernel."""

    def __init__(self, ggml_type: int, gemv: int | None, group: int, tile_bytes: int = TILE_BYTES, fused: int = 0):
        L, lib = ggml.lib(), library()
        traits = L.get_type_traits_cpu(ggml_type).contents
        self.ggml_type = ggml_type
        self.activation_type = traits.vec_dot_type
        self.repacked = gemv is not None
        self.spec = _Spec(
            quantize=L.get_type_traits_cpu(self.activation_type).contents.from_float,
            gemv=gemv,
            vec_dot=None if gemv else traits.vec_dot,
            group=group,
            tile_bytes=tile_bytes,
            fused=fused,
        )
        self._quantize = C.cast(lib.fc_quantize_columns, C.c_void_p).value
        self._product = C.cast(lib.fc_product_columns, C.c_void_p).value

    @property
    def usable(self) -> bool:
        return bool(self.spec.quantize and (self.spec.gemv or self.spec.vec_dot))

    def quantize(self, g: ggml.Graph, x: TensorP) -> TensorP:
        """x [d, n] float32 -> its columns in the activation type, as ggml quantizes one alone."""
        d, n = x.contents.ne[0], x.contents.ne[1]
        args = (TensorP * 1)(x)
        return g.L.custom_4d(
            g.ctx, self.activation_type, d, n, 1, 1, args, 1, self._quantize, ALL_THREADS, C.addressof(self.spec)
        )

    def product(self, g: ggml.Graph, w: TensorP, xq: TensorP) -> TensorP:
        """w [d, rows] times quantized columns xq (quantize()) -> [rows, n] float32."""
        args = (TensorP * 2)(w, xq)
        rows, n = w.contents.ne[1], xq.contents.ne[1]
        return g.L.custom_4d(
            g.ctx, ggml.F32, rows, n, 1, 1, args, 2, self._product, ALL_THREADS, C.addressof(self.spec)
        )

    def __call__(self, g: ggml.Graph, w: TensorP, x: TensorP) -> TensorP:
        """w x, each column with its one-column bits: a lone column on ggml's own one-column
        product (the very bits, and never slower than ours), several on the library."""
        if x.contents.ne[1] == 1:
            return g.L.mul_mat(g.ctx, w, x)
        return self.product(g, w, self.quantize(g, x))


def layout(w: TensorP) -> int | None:
    """Which repacked layout ggml gave w (the address of its traits' vtable), None for plain rows."""
    extra = w.contents.extra
    return C.c_void_p.from_address(extra).value - VPTR_OFFSET if extra else None


def kernels(ggml_type: int, repacked_layout: int | None, tile_bytes: int = TILE_BYTES) -> list[ColumnKernel]:
    """The library's kernels for weights of this type and layout, fastest first, unchecked
    (kernels.exact_columns takes the first whose bits match): our own (Q4_K in ggml's 8x8
    layout, plain Q6_K; on AVX-512, then on AVX2) where the CPU runs them, then ggml's one-column
    kernel called column by column. Empty where the library is missing or ggml exports no
    one-column kernel for it."""
    lib = library()
    if lib is None:
        return []
    if repacked_layout is None:
        gemv, group = None, 1
        ours = OUR_Q6_K if ggml_type == Q6_K else {}
        runs = lib.fc_q6_K_kernels() if ours else 0
    else:
        found = _repacked_gemv(ggml_type, repacked_layout)
        if found is None:
            return []
        gemv, group, args = found
        ours = OUR_Q4_K_8X8 if args == Q4_K_8X8 else {}
        runs = lib.fc_q4_K_8x8_kernels() if ours else 0
    mine = [ColumnKernel(ggml_type, gemv, group, tile_bytes, fused=f) for bit, f in ours.items() if runs & bit]
    return [k for k in [*mine, ColumnKernel(ggml_type, gemv, group, tile_bytes)] if k.usable]


def kernel(ggml_type: int, repacked_layout: int | None, tile_bytes: int = TILE_BYTES, fused: bool = False):
    """The first kernel of kernels() that is (fused) or is not our own, or None."""
    return next((k for k in kernels(ggml_type, repacked_layout, tile_bytes) if bool(k.spec.fused) == fused), None)


# our kernels (columns.c's `fused`) by the bit of fc_*_kernels() that says the CPU runs them, fastest first
OUR_Q4_K_8X8 = {2: 3, 1: 1}  # AVX-512 VNNI, AVX2
OUR_Q6_K = {4: 5, 2: 4, 1: 2}  # AVX-512 VNNI, AVX-512, AVX2


# ggml's repacked layouts are instances of template<block type, INTER_SIZE, NB_COLS, activation
# type> tensor_traits; the same arguments name the gemv it runs a lone column on
# (ggml-cpu/repack.cpp). Both are exported; the instance ggml attached is found by its vtable.
INTERLEAVES = (1, 2, 4, 8, 16)  # INTER_SIZE, and NB_COLS (rows interleaved), as ggml's instances use
Q4_K_8X8 = "10block_q4_KLl8ELl8EL9ggml_type15E"  # the layout q4_K_8x8.c reads (Q8_K activations)


def _repacked_gemv(ggml_type: int, vtable: int) -> tuple[int, int, str] | None:
    """(gemv address, rows interleaved, template arguments) of the repacked layout whose vtable
    is at `vtable`."""
    L = ggml.lib()
    block = "block_" + ggml.type_traits(ggml_type).type_name.decode()
    activation = L.get_type_traits_cpu(ggml_type).contents.vec_dot_type
    for inter in INTERLEAVES:
        for cols in INTERLEAVES:
            args = f"{len(block)}{block}Ll{inter}ELl{cols}EL9ggml_type{activation}E"
            if _symbol(f"_ZTVN4ggml3cpu6repack13tensor_traitsI{args}EE") != vtable:
                continue
            gemv = _symbol(f"_ZN4ggml3cpu6repack4gemvI{args}EEviPfmPKvS7_ii")
            return (gemv, cols, args) if gemv else None
    return None


def _symbol(name: str) -> int | None:
    try:
        return C.cast(getattr(ggml.lib().cpu_library, name), C.c_void_p).value
    except AttributeError:
        return None
