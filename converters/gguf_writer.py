"""Streaming GGUF writer: metadata entries (copied raw from a source or encoded here) and
tensors whose bytes come in chunks, so that a converted file never sits whole in memory."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from flashcli.gguf_file import GGUF_MAGIC, SCALAR_FORMATS

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
