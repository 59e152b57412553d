"""GGUF access: open a file memory-mapped, validate it, and hand out tensors as views.

Nothing here reads a whole file into memory: tensor data are views into one np.memmap.
Tensor names are the GGUF ones (`blk.{i}.ffn_gate.weight`), used as they are. Both sides read
through this module: generation, and the converter (converters/), which also writes GGUFs.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BadModelFile, UnsupportedModel
from .expert_records import stacked_views

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: its type, logical shape and raw bytes (a memmap view).

    `ne` is ggml order: ne[0] is the row length (the contiguous dimension). A 2-D weight of
    `ne = (d_in, d_out)` holds d_out rows of d_in values each.
    """

    name: str
    ggml_type: int
    ne: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    raw: np.ndarray  # uint8 view of exactly this tensor's bytes
    # experts laid out as records (expert_records.py): bytes from one expert's start to the
    # next, and raw is [n_expert, expert_bytes] strided; 0: stored whole, as GGUFs do
    stride: int = 0

    @property
    def span(self) -> int:
        """Bytes of the file from its offset to its last byte's end (records: its kind in each)."""
        return self.nbytes if not self.stride else (self.ne[-1] - 1) * self.stride + self.nbytes // self.ne[-1]

    @property
    def expert_stride(self) -> int:
        """Bytes from one expert of a stacked tensor [ne0, rows, n_expert] to the next."""
        return self.stride or self.nbytes // self.ne[-1]

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.ne[1:])) if len(self.ne) > 1 else 1

    @property
    def row_len(self) -> int:
        return self.ne[0]

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.n_rows

    def rows(self) -> np.ndarray:
        """The raw bytes as a (n_rows, row_bytes) uint8 view."""
        return self.raw.reshape(self.n_rows, self.row_bytes)

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"type{self.ggml_type}"


class StringArray:
    """A GGUF array of strings, left in the file: the tokenizer's 49k tokens cost nothing to skip."""

    def __init__(self, mm: np.ndarray, offset: int, count: int):
        self._mm, self._offset, self._count = mm, offset, count

    def __len__(self) -> int:
        return self._count

    def __iter__(self):
        pos = self._offset
        for _ in range(self._count):
            n = int(self._mm[pos : pos + 8].view(np.uint64)[0])
            yield bytes(self._mm[pos + 8 : pos + 8 + n]).decode("utf-8", errors="replace")
            pos += 8 + n


class GGUFFile:
    """A validated, memory-mapped GGUF file: metadata values and tensors by name.

    A small parser of our own rather than gguf.GGUFReader, which materialises every array element
    as a numpy object (170 MB of Python heap for SmolLM2's vocabulary): a tool that promises a
    memory budget cannot spend that just to open a file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd = -1  # for posix_fadvise, opened when first needed
        self.mm = _open_memmap(self.path)
        try:
            self.metadata, self.metadata_spans, infos, self.data_offset, self.alignment = _parse(self.mm)
        except (IndexError, ValueError, UnicodeDecodeError, struct.error) as e:
            raise BadModelFile(f"{self.path}: corrupt or truncated GGUF header ({e})") from None
        self.tensors = _tensors(self.mm, infos, self.data_offset, self.path)
        try:  # a converted mixture's experts: records, and views of each kind in them
            self.views = stacked_views(self.metadata, self.tensors, TensorInfo)
        except (KeyError, TypeError, ValueError) as e:
            raise BadModelFile(f"{self.path}: corrupt expert records ({e})") from None

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name] if name in self.tensors else self.views[name]
        except KeyError:
            raise BadModelFile(f"{self.path}: missing tensor {name}") from None

    def has(self, name: str) -> bool:
        return name in self.tensors or name in self.views

    def prefetch(self, names):
        """Asks the kernel to read these tensors now (the file is mapped MADV_RANDOM, so nothing
        else is read around a fault: the page cache holds what we use, not the read-ahead)."""
        for name in names:
            t = self.tensor(name)
            start = t.offset - t.offset % mmap.PAGESIZE
            _madvise(self.mm, mmap.MADV_WILLNEED, start, t.offset + t.span - start)

    def read_ahead(self, offset: int, length: int):
        """Asks the kernel to read [offset, offset + length) of the file now, in large reads (the
        mapping is MADV_RANDOM: bytes copied out of it would otherwise fault a page at a time)."""
        start = offset - offset % mmap.PAGESIZE
        end = min(offset + length, self.mm.size)
        if end > start:
            _madvise(self.mm, mmap.MADV_WILLNEED, start, end - start)

    def copy_out(self, name: str) -> np.ndarray:
        """A copy of a tensor's bytes in our own memory, read with pread (read_into)."""
        t = self.tensors[name]
        out = np.empty(t.nbytes, np.uint8)
        self.read_into(t.offset, t.nbytes, out.ctypes.data)
        return out

    def read_into(self, offset: int, length: int, address: int, chunk: int = 16 << 20):
        """Reads [offset, offset + length) of the file into memory at `address` with pread, and
        drops those pages from the page cache behind it. Bulk loads go this way, not through the
        mapping: faulting a MADV_RANDOM mapping reads a page at a time (tens of MB/s where pread
        reads hundreds), and the copy must not sit in memory twice."""
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDONLY)
        done = 0
        while done < length:
            n = min(chunk, length - done)
            os.posix_fadvise(self._fd, offset + done + n, min(chunk, length - done - n), os.POSIX_FADV_WILLNEED)
            view = memoryview((ctypes.c_char * n).from_address(address + done)).cast("B")
            got = 0
            while got < n:
                k = os.preadv(self._fd, [view[got:]], offset + done + got)
                if k == 0:
                    raise BadModelFile(f"{self.path}: truncated (a tensor runs past the end of the file)")
                got += k
            os.posix_fadvise(self._fd, offset + done, n, os.POSIX_FADV_DONTNEED)
            done += n

    def release_range(self, offset: int, length: int):
        """Drops the whole pages of [offset, offset + length) of the file from this mapping."""
        start, end = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE, (offset + length) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            _madvise(self.mm, mmap.MADV_DONTNEED, start, end - start)
            if self._fd < 0:
                self._fd = os.open(self.path, os.O_RDONLY)
            os.posix_fadvise(self._fd, start, end - start, os.POSIX_FADV_DONTNEED)

    def release(self, names):
        """Drops these tensors' pages from this mapping and from the page cache: their bytes
        were copied elsewhere (repacked weights) and will not be read here again."""
        for t in (self.tensor(n) for n in names):
            self.release_range(t.offset, t.span)  # whole pages only: neighbours may still be in use

    def raw_metadata(self, key: str) -> bytes:
        """The entry for `key` exactly as stored (key, type and value), to copy into another file."""
        start, end = self.metadata_spans[key]
        return bytes(self.mm[start:end])


def _open_memmap(path: Path) -> np.ndarray:
    if not path.exists():
        raise BadModelFile(f"{path}: no such file")
    if path.is_dir():
        raise BadModelFile(f"{path}: is a directory, not a GGUF file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise BadModelFile(f"{path}: cannot read ({e.strerror})") from None
    if magic != GGUF_MAGIC:
        raise BadModelFile(f"{path}: not a GGUF file (bad magic {magic!r})")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    # Page faults must not read ahead: the device's read-ahead can be megabytes, and faulting in a
    # 6 KB threshold vector would pull a slice of neuron bundles into the page cache (and the budget).
    _madvise(mm, getattr(mmap, "MADV_RANDOM", None), 0, mm.size)
    return mm


def _madvise(mm: np.memmap, advice, start: int, length: int):
    raw = getattr(mm, "_mmap", None)
    if advice is None or raw is None or not hasattr(raw, "madvise"):
        return  # not Linux, or numpy changed: lose an optimisation, not correctness
    raw.madvise(advice, start, min(length, len(raw) - start))


# GGUF value types -> struct format (scalars); 8 = string, 9 = array
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}


def _parse(mm: np.ndarray):
    """Header, metadata and tensor infos of a GGUF v2/v3 file. Returns plain Python values."""
    buf = memoryview(mm)
    pos = 4

    def take(fmt):
        nonlocal pos
        value = struct.unpack_from(fmt, buf, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def string():
        nonlocal pos
        n = take("<Q")
        if pos + n > len(buf):
            raise ValueError("string runs past the end of the file")
        value = bytes(buf[pos : pos + n]).decode("utf-8")
        pos += n
        return value

    def value(vtype):
        nonlocal pos
        if vtype in SCALAR_FORMATS:
            return take(SCALAR_FORMATS[vtype])
        if vtype == 8:
            return string()
        if vtype == 9:
            item_type, count = take("<I"), take("<Q")
            if item_type == 8:
                start = pos
                for _ in range(count):
                    n = take("<Q")  # length-prefixed: skip the bytes
                    pos += n
                    if pos > len(buf):
                        raise ValueError("array runs past the end of the file")
                return StringArray(mm, start, count)
            if item_type in _NUMPY:
                dt = np.dtype(_NUMPY[item_type])
                arr = np.frombuffer(buf, dtype=dt, count=count, offset=pos)
                pos += count * dt.itemsize
                return arr.tolist() if count <= 64 else arr
            raise ValueError(f"unsupported array item type {item_type}")
        raise ValueError(f"unknown metadata value type {vtype}")

    version = take("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = take("<Q"), take("<Q")
    if n_tensors > 1 << 24 or n_kv > 1 << 24:
        raise ValueError("implausible tensor or key count")
    metadata, spans = {}, {}
    for _ in range(n_kv):
        start = pos
        key = string()
        metadata[key] = value(take("<I"))
        spans[key] = (start, pos)  # raw bytes of the entry, for copying it verbatim
    infos = []
    for _ in range(n_tensors):
        name = string()
        n_dims = take("<I")
        if n_dims > 4:
            raise ValueError(f"tensor {name} has {n_dims} dimensions")
        ne = tuple(take("<Q") for _ in range(n_dims))
        infos.append((name, ne, take("<I"), take("<Q")))
    alignment = int(metadata.get("general.alignment", 32))
    data_offset = -(-pos // alignment) * alignment
    return metadata, spans, infos, data_offset, alignment


def _tensors(mm: np.ndarray, infos, data_offset: int, path: Path) -> dict[str, TensorInfo]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    file_size = mm.size
    tensors = {}
    for name, ne, ggml_type, rel_offset in infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise UnsupportedModel(f"{path}: tensor {name} has unknown type {ggml_type}") from None
        n = int(np.prod(ne)) if ne else 1
        nbytes = n // block * type_size
        start = data_offset + int(rel_offset)
        if start + nbytes > file_size:
            raise BadModelFile(
                f"{path}: truncated GGUF (tensor {name} ends at byte {start + nbytes}, file has {file_size})"
            )
        tensors[name] = TensorInfo(name, ggml_type, ne, start, mm[start : start + nbytes])
    return tensors
