"""I/O backends: copy fixed-size neuron records ("bundles") from a file region into memory.

A region starts at a 4096-aligned byte `offset` and holds `count` records of `stride` bytes;
record i is bytes [offset + i*stride, offset + (i+1)*stride). A reader fills out[j] with record
ids[j], and counts what it cost (`bytes_read`, `n_reads`) for per-token telemetry.

- MmapReader: map the region and copy rows. Simple; the kernel does the reading.
- DirectReader: the paper's recipe (technique 5, "Reads"): bypass the page cache with O_DIRECT,
  coalesce neighbouring records into larger reads, issue them from a pool of threads.

Both keep the page cache from growing: the caller's neuron cache is the only copy that should
count against its DRAM budget. Linux semantics (O_DIRECT, posix_fadvise, madvise) are assumed.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import warnings
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

PAGE = mmap.PAGESIZE
MAX_READ_BUFFER = 2 << 20  # bytes a direct read spans at most in its buffer (the budget plans this)


class RecordReader:
    """Common interface. One read() at a time per reader; use one reader per thread otherwise."""

    def __init__(self, path, offset: int, stride: int, count: int, record_bytes: int | None = None):
        self.path = os.fspath(path)
        self.offset, self.stride, self.count = int(offset), int(stride), int(count)
        # bytes of a record actually wanted: a part of it (the unbundled ablation) or all
        self.record_bytes = int(record_bytes or stride)
        self.bytes_read = 0  # bytes transferred from the file, alignment slack and gaps included
        self.n_reads = 0  # read system calls (or, for mmap, contiguous page runs copied)

    def read(self, ids: np.ndarray, out: np.ndarray) -> None:
        """Fill out[j] (uint8 [len(ids), record_bytes]) with record ids[j]; ids distinct, any order."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _checked_ids(self, ids, out: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if out.shape != (len(ids), self.record_bytes) or out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError(
                f"out must be C-contiguous uint8 [{len(ids)}, {self.record_bytes}], got {out.dtype} {out.shape}"
            )
        if len(ids) and (ids.min() < 0 or ids.max() >= self.count):
            raise IndexError(f"record ids must lie in [0, {self.count})")
        return ids


def plan_reads(
    ids_sorted: np.ndarray,
    offset: int,
    stride: int,
    max_gap_bytes: int,
    alignment: int,
    max_span: int = 1 << 20,
    record_bytes: int | None = None,
) -> list[tuple[int, int]]:
    """Aligned (file_start, length) reads that cover the records ids_sorted (ascending).

    Neighbours share one read when the gap between their aligned extents is at most
    max_gap_bytes: streaming a small gap costs less than another request. A read longer than
    max_span is cut into max_span pieces, so that several threads share a long run.
    """
    if max_span % alignment:
        raise ValueError(f"max_span {max_span} is not a multiple of alignment {alignment}")
    starts, ends = _coalesced_runs(ids_sorted, offset, stride, max_gap_bytes, alignment, record_bytes)
    return [
        (s, min(max_span, end - s))
        for start, end in zip(starts.tolist(), ends.tolist())
        for s in range(start, end, max_span)
    ]


def _coalesced_runs(ids_sorted, offset, stride, max_gap_bytes, alignment, record_bytes=None):
    """[start, end) byte ranges (numpy int64 arrays) of the coalesced, aligned runs."""
    first = offset + np.asarray(ids_sorted, dtype=np.int64) * stride
    lo = first // alignment * alignment
    hi = -(-(first + (record_bytes or stride)) // alignment) * alignment
    if not len(first):
        return lo, hi
    breaks = np.flatnonzero(lo[1:] - hi[:-1] > max_gap_bytes) + 1
    return lo[np.concatenate(([0], breaks))], hi[np.concatenate((breaks - 1, [len(first) - 1]))]


def _drop_page_cache(fd: int, start: int, length: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)


class MmapReader(RecordReader):
    """Memory-maps the region; read() is one numpy gather.

    With drop_cache, read-around is switched off (MADV_RANDOM): it would pull in pages beyond
    the records we copy, pages we would never drop. After each copy the touched pages are
    unmapped (MADV_DONTNEED) and evicted (POSIX_FADV_DONTNEED); mapped pages cannot be evicted.
    bytes_read and n_reads count the page runs the copy touched: what the kernel really faulted
    in is not visible from here.
    """

    def __init__(
        self, path, offset: int, stride: int, count: int, drop_cache: bool = True, record_bytes: int | None = None
    ):
        super().__init__(path, offset, stride, count, record_bytes)
        self.drop_cache = drop_cache
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._map = mmap.mmap(self._fd, count * stride, offset=self.offset, access=mmap.ACCESS_READ)
        except BaseException:
            os.close(self._fd)
            raise
        if drop_cache:
            self._map.madvise(mmap.MADV_RANDOM)
        self._rows = np.frombuffer(self._map, np.uint8).reshape(count, stride)  # [count, stride]

    def read(self, ids, out: np.ndarray) -> None:
        ids = self._checked_ids(ids, out)
        if not len(ids):
            return
        np.take(self._rows[:, : self.record_bytes], ids, axis=0, out=out, mode="clip")  # ids checked
        starts, ends = _coalesced_runs(np.sort(ids), self.offset, self.stride, 0, PAGE, self.record_bytes)
        self.n_reads += len(starts)
        self.bytes_read += int((ends - starts).sum())
        if self.drop_cache:
            # One call over the hull of the touched runs: the gaps hold nothing we put there.
            start, end = int(starts[0]), min(int(ends[-1]), self.offset + len(self._map))
            self._map.madvise(mmap.MADV_DONTNEED, start - self.offset, end - start)
            _drop_page_cache(self._fd, start, end - start)

    def close(self) -> None:
        if self._fd < 0:
            return
        self._rows = None  # the view must go before the map can close
        self._map.close()
        os.close(self._fd)
        self._fd = -1


def _direct_io_alignment(path: str) -> int:
    # O_DIRECT wants offsets, lengths and buffer addresses aligned to the device's logical block
    # (512 or 4096). statx(STATX_DIOALIGN) would say exactly, but Python does not expose it; the
    # file system block is a safe multiple. Anything odd or larger (NFS says 1 MiB) gets 4096.
    bsize = os.statvfs(path).f_bsize
    return bsize if bsize in (512, 1024, 2048, 4096) else 4096


def open_direct(path) -> tuple[int, bool, int]:
    """(fd, direct, alignment): the file opened with O_DIRECT, or buffered (direct False) where
    the file system refuses it (callers then drop what they read from the page cache)."""
    path = os.fspath(path)
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT), True, _direct_io_alignment(path)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        warnings.warn(f"{path}: direct I/O refused ({e}); using buffered reads", stacklevel=2)
        return os.open(path, os.O_RDONLY), False, _direct_io_alignment(path)


def read_fully(fd: int, view: memoryview, start: int, file_size: int, direct: bool = True, calls=None) -> int:
    """Reads len(view) bytes at `start` into view, asking again after short reads; returns the
    bytes read. O_DIRECT wants the full aligned length even at the end of the file, which may
    end mid-block: reading stops there. A buffered read (direct False: the file system refused
    O_DIRECT) drops what it read from the page cache, which a budget would otherwise pay for.
    `calls` (a list) gets one item per read call."""
    need, done = min(len(view), file_size - start), 0
    while done < need:
        if calls is not None:
            calls.append(1)
        n = os.preadv(fd, [view[done:]], start + done)
        if n == 0:
            raise OSError(f"file ended at byte {start + done}, expected {start + need}")
        done += n
    if not direct:
        _drop_page_cache(fd, start, need)
    return done


class ReadBuffer:
    """A page-aligned read buffer that only grows. Readers used one after another (one per
    layer) share one, so it costs the largest single read, not one per reader."""

    def __init__(self):
        self.mm: mmap.mmap | None = None

    def reserve(self, size: int) -> mmap.mmap:
        if self.mm is None or len(self.mm) < size:  # the old map goes with its last view
            self.mm = mmap.mmap(-1, -(-size // PAGE) * PAGE)
        return self.mm

    @property
    def nbytes(self) -> int:
        return len(self.mm) if self.mm is not None else 0


class DirectReader(RecordReader):
    """Reads records with O_DIRECT: coalesced, aligned spans read in parallel by `threads`.

    `direct` tells whether O_DIRECT is in use. If the file system refuses it (EINVAL on open or
    on the first read, e.g. an older tmpfs) the reader warns once and goes on with buffered
    reads, evicting what it read from the page cache after each call.
    """

    def __init__(
        self,
        path,
        offset: int,
        stride: int,
        count: int,
        threads: int = 8,
        max_gap_bytes: int = 32768,
        alignment: int | None = None,
        pool: ThreadPoolExecutor | None = None,
        buffer: ReadBuffer | None = None,
        record_bytes: int | None = None,
        max_buffer: int = MAX_READ_BUFFER,
    ):
        super().__init__(path, offset, stride, count, record_bytes)
        self.threads, self.max_gap_bytes = threads, max_gap_bytes
        self.max_buffer = max_buffer  # a read of more is split in two (a record alone may exceed it)
        self.alignment = alignment or _direct_io_alignment(self.path)
        # Every record starts at a multiple of `unit` within the buffer: the gather copies units.
        self._unit = math.gcd(self.stride, self.alignment, self.offset, self.record_bytes)
        self._buffer = buffer or ReadBuffer()
        self._buf: mmap.mmap | None = None
        # readers of one file (one per layer) may share a pool; a reader shuts down only its own
        self._own_pool = pool is None
        self._pool = pool or ThreadPoolExecutor(threads, thread_name_prefix="flashcli-io")
        self._fd, self.direct, _ = open_direct(self.path)
        self._file_size = os.fstat(self._fd).st_size

    def _use_buffered(self, why: Exception) -> None:
        warnings.warn(f"{self.path}: direct I/O refused ({why}); using buffered reads", stacklevel=3)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self.direct = os.open(self.path, os.O_RDONLY), False

    def read(self, ids, out: np.ndarray) -> None:
        ids = self._checked_ids(ids, out)
        if not len(ids):
            return
        if len(ids) > 1 and self._span_bytes(ids) > self.max_buffer:
            # in two reads of half the records each (by offset): the buffer stays within its size
            order = np.argsort(ids, kind="stable")
            for part in (order[: len(ids) // 2], order[len(ids) // 2 :]):
                rows = np.empty((len(part), self.record_bytes), np.uint8)
                self.read(ids[part], rows)
                out[part] = rows
            return
        last_end = self.offset + int(ids.max()) * self.stride + self.record_bytes
        if last_end > self._file_size:
            raise OSError(
                f"{self.path}: record ends at byte {last_end}, past the end of the file ({self._file_size} bytes)"
            )
        spans = plan_reads(
            np.sort(ids), self.offset, self.stride, self.max_gap_bytes, self.alignment, record_bytes=self.record_bytes
        )
        span_start = np.array([s for s, _ in spans], dtype=np.int64)
        span_len = np.array([n for _, n in spans], dtype=np.int64)
        buf_pos = np.concatenate(([0], np.cumsum(span_len)[:-1]))  # spans laid end to end
        total = int(buf_pos[-1] + span_len[-1])
        self._buf = self._buffer.reserve(total)
        jobs = list(zip(buf_pos.tolist(), span_start.tolist(), span_len.tolist()))
        try:
            nbytes, calls = self._read_spans(jobs)
        except OSError as e:
            if not (self.direct and e.errno == errno.EINVAL):
                raise
            self._use_buffered(e)
            nbytes, calls = self._read_spans(jobs)
        self.bytes_read += nbytes
        self.n_reads += calls
        if not self.direct:
            _drop_page_cache(self._fd, jobs[0][1], jobs[-1][1] + jobs[-1][2] - jobs[0][1])

        # Find each record in the buffer; pieces of one cut run sit end to end, so a record
        # crossing a cut is still contiguous there.
        rec_start = self.offset + ids * self.stride
        k = np.searchsorted(span_start, rec_start, side="right") - 1
        pos = buf_pos[k] + rec_start - span_start[k]
        units = np.frombuffer(self._buf, np.uint8, total).reshape(-1, self._unit)
        idx = (pos // self._unit)[:, None] + np.arange(self.record_bytes // self._unit)  # [n, record/unit]
        np.take(units, idx, axis=0, out=out.reshape(len(ids), -1, self._unit), mode="clip")
        del units
        self._buf = None  # a buffer the shared one has outgrown must not live on here

    def _span_bytes(self, ids: np.ndarray) -> int:
        """Bytes the coalesced reads of these records take in the buffer."""
        starts, ends = _coalesced_runs(
            np.sort(ids), self.offset, self.stride, self.max_gap_bytes, self.alignment, self.record_bytes
        )
        return int((ends - starts).sum())

    def _read_spans(self, jobs: list[tuple[int, int, int]]) -> tuple[int, int]:
        """Read all (buf_pos, file_start, length) jobs; returns (bytes, calls)."""
        view = memoryview(self._buf)
        n_tasks = min(self.threads, len(jobs))
        if n_tasks == 1:  # a pool round trip costs more than it saves
            return self._read_jobs(view, jobs)
        # Round-robin over the file-ordered spans spreads the bytes evenly over the workers.
        futures = [self._pool.submit(self._read_jobs, view, jobs[i::n_tasks]) for i in range(n_tasks)]
        wait(futures)  # all of them, even if one failed: none may still write to the buffer
        results = [f.result() for f in futures]
        return sum(r[0] for r in results), sum(r[1] for r in results)

    def _read_jobs(self, view: memoryview, jobs) -> tuple[int, int]:
        nbytes, calls = 0, []
        for buf_pos, start, length in jobs:
            try:
                nbytes += read_fully(
                    self._fd, view[buf_pos : buf_pos + length], start, self._file_size, self.direct, calls
                )
            except OSError as e:
                if e.errno is None:  # a file shorter than its header says
                    raise OSError(f"{self.path}: {e}") from None
                raise
        return nbytes, len(calls)

    def close(self) -> None:
        if self._fd < 0:
            return
        if self._own_pool:
            self._pool.shutdown(wait=True)
        os.close(self._fd)
        self._fd = -1
        # Dropped, not closed: a traceback may still hold a view of it, and close() would fail.
        self._buf = None


READERS = {"mmap": MmapReader, "direct": DirectReader}


def open_reader(kind: str, path, offset: int, stride: int, count: int, **kw) -> RecordReader:
    """A reader of the given kind ("mmap" or "direct"); kw goes to its constructor."""
    if kind not in READERS:
        raise ValueError(f"unknown reader {kind!r}: expected one of {', '.join(READERS)}")
    return READERS[kind](path, offset, stride, count, **kw)
