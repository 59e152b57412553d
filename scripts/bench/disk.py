"""The disk's cost model: O_DIRECT reads of a given size from N threads at random aligned
offsets of the 1.5B's file (cold cache), throughput and requests per second; then what rows
streaming does: 1 MiB pieces of one 512 MiB range in order, read twice (the second pass is
what every token after the first sees, on a disk whose host caches)."""

from __future__ import annotations

import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import runner
from .cgroup import drop_caches

SIZES = (4096, 16384, 65536, 262144, 1 << 20)
THREADS = (1, 4, 8)


def measure(
    path,
    size: int,
    threads: int,
    total: int,
    pattern: str = "random",
    drop: bool = True,
    start: int = 1 << 28,
    fresh: bool = False,
) -> dict:
    """MB/s and reads/s of `total` bytes in reads of `size` from `threads` threads (sequential:
    in order from byte `start`), and the process's user and system CPU milliseconds per MB.
    Each thread reads into its own buffer, mapped in by its first read; fresh: every read into
    memory not touched before."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = max(threads, total // size)
        blocks = os.path.getsize(path) // 4096 - size // 4096
        if pattern == "random":
            offsets = (np.random.default_rng(size + threads).integers(0, blocks, n) * 4096).tolist()
        else:
            offsets = [start + k * size for k in range(n)]
        buffers = [mmap.mmap(-1, size * (len(offsets[i::threads]) if fresh else 1)) for i in range(threads)]

        def work(i):
            view = memoryview(buffers[i])
            for k, off in enumerate(offsets[i::threads]):
                os.preadv(fd, [view[k * size : (k + 1) * size] if fresh else view], off)

        if drop:
            drop_caches()
        c0, t = os.times(), time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, range(threads)))
        dt, c1 = time.perf_counter() - t, os.times()
        mb = n * size / 1e6
        return {
            "size": size,
            "threads": threads,
            "pattern": pattern,
            "fresh": fresh,
            "mb_s": mb / dt,
            "iops": n / dt,
            "user_ms_per_mb": 1e3 * (c1.user - c0.user) / mb,
            "system_ms_per_mb": 1e3 * (c1.system - c0.system) / mb,
        }
    finally:
        os.close(fd)


def run(quick: bool = False) -> list:
    from scripts.fetch_model import model_path

    path = model_path("qwen2.5-coder-1.5b")
    rows = []
    for size in SIZES:
        for threads in THREADS:
            runner.quiet_cpu()
            rows.append(measure(path, size, threads, (64 if quick else 256) << 20 if size > 16384 else (8 << 20)))
    runner.quiet_cpu()
    rows.append(measure(path, 1 << 20, 4, 512 << 20, "sequential"))
    rows.append(measure(path, 1 << 20, 4, 512 << 20, "sequential, again", drop=False))
    runner.save("disk", rows)
    return rows
