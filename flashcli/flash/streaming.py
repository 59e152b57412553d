"""Streaming tensors from disk, in the order they are used, ahead of the computation.

A model's streamed tensors are needed in the same order at every pass over the layers (every
token, every prompt batch, every verification of drafted tokens), so reading can run ahead of
computing without any prediction: reader threads fill a ring of bytes with the next tensors in
the cycle as soon as the computation has released the space. The disk stays busy while layers
compute, across pass boundaries too. Reads use O_DIRECT in large aligned pieces read in
parallel, so nothing goes through the page cache (which a memory budget would pay for twice).

Tensors that ggml runs on its repacked CPU kernels (repack.py) are repacked piece by piece as
they arrive, in the reader threads, so that a streamed tensor is multiplied by the same kernel,
with the same rounding, as its resident copy would be. The ring's memory is then a buffer of
ggml's CPU_REPACK type, which is how ggml knows to dispatch to those kernels.

    stream = TensorStream(path, [Span(offset, nbytes), ...], capacity=64 << 20)
    entry = stream.acquire()   # the next tensor: entry.address, entry.buffer (waits for its read)
    ...compute with it...
    stream.release()           # the oldest acquired tensor's bytes are free for reads ahead
"""

from __future__ import annotations

import ctypes as C
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..engine import ggml
from ..engine.repack import GROUP, repack_buffer_type
from .io_backends import open_direct, read_fully

PIECE = 1 << 20  # bytes per read call: large enough for full throughput, small enough to spread


@dataclass(frozen=True)
class Span:
    """A tensor's bytes in the file; `repack` (ggml type, row length, row bytes) when ggml runs it
    on repacked kernels: its rows are then interleaved as they arrive."""

    offset: int
    nbytes: int
    repack: tuple | None = None
    prepacked: bool = False  # stored repacked: read as it is into the ring's CPU_REPACK memory


@dataclass(frozen=True)
class Entry:
    """A tensor in the ring: its bytes start at `address`, inside the ggml buffer `buffer`
    (None for a plain ring)."""

    address: int
    buffer: int | None

    def point(self, t: ggml.TensorP) -> None:
        """Points t, a tensor the stream bound (TensorStream.bind), at these bytes."""
        t.contents.data = self.address
        if self.buffer:
            t.contents.buffer = self.buffer


class TensorStream:
    def __init__(self, path, spans: list[Span], capacity: int, threads: int = 4):
        if not spans:
            raise ValueError("nothing to stream")
        self.spans = list(spans)
        self.fd, self.direct, self.alignment = open_direct(path)
        self.file_size = os.fstat(self.fd).st_size
        a = self.alignment
        self.sizes = [self._extent(s) for s in self.spans]
        if max(self.sizes) > capacity:
            raise ValueError(f"a streamed tensor of {max(self.sizes)} bytes does not fit a ring of {capacity}")
        self.capacity = capacity
        self._buffer = None  # ggml CPU_REPACK buffer holding the ring, where any span is repacked
        if any(s.repack or s.prepacked for s in self.spans):
            L = ggml.lib()
            self._buffer = L.backend_buft_alloc_buffer(repack_buffer_type(), capacity + a)
            if not self._buffer:
                raise MemoryError("could not allocate the stream's ring")
            base = L.backend_buffer_get_base(self._buffer)
            self.base = -(-base // a) * a
            self._ring = (C.c_uint8 * capacity).from_address(self.base)
        else:
            self._ring = mmap.mmap(-1, capacity)
            self.base = C.addressof(C.c_uint8.from_buffer(self._ring))
        self._view = memoryview(self._ring).cast("B")
        piece = max(PIECE, max((GROUP * s.repack[2] for s in self.spans if s.repack), default=0))
        self.staging_bytes = piece + 2 * a  # a reader's plain bytes of a piece being repacked
        self.threads = threads
        self._local = threading.local()
        self._stagings = []
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="flashcli-read")
        # one coordinator per tensor in flight, which splits it into pieces for the readers: a
        # coordinator waiting on its pieces never holds a reader thread
        self.coordinators = ThreadPoolExecutor(4, thread_name_prefix="flashcli-stream")
        self._lock = threading.Condition()
        self._live = []  # [seq, start, end] in the ring, oldest first: being read, ready or held
        self._ready = set()  # sequence numbers read
        self._error = None
        self._next_read = 0  # sequence number of the next tensor to read
        self._next_use = 0  # sequence number of the next tensor acquire() returns
        self._held = 0  # acquired and not released
        self.bytes_read = 0
        self.wait_s = 0.0  # time acquire() spent waiting for reads
        self._closed = False
        with self._lock:
            self._fill()

    def bind(self, t: ggml.TensorP, repacked: bool) -> bool:
        """Places t, a tensor for streamed bytes, in the ring: in its CPU_REPACK buffer where t is
        repacked, so that ggml runs its repacked kernels on it, else at the ring's start, a real
        address that ggml-alloc leaves be. Each acquired Entry then points it at its bytes.
        False where ggml declines to repack t."""
        if not repacked:
            t.contents.data = self.base
            return True
        return ggml.lib().backend_tensor_alloc(self._buffer, t, self.base) == 0 and bool(t.contents.extra)

    @property
    def nbytes(self) -> int:
        """Memory the stream holds: the ring and the readers' staging for repacked pieces."""
        return self.capacity + self.alignment + len(self._stagings) * self.staging_bytes

    def _extent(self, s: Span) -> int:
        a = self.alignment
        if s.repack:  # repacked into the ring from staging: the tensor's own size
            return -(-s.nbytes // a) * a
        return -(-(s.offset + s.nbytes) // a) * a - s.offset // a * a

    def _place(self, size: int) -> int | None:
        """Where the next tensor goes in the ring (after the newest, or wrapped to the start
        when it does not fit before the end), or None while the space is still in use."""
        if not self._live:
            return 0
        oldest, newest = self._live[0][1], self._live[-1][2]
        if newest > oldest:  # in use: [oldest, newest); free: after it, and before it
            if newest + size <= self.capacity:
                return newest
            return 0 if size <= oldest else None
        return newest if newest + size <= oldest else None  # wrapped: free is [newest, oldest)

    def _fill(self):
        """Starts reads of the next tensors while the ring has room (lock held)."""
        while not self._closed:
            seq = self._next_read
            size = self.sizes[seq % len(self.spans)]
            start = self._place(size)
            if start is None:
                return
            self._live.append([seq, start, start + size])
            self._next_read += 1
            self.coordinators.submit(self._read, seq, start)

    def _read(self, seq: int, start: int):
        span = self.spans[seq % len(self.spans)]
        try:
            if span.repack:
                jobs = self._repack_pieces(span, start)
            else:
                a = self.alignment
                first, end = span.offset // a * a, -(-(span.offset + span.nbytes) // a) * a
                jobs = [(self._read_piece, start + p - first, p, min(PIECE, end - p)) for p in range(first, end, PIECE)]
            futures = [self.pool.submit(*job) for job in jobs]
            done = sum(f.result() for f in futures)
        except BaseException as e:  # surfaced by acquire()
            with self._lock:
                self._error = e
                self._lock.notify_all()
            return
        with self._lock:
            self.bytes_read += done
            self._ready.add(seq)
            self._lock.notify_all()

    def _read_piece(self, pos: int, file_start: int, length: int) -> int:
        return read_fully(self.fd, self._view[pos : pos + length], file_start, self.file_size, self.direct)

    def _repack_pieces(self, span: Span, start: int) -> list:
        ggml_type, row_len, row_bytes = span.repack
        n_rows = span.nbytes // row_bytes
        rows = max(GROUP, PIECE // row_bytes // GROUP * GROUP)  # whole groups of interleaved rows
        return [(self._repack_piece, start, span, r, min(rows, n_rows - r)) for r in range(0, n_rows, rows)]

    def _repack_piece(self, start: int, span: Span, first_row: int, n_rows: int) -> int:
        """Reads rows [first_row, first_row + n_rows) of a tensor into this reader's staging and
        repacks them into their place in the ring (a group of 8 rows keeps its byte offsets)."""
        ggml_type, row_len, row_bytes = span.repack
        staging, ctx = self._reader_state()
        a = self.alignment
        lo = span.offset + first_row * row_bytes
        hi = lo + n_rows * row_bytes
        file_start, file_end = lo // a * a, -(-hi // a) * a
        done = read_fully(
            self.fd, memoryview(staging)[: file_end - file_start], file_start, self.file_size, self.direct
        )
        L = ggml.lib()
        L.reset(ctx)
        t = L.new_tensor_2d(ctx, ggml_type, row_len, n_rows)
        if (
            L.backend_tensor_alloc(self._buffer, t, self.base + start + first_row * row_bytes) != 0
            or not t.contents.extra
        ):
            raise RuntimeError("ggml declined to repack a streamed tensor")
        src = C.addressof(C.c_uint8.from_buffer(staging)) + lo - file_start
        L.backend_tensor_set(t, src, 0, n_rows * row_bytes)
        return done

    def _reader_state(self):
        """This reader thread's staging buffer and a ggml context for one tensor header."""
        state = getattr(self._local, "state", None)
        if state is None:
            L = ggml.lib()
            staging = mmap.mmap(-1, self.staging_bytes)
            ctx = L.init(ggml.InitParams(L.tensor_overhead() * 2, None, True))
            state = self._local.state = (staging, ctx)
            with self._lock:
                self._stagings.append(state)
        return state

    def acquire(self) -> Entry:
        """The next tensor (valid until its release(); tensors are released in the order they
        were acquired)."""
        seq = self._next_use
        t0 = time.perf_counter()
        with self._lock:
            while seq not in self._ready and self._error is None:
                self._lock.wait()
            if self._error is not None:
                raise self._error
            self._ready.discard(seq)
            start = next(e[1] for e in self._live if e[0] == seq)
        self.wait_s += time.perf_counter() - t0
        span = self.spans[seq % len(self.spans)]
        skip = 0 if span.repack else span.offset % self.alignment
        self._next_use += 1
        self._held += 1
        return Entry(self.base + start + skip, self._buffer)

    def release(self):
        """Frees the oldest acquired tensor's bytes for reads ahead."""
        with self._lock:
            self._live.pop(0)
            self._held -= 1
            self._fill()

    def close(self, wait: bool = True):
        """Stops the readers (waiting for any read in flight where `wait`) and frees the ring."""
        with self._lock:
            self._closed = True
        self.coordinators.shutdown(wait=wait)
        self.pool.shutdown(wait=wait)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        L = ggml.lib()
        for _staging, ctx in self._stagings:
            L.free(ctx)
        self._stagings = []
        self._view.release()
        self._ring = None
        if self._buffer:
            L.backend_buffer_free(self._buffer)
            self._buffer = None

    def __del__(self):
        # A finalizer must never wait for a thread: the collector may run it inside threading's
        # own bookkeeping, with threading._shutdown_locks_lock held, where a join deadlocks on
        # that lock and so does every thread started after (a hung `make test` in CI). Nothing
        # is in flight here: a read queued or running holds the stream, so it is not garbage.
        try:
            self.close(wait=False)
        except Exception:
            pass
