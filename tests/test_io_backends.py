"""I/O backends: exact bytes from both readers, read planning, short reads, counters, O_DIRECT."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import tempfile

import numpy as np
import pytest

from flashcli.flash import io_backends
from flashcli.flash.io_backends import DirectReader, MmapReader, open_reader, plan_reads

from conftest import ROOT

HEADER = 4096  # junk before the region: the region's offset
COUNT = 300
TAIL = 1000  # junk after the records, so the file ends mid-block
STRIDES = (1536, 9216)


def _accepts_o_direct(directory) -> bool:
    probe = os.path.join(directory, "probe")
    with open(probe, "wb") as f:
        f.write(b"\0" * 8192)
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
        try:
            os.preadv(fd, [mmap.mmap(-1, 4096)], 0)
        finally:
            os.close(fd)
        return True
    except OSError:
        return False
    finally:
        os.remove(probe)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A directory whose file system takes O_DIRECT, so that the direct path really runs."""
    tmp = tmp_path_factory.mktemp("io")
    if _accepts_o_direct(tmp):
        yield tmp
        return
    # tmpfs (older kernels) refuses O_DIRECT: fall back to the disk the repository is on.
    (ROOT / ".pytest_io").mkdir(exist_ok=True)
    disk = tempfile.mkdtemp(dir=ROOT / ".pytest_io")
    yield disk
    shutil.rmtree(ROOT / ".pytest_io")


def records(stride: int, count: int = COUNT) -> np.ndarray:
    """[count, stride] uint8: record i is i % 251 throughout, its first 4 bytes i as uint32."""
    ids = np.arange(count)
    rec = np.repeat((ids % 251).astype(np.uint8)[:, None], stride, axis=1)
    rec[:, :4] = ids.astype("<u4").view(np.uint8).reshape(count, 4)
    return rec


def write_region(path, stride: int, count: int = COUNT, tail: int = TAIL):
    rng = np.random.default_rng(stride)
    with open(path, "wb") as f:
        f.write(rng.integers(0, 256, HEADER, dtype=np.uint8).tobytes())
        f.write(records(stride, count).tobytes())
        f.write(rng.integers(0, 256, tail, dtype=np.uint8).tobytes())
        f.flush()
        os.fsync(f.fileno())
    return path


@pytest.fixture(scope="module", params=STRIDES, ids=lambda s: f"stride{s}")
def region(request, data_dir):
    stride = request.param
    path = write_region(os.path.join(data_dir, f"region{stride}.bin"), stride)
    assert os.path.getsize(path) % 4096  # the last block is partial
    return path, stride


ID_SETS = {
    "random": lambda rng: rng.choice(COUNT, 60, replace=False),
    "unsorted": lambda rng: np.array([250, 3, 4, 2, 120, 121, 0, 299, 7]),
    "empty": lambda rng: np.array([], dtype=np.int64),
    "last": lambda rng: np.array([COUNT - 1]),
    "single": lambda rng: np.array([17]),
    "all": lambda rng: rng.permutation(COUNT),
}


@pytest.mark.parametrize("kind", ["mmap", "direct"])
@pytest.mark.parametrize("case", ID_SETS)
def test_reads_exact_bytes(region, kind, case):
    path, stride = region
    ids = ID_SETS[case](np.random.default_rng(0))
    out = np.zeros((len(ids), stride), np.uint8)
    with open_reader(kind, path, HEADER, stride, COUNT) as reader:
        reader.read(ids, out)
        np.testing.assert_array_equal(out, records(stride)[ids])
        # A second call reuses the buffer (and the mapping) and must not see stale bytes.
        ids2 = ids[::-1][: max(1, len(ids) // 2)] if len(ids) else ids
        out2 = np.zeros((len(ids2), stride), np.uint8)
        reader.read(ids2, out2)
        np.testing.assert_array_equal(out2, records(stride)[ids2])


def test_rejects_bad_arguments(region):
    path, stride = region
    with DirectReader(path, HEADER, stride, COUNT) as reader:
        with pytest.raises(IndexError):
            reader.read(np.array([COUNT]), np.zeros((1, stride), np.uint8))
        with pytest.raises(ValueError):
            reader.read(np.array([1, 2]), np.zeros((1, stride), np.uint8))
    with pytest.raises(ValueError):
        open_reader("pread", path, HEADER, stride, COUNT)


def _check_plan(spans, ids, offset, stride, alignment, max_span):
    covered = np.zeros(offset + (max(ids) + 1) * stride + max_span, bool)
    for start, length in spans:
        assert start % alignment == 0 and length % alignment == 0
        assert 0 < length <= max_span
        assert not covered[start : start + length].any()  # no byte read twice
        covered[start : start + length] = True
    for i in ids:
        assert covered[offset + i * stride : offset + (i + 1) * stride].all()


def test_plan_coalesces_small_gaps_only():
    # Records 0, 1 and 3 of 1536 bytes lie within 8 KiB: one read.
    assert plan_reads(np.array([0, 1, 3]), 4096, 1536, 32768, 4096) == [(4096, 4096 + 4096)]
    # A gap of 150 KiB is not worth streaming.
    spans = plan_reads(np.array([0, 100]), 4096, 1536, 32768, 4096)
    assert spans == [(4096, 4096), (155648, 4096)]  # record 100 starts at 157696
    # The gap rule measures aligned extents: 3 records 32 KiB apart merge at 32768, not below.
    ids = np.array([0, 24, 48])  # 24 * 1536 = 36 KiB apart
    assert len(plan_reads(ids, 0, 1536, 32768, 4096)) == 1
    assert len(plan_reads(ids, 0, 1536, 32767, 4096)) == 3
    assert plan_reads(np.array([], dtype=np.int64), 0, 1536, 32768, 4096) == []


@pytest.mark.parametrize("stride", [512, 1536, 9216])
@pytest.mark.parametrize("alignment", [512, 4096])
@pytest.mark.parametrize("max_gap", [0, 8192, 32768])
def test_plan_is_aligned_covering_and_bounded(stride, alignment, max_gap):
    rng = np.random.default_rng(stride + alignment + max_gap)
    max_span = 64 * 1024
    for n in (1, 5, 80, 400):
        ids = np.sort(rng.choice(400, n, replace=False))
        spans = plan_reads(ids, 8192, stride, max_gap, alignment, max_span=max_span)
        _check_plan(spans, ids, 8192, stride, alignment, max_span)


def test_plan_cuts_long_runs():
    spans = plan_reads(np.arange(COUNT), HEADER, 9216, 32768, 4096)  # 2.7 MB contiguous
    assert len(spans) == 3 and all(length <= 1 << 20 for _, length in spans)
    _check_plan(spans, range(COUNT), HEADER, 9216, 4096, 1 << 20)
    with pytest.raises(ValueError):
        plan_reads(np.arange(3), 0, 1536, 0, 4096, max_span=5000)


def test_short_reads(region, monkeypatch):
    path, stride = region
    buffered = os.open(path, os.O_RDONLY)
    calls = []

    def at_most_1000_bytes(fd, buffers, offset):
        calls.append(offset)
        data = os.pread(buffered, min(len(buffers[0]), 1000), offset)
        buffers[0][: len(data)] = data
        return len(data)

    monkeypatch.setattr(io_backends.os, "preadv", at_most_1000_bytes)
    ids = np.random.default_rng(1).choice(COUNT, 40, replace=False)
    out = np.zeros((len(ids), stride), np.uint8)
    try:
        with DirectReader(path, HEADER, stride, COUNT) as reader:
            reader.read(ids, out)
            assert reader.n_reads == len(calls) >= len(ids) * stride / 1000
            reader.read(np.array([COUNT - 1]), out[:1])  # short reads up to EOF
            assert out[0, 0] == (COUNT - 1) % 256
    finally:
        os.close(buffered)
    np.testing.assert_array_equal(out[1:], records(stride)[ids[1:]])


def test_missing_record_raises(data_dir, monkeypatch):
    path = write_region(os.path.join(data_dir, "truncated.bin"), 1536, count=COUNT, tail=0)
    with open(path, "r+b") as f:
        f.truncate(HEADER + (COUNT - 1) * 1536 + 700)  # the last record is cut short
    out = np.zeros((1, 1536), np.uint8)
    with DirectReader(path, HEADER, 1536, COUNT) as reader:
        reader.read(np.array([COUNT - 2]), out)  # whole records before the cut read fine
        assert out[0, 0] == (COUNT - 2) % 256
        with pytest.raises(OSError):
            reader.read(np.array([0, COUNT - 1]), np.zeros((2, 1536), np.uint8))
        # The file shrinking under an open reader: reads come back empty before the end.
        monkeypatch.setattr(io_backends.os, "preadv", lambda fd, buffers, offset: 0)
        with pytest.raises(OSError):
            reader.read(np.array([3]), out)


@pytest.mark.parametrize("kind", ["mmap", "direct"])
def test_counters_show_coalescing(region, kind):
    path, stride = region
    ids = np.arange(100, 200)
    out = np.zeros((len(ids), stride), np.uint8)
    with open_reader(kind, path, HEADER, stride, COUNT) as reader:
        reader.read(ids, out)
        assert reader.bytes_read >= len(ids) * stride
        assert reader.n_reads < len(ids) / 4
        before = reader.bytes_read
        sparse = np.arange(0, COUNT, 50)
        reader.read(sparse, np.zeros((len(sparse), stride), np.uint8))
        assert reader.bytes_read - before >= len(sparse) * stride


def test_direct_reader_uses_o_direct(region):
    path, stride = region
    with DirectReader(path, HEADER, stride, COUNT) as reader:
        reader.read(np.arange(10), np.zeros((10, stride), np.uint8))
        assert reader.direct
        with open(f"/proc/self/fdinfo/{reader._fd}") as f:
            flags = int(next(line for line in f if line.startswith("flags:")).split()[1], 8)
        assert flags & os.O_DIRECT


def test_falls_back_to_buffered_when_o_direct_refused(region, monkeypatch):
    path, stride = region
    real_open, real_preadv = os.open, os.preadv

    def refuse_direct_open(p, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *a)

    def refuse_first_direct_read(fd, buffers, offset):
        if refused:  # once, as a file system that takes the open but not the read
            refused.pop()
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    ids = np.array([5, 299, 1, 2])
    for name, fake in [("open", refuse_direct_open), ("preadv", refuse_first_direct_read)]:
        refused = [True]
        out = np.zeros((len(ids), stride), np.uint8)
        with monkeypatch.context() as m:
            m.setattr(io_backends.os, name, fake)
            with pytest.warns(UserWarning, match="direct I/O refused"):
                with DirectReader(path, HEADER, stride, COUNT) as reader:
                    reader.read(ids, out)
                    assert not reader.direct
        np.testing.assert_array_equal(out, records(stride)[ids])


def _resident(path, start: int, length: int) -> int:
    """Pages of [start, start+length) of the file that are in the page cache (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable, for from_buffer
    base = ctypes.c_char.from_buffer(mm, start)
    n_pages = -(-length // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * n_pages)()
    assert libc.mincore(ctypes.c_void_p(ctypes.addressof(base)), ctypes.c_size_t(length), vec) == 0
    del base
    mm.close()
    return sum(v & 1 for v in vec)


@pytest.mark.parametrize("kind", ["mmap", "direct"])
def test_reads_leave_no_page_cache(region, kind):
    path, stride = region
    region_bytes = COUNT * stride
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if _resident(path, HEADER, region_bytes):
        pytest.skip("this kernel keeps the test file cached despite POSIX_FADV_DONTNEED")
    ids = np.random.default_rng(2).choice(COUNT, 50, replace=False)
    out = np.zeros((len(ids), stride), np.uint8)
    with open_reader(kind, path, HEADER, stride, COUNT) as reader:
        reader.read(ids, out)
        assert _resident(path, HEADER, region_bytes) == 0
    np.testing.assert_array_equal(out, records(stride)[ids])
    # Control: without dropping, the mapping leaves what it read in the page cache.
    with MmapReader(path, HEADER, stride, COUNT, drop_cache=False) as reader:
        reader.read(ids, out)
        assert _resident(path, HEADER, region_bytes) > 0
