"""Random weights for a tensor plan, made and encoded chunk by chunk: a chunk of rows is drawn
in float32 from its own generator (seeded by the seed, the tensor's name and the chunk's
number, so a file depends on the seed only, not on threads or order) and converted to the
tensor's ggml type by ggml's own quantizer (ggml_quantize_chunk, as llama-quantize does).
Chunks are made on a few threads (numpy and ggml release the GIL), in order, a few ahead.
"""

from __future__ import annotations

import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from flashcli import ggml

from .families import TensorPlan

CHUNK_VALUES = 1 << 22  # values per chunk (16 MiB of float32): what memory holds per thread


def row_bytes(ggml_type: T, row_len: int) -> int:
    block, size = GGML_QUANT_SIZES[ggml_type]
    return row_len // block * size


def tensor_nbytes(plan: TensorPlan, ggml_type: T) -> int:
    rows = int(np.prod(plan.ne[1:], dtype=np.int64)) if len(plan.ne) > 1 else 1
    return rows * row_bytes(ggml_type, plan.ne[0])


def _rows(plan: TensorPlan) -> int:
    return int(np.prod(plan.ne[1:], dtype=np.int64)) if len(plan.ne) > 1 else 1


def _values(plan: TensorPlan, seed: int, first: int, n_rows: int, chunk: int) -> np.ndarray:
    """float32 (n_rows, row_len): rows first.. of the tensor."""
    shape = (n_rows, plan.ne[0])
    if plan.fill == "values":
        return np.asarray(plan.values, dtype=np.float32).reshape(shape)
    rng = np.random.default_rng([seed, zlib.crc32(plan.name.encode()), chunk])
    noise = rng.standard_normal(shape, dtype=np.float32)
    if plan.fill == "normal":
        noise *= np.float32(plan.std)
    elif plan.fill == "norm":  # scales near `center` (1 but for a tied model's final norm)
        noise *= np.float32(0.1 * plan.center)
        noise += np.float32(plan.center)
    elif plan.fill == "bias":
        noise *= np.float32(0.1)
    else:
        raise ValueError(f"{plan.name}: unknown fill {plan.fill!r}")
    return noise


def encode(values: np.ndarray, ggml_type: T) -> np.ndarray:
    """float32 rows -> the bytes of those rows in ggml_type."""
    if ggml_type == T.F32:
        return values
    if ggml_type == T.F16:
        return values.astype(np.float16)
    return ggml.quantize_rows(values, int(ggml_type))


class ChunkMaker:
    """Makes the chunks of the tensors to write, on `n_threads` threads, `ahead` chunks ahead
    of the writer, so that memory holds a few chunks whatever the model's size."""

    def __init__(self, seed: int, n_threads: int):
        self.seed = seed
        self.n_threads = max(1, n_threads)
        self._pool = ThreadPoolExecutor(self.n_threads) if self.n_threads > 1 else None

    def close(self):
        if self._pool:
            self._pool.shutdown()

    def _chunk(self, plan, ggml_type, first, n_rows, index):
        return encode(_values(plan, self.seed, first, n_rows, index), ggml_type)

    def chunks(self, plan: TensorPlan, ggml_type: T):
        """The tensor's bytes, chunk by chunk, in order."""
        rows = _rows(plan)
        per_chunk = max(1, CHUNK_VALUES // plan.ne[0])
        jobs = [(first, min(per_chunk, rows - first), i) for i, first in enumerate(range(0, rows, per_chunk))]
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
