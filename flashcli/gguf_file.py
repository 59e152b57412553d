"""GGUF access: open a file memory-mapped, validate it, and hand out tensors as views.

Nothing here reads a whole file into memory: tensor data are views into one np.memmap.
Tensor names are the GGUF ones (`blk.{i}.ffn_gate.weight`), used as they are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadModelFile, UnsupportedModel

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


class GGUFFile:
    """A validated, memory-mapped GGUF file: metadata values and tensors by name."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.reader = _open_reader(self.path)
        self.metadata = _read_metadata(self.reader)
        self.tensors = _read_tensors(self.reader, self.path)

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise BadModelFile(f"{self.path}: missing tensor {name}") from None

    def has(self, name: str) -> bool:
        return name in self.tensors

    @property
    def data_offset(self) -> int:
        return int(self.reader.data_offset)

    @property
    def alignment(self) -> int:
        return int(self.reader.alignment)


def _open_reader(path: Path):
    from gguf import GGUFReader

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
    try:
        return GGUFReader(path, "r")
    except Exception as e:  # gguf-py raises ValueError, IndexError, struct errors...
        raise BadModelFile(f"{path}: corrupt or truncated GGUF ({type(e).__name__}: {e})") from None


def _read_metadata(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # unreadable field: keep going, a missing key is reported where needed
            continue
    return meta


def _read_tensors(reader, path: Path) -> dict[str, TensorInfo]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    file_size = path.stat().st_size
    tensors = {}
    for t in reader.tensors:
        ggml_type = int(t.tensor_type)
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise UnsupportedModel(f"{path}: tensor {t.name} has unknown type {ggml_type}") from None
        ne = tuple(int(x) for x in t.shape)
        n = int(np.prod(ne))
        nbytes = n // block * type_size
        start = int(t.data_offset)
        if start + nbytes > file_size:
            raise BadModelFile(
                f"{path}: truncated GGUF (tensor {t.name} ends at byte {start + nbytes}, "
                f"file has {file_size})"
            )
        raw = reader.data[start : start + nbytes]
        tensors[t.name] = TensorInfo(t.name, ggml_type, ne, start, raw)
    return tensors
