"""A source GGUF's tensors read in chunks through a file descriptor, never through the mapping.

A converter touches every byte of a file once. Read through flashcli.gguf_file's memory map,
every page it touched stays counted in the process's resident set until the map goes away:
converting an 8B model would hold 5 GB. Here each chunk is read with pread into memory of our
own (freed when the writer has it) and its pages are dropped from the page cache behind it, so
the converter's memory is a few chunks whatever the model's size, and its page-cache footprint
(charged to a cgroup like any memory) stays as small.

Chunks are read AHEAD at a time by a small pool, with whatever a chunk needs done to it (ggml's
repacking): one reader waiting on the disk left the disk idle while a chunk was repacked and the
CPU idle while the next was read (an 8B model converted at 0.29x the disk's sequential rate).
ctypes and pread let go of the GIL, so the pool's threads overlap for real.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from flashcli.engine.gguf_file import GGUFFile, TensorInfo

CHUNK = 8 << 20  # bytes per read (and per write of a copied tensor)
AHEAD = 3  # chunks read (and transformed) ahead of the one the writer takes: 2 cores, a disk queue


class TensorSource:
    """Reads the tensors of one GGUF file in bounded chunks. A context manager (closes its fd)."""

    def __init__(self, gf: GGUFFile, chunk: int = CHUNK):
        self.gf, self.chunk = gf, chunk
        self._fd = os.open(gf.path, os.O_RDONLY)
        self._pool = ThreadPoolExecutor(AHEAD, thread_name_prefix="gguf-reader")

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.close()

    def read(self, offset: int, length: int) -> np.ndarray:
        """length bytes of the file at offset, in a fresh uint8 array; their cached pages dropped.
        The next as many bytes are asked for meanwhile (a converter reads on in order): the disk
        reads them while this chunk is encoded and written."""
        os.posix_fadvise(self._fd, offset + length, max(length, 1 << 20), os.POSIX_FADV_WILLNEED)
        out = np.empty(length, np.uint8)
        view, done = memoryview(out), 0
        while done < length:
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise EOFError(f"{self.gf.path}: ends inside a tensor (offset {offset + done})")
            done += n
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)
        return out

    def chunks(self, t: TensorInfo):
        """t's bytes, self.chunk at a time, read AHEAD chunks ahead."""

        def read(start):
            return self.read(t.offset + start, min(self.chunk, t.nbytes - start))

        return self.ahead(read, range(0, t.nbytes, self.chunk))

    def ahead(self, job, args):
        """job(arg) for each of args, in order, AHEAD of them running on the pool while the
        caller has the one before (a generator: stopped early, it waits for what was started)."""
        pending = deque()
        try:
            for arg in args:
                pending.append(self._pool.submit(job, arg))
                if len(pending) > AHEAD:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def rows(self, t: TensorInfo, first: int, count: int) -> np.ndarray:
        """Rows [first, first + count) of t as uint8 [count, row_bytes]."""
        count = max(0, min(count, t.n_rows - first))
        return self.read(t.offset + first * t.row_bytes, count * t.row_bytes).reshape(count, t.row_bytes)

    def all_rows(self, t: TensorInfo) -> np.ndarray:
        """The whole tensor as uint8 [n_rows, row_bytes], in our memory (a layer's matrix)."""
        return self.rows(t, 0, t.n_rows)

    def row_blocks(self, t: TensorInfo, rows_per_block: int, transform=None):
        """t's rows, rows_per_block at a time (the last block may be shorter), each passed
        through transform (on the pool, ahead of the caller) where one is given."""

        def block(first):
            rows = self.rows(t, first, rows_per_block)
            return transform(rows) if transform else rows

        return self.ahead(block, range(0, t.n_rows, rows_per_block))

    def picked_rows(self, t: TensorInfo, ids: np.ndarray, per_block: int):
        """The rows `ids` (ascending) of t, per_block of them at a time, reading the file in
        order through blocks of at most self.chunk bytes (never the whole span at once)."""
        ids = np.asarray(ids, np.int64)
        if len(ids) and np.any(np.diff(ids) <= 0):
            raise ValueError("picked_rows needs strictly ascending row ids")
        span = max(1, self.chunk // t.row_bytes)
        pending, held = [], 0
        for block_first in range(0, t.n_rows, span):
            lo, hi = np.searchsorted(ids, [block_first, block_first + span])
            if lo == hi:
                continue
            block = self.rows(t, block_first, span)
            pending.append(block[ids[lo:hi] - block_first])
            held += hi - lo
            while held >= per_block:
                joined = np.concatenate(pending)
                yield joined[:per_block]
                pending, held = [joined[per_block:]], held - per_block
        if held:
            yield np.concatenate(pending)
