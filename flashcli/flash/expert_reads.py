"""Reads of experts' records (one kind of one expert: a contiguous byte range of the file) with
O_DIRECT, into an expert cache's slot or into one of a bounded set of staging buffers.

A cache's misses are all read at once, IN_FLIGHT of them in flight (the disk is several times
faster at a queue depth of 4 and more than one read at a time): each holds one staging buffer
while it runs, so the buffers bound the reads in flight and their memory is fixed when the model
loads (`staging_bytes`, what the budget plans). A record whose slot is plain memory laid out for
it is read straight into the slot, its unaligned head and tail (under a block each) through the
staging buffer; a record ggml repacks is read into the staging buffer, and the caller repacks it
from there.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
import warnings

import numpy as np

from .io_backends import PAGE, open_direct, read_fully

IN_FLIGHT = 8  # records read at a time (the staging buffers): the disk's rate needs 4 or more


def buffer_bytes(record_bytes: int) -> int:
    """A staging buffer's bytes for records of up to record_bytes: their aligned extent."""
    return -(-record_bytes // PAGE) * PAGE + 2 * PAGE


def staging_bytes(record_bytes: int) -> int:
    """Bytes of the staging buffers (all of them) for records of up to record_bytes."""
    return IN_FLIGHT * buffer_bytes(record_bytes)


class ExpertStaging:
    """The file's descriptor (O_DIRECT where the file system allows it) and IN_FLIGHT staging
    buffers, taken with `take` (blocking while all are in use) and given back with `give`.
    Thread-safe: the reads run on an I/O pool's threads."""

    def __init__(self, path, record_bytes: int):
        self.path = os.fspath(path)
        self.size = buffer_bytes(record_bytes)
        self._mm = mmap.mmap(-1, IN_FLIGHT * self.size)
        whole = np.frombuffer(self._mm, np.uint8)
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(IN_FLIGHT):
            self._free.put(whole[i * self.size : (i + 1) * self.size])
        self._fd, self.direct, self.alignment = open_direct(self.path)
        self._file_size = os.fstat(self._fd).st_size
        self._lock = threading.Lock()
        self._old_fds: list[int] = []

    @property
    def nbytes(self) -> int:
        return len(self._mm)

    def take(self) -> np.ndarray:
        return self._free.get()

    def give(self, buffer: np.ndarray) -> None:
        self._free.put(buffer)

    def read_into(self, dest: np.ndarray, start: int, buffer: np.ndarray) -> int:
        """The file's bytes [start, start + len(dest)) into dest (uint8, contiguous): its aligned
        interior straight in where dest's address allows O_DIRECT there, the rest through
        `buffer`; returns the bytes read from the file."""
        end, a = start + len(dest), self.alignment
        lo, hi = -(-start // a) * a, end // a * a  # the aligned interior
        if not self.direct:
            return self._read(dest, start)
        if hi <= lo or (dest.ctypes.data + lo - start) % a:
            staged, n = self.read_staged(start, len(dest), buffer)
            dest[:] = staged
            return n
        n = self._read(dest[lo - start : hi - start], lo)
        if lo > start:  # the head: the end of the block before the interior
            n += self._read(buffer[:a], lo - a)
            dest[: lo - start] = buffer[a - (lo - start) : a]
        if end > hi:  # the tail: the start of the block after it
            n += self._read(buffer[:a], hi)
            dest[hi - start :] = buffer[: end - hi]
        return n

    def read_staged(self, start: int, length: int, buffer: np.ndarray) -> tuple[np.ndarray, int]:
        """(the file's bytes [start, start + length) as a view of `buffer`, bytes read)."""
        a = self.alignment if self.direct else 1
        lo, hi = start // a * a, -(-(start + length) // a) * a
        n = self._read(buffer[: hi - lo], lo)
        return buffer[start - lo : start - lo + length], n

    def _read(self, dest: np.ndarray, start: int) -> int:
        direct = self.direct
        try:
            return read_fully(self._fd, memoryview(dest), start, self._file_size, direct)
        except OSError as e:
            if not (direct and e.errno == errno.EINVAL):
                raise
            self._use_buffered(e)
            return read_fully(self._fd, memoryview(dest), start, self._file_size, False)

    def _use_buffered(self, why: Exception) -> None:
        with self._lock:  # several reads may meet the refusal at once: one switch
            if self.direct:
                warnings.warn(f"{self.path}: direct I/O refused ({why}); using buffered reads", stacklevel=4)
                # the direct descriptor stays open till close(): other reads may be using it
                self._old_fds.append(self._fd)
                self._fd, self.direct = os.open(self.path, os.O_RDONLY), False

    def close(self) -> None:
        for fd in [self._fd, *self._old_fds]:
            if fd >= 0:
                os.close(fd)
        self._fd, self._old_fds = -1, []
