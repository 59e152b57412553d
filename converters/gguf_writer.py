"""Streaming GGUF writer: metadata entries (copied raw from a source or encoded here) and
tensors whose bytes come in chunks, so that a converted file never sits whole in memory, nor in
the page cache: write_gguf_file writes from a thread (the next chunks are read and encoded
meanwhile), starts the writeback of every SYNC_EVERY bytes, drops a range's pages once it is on
disk, and renames a complete file into place."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flashcli.engine.gguf_file import GGUF_MAGIC, SCALAR_FORMATS

SYNC_EVERY = 64 << 20  # bytes written between the start of their writeback and the next range's
WRITEBACK_AHEAD = 2  # ranges whose writeback runs while the writer goes on; the oldest is waited for
QUEUED = 2  # chunks handed to the writing thread and not yet written

_VALUE_TYPE = {bool: 7, int: 4, float: 6, str: 8}  # Python value -> GGUF type for our own keys


def encode_metadata(key: str, value) -> bytes:
    """One metadata entry in GGUF encoding: ints become uint32 (int64 when out of its range;
    arrays int32), floats float32. general.alignment must be uint32 for gguf-py and llama.cpp."""

    def enc_str(s: str) -> bytes:
        b = s.encode("utf-8")
        return struct.pack("<Q", len(b)) + b

    if isinstance(value, (list, tuple, np.ndarray)):
        items = list(value)
        if items and isinstance(items[0], str):
            body = struct.pack("<IQ", 8, len(items)) + b"".join(enc_str(x) for x in items)
        elif items and isinstance(items[0], (float, np.floating)):
            body = struct.pack("<IQ", 6, len(items)) + np.asarray(items, "<f4").tobytes()
        else:
            body = struct.pack("<IQ", 5, len(items)) + np.asarray(items, "<i4").tobytes()
        return enc_str(key) + struct.pack("<I", 9) + body
    if isinstance(value, np.generic):
        value = value.item()
    vtype = _VALUE_TYPE[type(value)]
    if vtype == 4 and not 0 <= value < 2**32:
        vtype = 11
    if vtype == 8:
        payload = enc_str(value)
    else:
        payload = struct.pack(SCALAR_FORMATS[vtype], value)
    return enc_str(key) + struct.pack("<I", vtype) + payload


@dataclass
class TensorSpec:
    """A tensor to write: its GGUF header fields and a function that yields its bytes in chunks."""

    name: str
    ne: tuple
    ggml_type: int
    nbytes: int
    chunks: object  # callable returning an iterable of bytes-like objects, nbytes in total


def write_gguf(
    f, metadata_entries: list[bytes], tensors: list[TensorSpec], alignment: int, progress=None, on_tensor=None
):
    """Streams a GGUF v3 file to the open binary file `f`: nothing is held in memory but one chunk.

    metadata_entries: already encoded entries (copied raw from a source, or from encode_metadata);
    it must include general.alignment when alignment != 32.
    """

    def pad(n: int) -> int:
        return -n % alignment

    f.write(GGUF_MAGIC + struct.pack("<IQQ", 3, len(tensors), len(metadata_entries)))
    for entry in metadata_entries:
        f.write(entry)
    offset = 0
    for t in tensors:
        name = t.name.encode("utf-8")
        f.write(struct.pack("<Q", len(name)) + name + struct.pack("<I", len(t.ne)))
        f.write(struct.pack(f"<{len(t.ne)}Q", *t.ne) + struct.pack("<IQ", t.ggml_type, offset))
        offset += t.nbytes + pad(t.nbytes)
    f.write(b"\0" * pad(f.tell()))
    for t in tensors:
        if on_tensor:
            on_tensor(t.name)
        written = 0
        for chunk in t.chunks():
            chunk = memoryview(chunk).cast("B")
            f.write(chunk)
            written += len(chunk)
            if progress:
                progress(len(chunk))
        if written != t.nbytes:
            raise RuntimeError(f"tensor {t.name}: wrote {written} bytes, expected {t.nbytes}")
        f.write(b"\0" * pad(written))


def write_gguf_file(output, metadata_entries: list[bytes], tensors: list[TensorSpec], alignment: int, progress=False):
    """write_gguf to `output` through a temporary name beside it, renamed once complete and synced;
    nothing left behind on failure (a full disk, Ctrl-C). progress: a tqdm bar on stderr (None:
    when stderr is a terminal)."""
    from tqdm import tqdm

    output = Path(output)
    tmp = output.with_name(f".{output.name}.part-{os.getpid()}")
    show = progress if progress is not None else sys.stderr.isatty()  # a log file gets no bar
    total = sum(t.nbytes for t in tensors)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=not show, file=sys.stderr)
    try:
        with open(tmp, "wb", buffering=0) as f:
            out = _DroppingWriter(f.fileno())
            try:
                write_gguf(
                    out,
                    metadata_entries,
                    tensors,
                    alignment,
                    progress=bar.update,
                    on_tensor=lambda name: bar.set_postfix_str(
                        name.split(".ffn")[0] if name.startswith("blk.") else name
                    ),
                )
            except BaseException:
                out.abandon()
                raise
            out.close()
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()


class _DroppingWriter:
    """A file's writes done by a thread: each SYNC_EVERY bytes are synced to disk and their pages
    dropped from the page cache (dirty pages of a multi-gigabyte output would otherwise fill the
    memory a cgroup allows, and written pages are never read back here)."""

    def __init__(self, fd: int):
        self.fd, self.position, self.error = fd, 0, None
        self._queue = queue.Queue(QUEUED)
        self._thread = threading.Thread(target=self._run, name="gguf-writer", daemon=True)
        self._thread.start()

    def write(self, data):
        if self.error is not None:
            raise self.error
        data = memoryview(data).cast("B")
        self._queue.put(data)
        self.position += len(data)

    def tell(self) -> int:
        return self.position

    def close(self):
        """Waits for every queued write and the final sync; raises the thread's error if any."""
        self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error

    def abandon(self):
        """Stops the thread without writing or syncing what is still queued (the file is deleted)."""
        self.error = self.error or InterruptedError("abandoned")
        self._queue.put(None)
        self._thread.join()

    def _run(self):
        written = started = 0
        flushing = []  # ranges whose writeback was started, oldest first
        while (data := self._queue.get()) is not None:
            if self.error is not None:
                continue  # drain: the producer raises at its next write
            try:
                while data:
                    n = os.write(self.fd, data)
                    data, written = data[n:], written + n
                if written - started >= SYNC_EVERY:
                    flushing.append(_start_writeback(self.fd, started, written))
                    started = written
                    if len(flushing) > WRITEBACK_AHEAD:
                        _finish_writeback(self.fd, *flushing.pop(0))
            except OSError as e:
                self.error = e
        if self.error is None:
            try:
                os.fdatasync(self.fd)
                os.posix_fadvise(self.fd, 0, written, os.POSIX_FADV_DONTNEED)
            except OSError as e:
                self.error = e


# sync_file_range (Linux): a range's writeback started without waiting for it, so the disk writes
# one range while the next is filled; fdatasync at every range made the writer wait for the disk
# each time with nothing queued behind. Where there is none, ranges are synced as they fill.
_SYNC_WAIT_BEFORE, _SYNC_WRITE, _SYNC_WAIT_AFTER = 1, 2, 4
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def _start_writeback(fd: int, start: int, end: int) -> tuple[int, int]:
    if _sync_file_range is None or _sync_file_range(fd, start, end - start, _SYNC_WRITE) != 0:
        os.fdatasync(fd)
    return start, end


def _finish_writeback(fd: int, start: int, end: int):
    """Waits until the range is on disk, then drops its pages from the cache (never read back)."""
    flags = _SYNC_WAIT_BEFORE | _SYNC_WRITE | _SYNC_WAIT_AFTER
    if _sync_file_range is None or _sync_file_range(fd, start, end - start, flags) != 0:
        os.fdatasync(fd)
    os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
