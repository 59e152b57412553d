"""Streaming whole tensors from disk, in the order they are used, ahead of the computation.

A model's streamed tensors are needed in the same order at every pass over the layers (every
token, every prompt batch), so reading can run ahead of computing without any prediction: a
ring of `slots` buffers, each filled by reader threads with the next tensor in the cycle as
soon as the computation has released it. The disk stays busy while layers compute, across
token boundaries too. Reads use O_DIRECT in large aligned pieces read in parallel, so nothing
goes through the page cache (which a memory budget would have to pay for twice).

    stream = TensorStream(path, [(offset, nbytes), ...], slots=3)
    data = stream.acquire()   # uint8 view of the next tensor's bytes (waits for its read)
    ...compute with data...
    stream.release()          # its buffer is free for the tensor `slots` positions ahead
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .io_backends import open_direct

PIECE = 1 << 20  # bytes per read call: large enough for full throughput, small enough to spread


class TensorStream:
    def __init__(self, path, spans: list[tuple[int, int]], slots: int = 3, threads: int = 4):
        if not spans:
            raise ValueError("nothing to stream")
        self.spans = [(int(o), int(n)) for o, n in spans]
        self.fd, self.direct, self.alignment = open_direct(path)
        self.file_size = os.fstat(self.fd).st_size
        self.n_slots = max(1, min(slots, len(self.spans)))
        a = self.alignment
        self.slot_bytes = max(-(-(o + n) // a) * a - o // a * a for o, n in self.spans)
        self.buffers = [mmap.mmap(-1, self.slot_bytes) for _ in range(self.n_slots)]
        # one coordinator per slot, which splits its tensor into pieces for the readers: a
        # coordinator waiting on its pieces never holds a reader thread
        self.slot_pool = ThreadPoolExecutor(self.n_slots, thread_name_prefix="flashcli-stream")
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="flashcli-read")
        self._lock = threading.Condition()
        self._ready = [None] * self.n_slots  # slot -> sequence number read into it
        self._held = []  # slots acquired and not yet released, oldest first
        self._error = None
        self._next_read = 0  # sequence number of the next tensor to read
        self._next_use = 0  # sequence number of the next tensor acquire() returns
        self._free = list(range(self.n_slots))
        self.bytes_read = 0
        self.wait_s = 0.0  # time acquire() spent waiting for reads
        self._closed = False
        self._fill()

    @property
    def nbytes(self) -> int:
        return self.n_slots * self.slot_bytes

    def _fill(self):
        """Starts reads into every free slot (called with or without the lock held by us)."""
        while self._free and not self._closed:
            slot = self._free.pop(0)
            seq = self._next_read
            self._next_read += 1
            self.slot_pool.submit(self._read, slot, seq)

    def _read(self, slot: int, seq: int):
        offset, nbytes = self.spans[seq % len(self.spans)]
        a = self.alignment
        start, end = offset // a * a, -(-(offset + nbytes) // a) * a
        view = memoryview(self.buffers[slot])
        try:
            futures = [self.pool.submit(self._read_piece, view, p - start, p, min(PIECE, end - p))
                       for p in range(start, end, PIECE)]
            done = sum(f.result() for f in futures)
        except BaseException as e:  # surfaced by acquire()
            with self._lock:
                self._error = e
                self._lock.notify_all()
            return
        with self._lock:
            self.bytes_read += done
            self._ready[slot] = seq
            self._lock.notify_all()

    def _read_piece(self, view, pos: int, start: int, length: int) -> int:
        need = min(length, self.file_size - start)
        done = 0
        while done < need:
            n = os.preadv(self.fd, [view[pos + done : pos + length]], start + done)
            if n == 0:
                raise OSError(f"file ended at byte {start + done}, expected {start + need}")
            done += n
        if not self.direct:  # buffered fallback: what we read must not stay in the page cache
            os.posix_fadvise(self.fd, start, need, os.POSIX_FADV_DONTNEED)
        return done

    def acquire(self) -> np.ndarray:
        """The next tensor's bytes (a view valid until its release(); tensors are released in
        the order they were acquired)."""
        seq = self._next_use
        t0 = time.perf_counter()
        with self._lock:
            while seq not in self._ready and self._error is None:
                self._lock.wait()
            if self._error is not None:
                raise self._error
            slot = self._ready.index(seq)
        self.wait_s += time.perf_counter() - t0
        offset, nbytes = self.spans[seq % len(self.spans)]
        skip = offset - offset // self.alignment * self.alignment
        self._held.append(slot)
        self._next_use += 1
        return np.frombuffer(self.buffers[slot], np.uint8, nbytes, skip)

    def release(self):
        """Frees the oldest acquired tensor's buffer for the next read."""
        with self._lock:
            slot = self._held.pop(0)
            self._ready[slot] = None
            self._free.append(slot)
            self._fill()

    def close(self):
        self._closed = True
        self.slot_pool.shutdown(wait=True)
        self.pool.shutdown(wait=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
