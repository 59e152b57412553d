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
    path, size: int, threads: int, total: int, pattern: str = "random", drop: bool = True, start: int = 1 << 28
) -> dict:
    """MB/s and reads/s of `total` bytes in reads of `size` from `threads` threads; sequential:
    in order from byte `start`."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = max(threads, total // size)
        blocks = os.path.getsize(path) // 4096 - size // 4096
        if pattern == "random":
            offsets = (np.random.default_rng(size + threads).integers(0, blocks, n) * 4096).tolist()
        else:
            offsets = [start + k * size for k in range(n)]
        buffers = [mmap.mmap(-1, size) for _ in range(threads)]

        def work(i):
            for off in offsets[i::threads]:
                os.preadv(fd, [buffers[i]], off)

        if drop:
            drop_caches()
        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, range(threads)))
        dt = time.perf_counter() - t
        return {"size": size, "threads": threads, "pattern": pattern, "mb_s": n * size / dt / 1e6, "iops": n / dt}
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
