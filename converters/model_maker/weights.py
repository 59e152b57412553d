"""Random weights for a tensor plan, made chunk by chunk.

A matrix is a random arrangement of 256-value units drawn from a pool of up to 2^14 units of
standard normal values (scaled to the tensor's std; as many units as the largest tensor of that
std and type holds, so a tiny model quantizes no more than its own size), each unit converted
to the tensor's ggml type once,
by ggml's own quantizer (ggml_quantize_chunk, as llama-quantize does). Quantizing every value of
an 8B model at Q4_K costs tens of minutes on two cores; picking quantized units costs a copy.
Every ggml type quantizes blocks of 32 or 256 values independently, so the bytes are exactly
those ggml would give for the same float32 values (tests/test_model_maker.py checks it against
llama.cpp's quantizer on the F32 file). Rows are distinct random combinations of units (a 4096
wide row is 16 of 16384), at the scale the plan asks for.

Generators are seeded by the seed, the tensor's name and the chunk's number, so a file depends
on the seed only, not on threads or order. Chunks are made on a few threads, in order, a few
ahead of the writer: memory holds the pools and a few chunks, whatever the model's size.
"""

from __future__ import annotations

import threading
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from math import gcd

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from flashcli.engine import ggml

from .families import TensorPlan

UNIT = 256  # values per pool unit: a whole block of every ggml type
POOL_UNITS = 1 << 14
CHUNK_VALUES = 1 << 22  # values per chunk (16 MiB of float32)
_POOL_STREAM = 0xB10C  # the pool's generator stream, apart from every tensor's


def row_bytes(ggml_type: T, row_len: int) -> int:
    block, size = GGML_QUANT_SIZES[ggml_type]
    return row_len // block * size


def _rows(plan: TensorPlan) -> int:
    return int(np.prod(plan.ne[1:], dtype=np.int64)) if len(plan.ne) > 1 else 1


def tensor_nbytes(plan: TensorPlan, ggml_type: T) -> int:
    return _rows(plan) * row_bytes(ggml_type, plan.ne[0])


def encode(values: np.ndarray, ggml_type: T) -> np.ndarray:
    """float32 rows -> the bytes of those rows in ggml_type."""
    if ggml_type == T.F32:
        return values
    if ggml_type == T.F16:
        return values.astype(np.float16)
    return ggml.quantize_rows(values, int(ggml_type))


def _small_values(plan: TensorPlan, seed: int) -> np.ndarray:
    """float32 (1, n) of a vector: norms, biases, given values."""
    if plan.fill == "values":
        return np.asarray(plan.values, dtype=np.float32).reshape(1, -1)
    noise = np.random.default_rng([seed, zlib.crc32(plan.name.encode())]).standard_normal((1, plan.ne[0]), np.float32)
    if plan.fill == "norm":  # scales near `center` (1 but for a tied model's final norm)
        return np.float32(plan.center) * (1 + np.float32(0.1) * noise)
    if plan.fill == "bias":
        return np.float32(0.1) * noise
    raise ValueError(f"{plan.name}: unknown fill {plan.fill!r}")


class ChunkMaker:
    """Makes the chunks of the tensors to write, on `n_threads` threads."""

    def __init__(self, seed: int, n_threads: int, tensors):
        """tensors: (TensorPlan, ggml type) of every tensor to make."""
        self.seed = seed
        # units in the pool of a std: not of a type, so that a tensor's units are the same
        # values whatever its type (the F32 file and the Q4_K_M one hold the same weights)
        self._pool_units = {}
        for plan, _ in tensors:
            if plan.fill == "normal":
                need = min(POOL_UNITS, -(-_rows(plan) * plan.ne[0] // UNIT))
                self._pool_units[plan.std] = max(self._pool_units.get(plan.std, 0), need)
        self.n_threads = max(1, n_threads)
        self._pool = ThreadPoolExecutor(self.n_threads) if self.n_threads > 1 else None
        self._normal = None  # (POOL_UNITS, UNIT) float32, standard normal
        self._units = {}  # (std, type) -> (units, unit bytes) uint8
        self._lock = threading.Lock()

    def close(self):
        if self._pool:
            self._pool.shutdown()

    def units(self, std: float, ggml_type: T) -> np.ndarray:
        """The pool scaled to `std`, each unit in ggml_type: (units, unit bytes)."""
        key = (float(std), int(ggml_type))
        with self._lock:
            if key not in self._units:
                if self._normal is None:
                    rng = np.random.default_rng([self.seed, _POOL_STREAM])
                    self._normal = rng.standard_normal((POOL_UNITS, UNIT), dtype=np.float32)
                scaled = self._normal[: self._pool_units[std]] * np.float32(std)
                self._units[key] = encode(scaled, ggml_type).view(np.uint8).reshape(len(scaled), -1)
            return self._units[key]

    def _chunk(self, plan: TensorPlan, ggml_type: T, first_value: int, n_values: int, index: int):
        """Bytes of values first_value.. of a matrix (whole units but at the tensor's end)."""
        units = self.units(plan.std, ggml_type)
        rng = np.random.default_rng([self.seed, zlib.crc32(plan.name.encode()), index])
        ids = rng.integers(0, len(units), -(-n_values // UNIT))
        picked = units[ids].reshape(-1)
        block, size = GGML_QUANT_SIZES[ggml_type]
        picked = picked[: n_values // block * size]
        row_len = plan.ne[0]
        first_row, n_rows = first_value // row_len, n_values // row_len  # chunks are whole rows
        if plan.first_unit_shift is not None:
            self._shift_first_units(plan, ggml_type, picked, ids, first_row, n_rows)
        if plan.live_rows is not None and first_row + n_rows > plan.live_rows:
            # rows of unused tokens: zeros, as ggml encodes them (a zero logit, never the argmax)
            zero = encode(np.zeros((1, row_len), np.float32), ggml_type).view(np.uint8).reshape(-1)
            rows = picked.reshape(n_rows, -1)
            rows[max(0, plan.live_rows - first_row) :] = zero
        return picked

    def _shift_first_units(self, plan: TensorPlan, ggml_type: T, picked, ids, first_row: int, n_rows: int):
        """The first unit of each row, re-encoded with the plan's shift added to its values (the
        same random values as the unshifted file's: a skewed file differs from an even one there
        only). Rows start on units (row lengths are whole units where a shift is asked for)."""
        row_len = plan.ne[0]
        if row_len % UNIT:
            raise ValueError(f"{plan.name}: a shift needs rows of whole {UNIT}-value units, not {row_len}")
        per_row = row_len // UNIT
        shift = np.asarray(plan.first_unit_shift, np.float32)
        if shift.ndim == 2:
            shift = shift[first_row : first_row + n_rows]
        values = self._normal[ids[::per_row][:n_rows]] * np.float32(plan.std) + shift  # (n_rows, UNIT)
        rows = picked.reshape(n_rows, -1)
        unit_bytes = rows.shape[1] // per_row
        rows[:, :unit_bytes] = encode(values, ggml_type).view(np.uint8).reshape(n_rows, unit_bytes)

    def chunks(self, plan: TensorPlan, ggml_type: T):
        """The tensor's bytes, chunk by chunk, in order."""
        if plan.fill != "normal":
            yield encode(_small_values(plan, self.seed), ggml_type)
            return
        total = _rows(plan) * plan.ne[0]
        # chunks of whole rows and whole units, so that no quantization block straddles two
        rows_per_unit_step = UNIT // gcd(plan.ne[0], UNIT)
        step = max(1, CHUNK_VALUES // (plan.ne[0] * rows_per_unit_step)) * rows_per_unit_step * plan.ne[0]
        jobs = [(start, min(step, total - start), i) for i, start in enumerate(range(0, total, step))]
        self.units(plan.std, ggml_type)  # made once, before the threads want it
        if self._pool is None:
            for job in jobs:
                yield self._chunk(plan, ggml_type, *job)
            return
        pending = deque()
        for job in jobs:
            pending.append(self._pool.submit(self._chunk, plan, ggml_type, *job))
            if len(pending) > self.n_threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
