"""flashcli convert streams tensor by tensor: its peak memory does not grow with the file.

The peak is the converting process's own high-water mark (VmHWM, reset at exec), read by the
process itself as it exits: a child's ru_maxrss would carry the parent's (pytest's) peak over
fork and exec. Pages of a memory map it reads through count in VmHWM, so a converter that copies
out of the map grows with the file and fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from synthetic import TINY, Shape, write_llama_gguf

# 3 layers of d_model 2048 and n_ff 8192 in F16 (random bytes are quick to write): 352 MiB
WIDE = Shape(n_layers=3, d_model=2048, n_ff=8192, n_heads=16, n_kv_heads=4, n_vocab=512)
REPORTS_PEAK = """
import sys
from flashcli.cli import cli
try:
    cli(sys.argv[1:], standalone_mode=False)
finally:
    print([line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0], file=sys.stderr)
"""


def peak_convert_kib(source, output) -> int:
    run = subprocess.run(
        [sys.executable, "-c", REPORTS_PEAK, "convert", str(source), "-o", str(output), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return int(run.stderr.split()[-1])


def test_convert_peak_memory_does_not_grow_with_the_file(synthetic_dir, tmp_path):
    small = write_llama_gguf(synthetic_dir / "mem-small.gguf", TINY, 1)
    wide = write_llama_gguf(tmp_path / "mem-wide.gguf", WIDE, 1)
    size_kib = os.path.getsize(wide) // 1024
    small_peak = peak_convert_kib(small, tmp_path / "small.flash.gguf")
    wide_peak = peak_convert_kib(wide, tmp_path / "wide.flash.gguf")
    assert os.path.getsize(tmp_path / "wide.flash.gguf") >= os.path.getsize(wide)  # it was all written
    # what the wide file adds is a few chunks in flight, not a share of the file
    assert wide_peak - small_peak < size_kib // 4, (small_peak, wide_peak, size_kib)
    assert wide_peak < size_kib // 2


def test_read_into_reads_a_tensor_exactly_and_refuses_a_truncated_file(tmp_path):
    import numpy as np

    from flashcli.engine.gguf_file import GGUFFile
    from flashcli.errors import BadModelFile

    path = write_llama_gguf(tmp_path / "read.gguf", TINY, 8)
    gf = GGUFFile(path)
    t = gf.tensor("blk.1.ffn_down.weight")
    offset, nbytes = t.offset, t.nbytes
    out = np.zeros(t.nbytes, np.uint8)
    gf.read_into(t.offset, t.nbytes, out.ctypes.data, chunk=4096)  # several chunks, a partial last one
    assert np.array_equal(out, np.asarray(t.raw)) and np.array_equal(gf.copy_out(t.name), out)
    with open(path, "r+b") as f:  # cut short after it was opened (checked): the read finds the end
        f.truncate(offset + nbytes // 2)
    with pytest.raises(BadModelFile, match="truncated"):
        gf.read_into(offset, nbytes, out.ctypes.data)
