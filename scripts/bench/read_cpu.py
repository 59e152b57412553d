"""What reading costs the CPU (issue 35): O_DIRECT reads of records at random aligned offsets of
a file, THREADS in flight, into memory already mapped in or not yet touched; MB/s and the
process's user and system CPU milliseconds per MB read. On 2 cores that CPU time is taken from
the compute wherever reads run beside it.

    python -m scripts.bench.read_cpu FILE [--mb 1500] [--record-kib 1024]
"""

from __future__ import annotations

import argparse
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .cgroup import drop_caches

THREADS = (1, 8)


def run(path: str, threads: int, record: int, total: int, mapped: bool) -> dict:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = total // record
        buffer = mmap.mmap(-1, n * record)
        dest = np.frombuffer(buffer, np.uint8)
        if mapped:
            dest[::4096] = 1  # every page mapped in before the reads
        blocks = (os.fstat(fd).st_size - record) // 4096
        offsets = (np.random.default_rng(threads * record).integers(0, blocks, n) * 4096).tolist()
        drop_caches()
        c0, t0 = os.times(), time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: os.preadv(fd, [dest[i * record : (i + 1) * record]], offsets[i]), range(n)))
        wall, c1 = time.perf_counter() - t0, os.times()
        mb = n * record / 1e6
        return {
            "threads": threads,
            "record_kib": record >> 10,
            "mapped": mapped,
            "mb_s": round(mb / wall),
            "user_ms_per_mb": round(1e3 * (c1.user - c0.user) / mb, 3),
            "system_ms_per_mb": round(1e3 * (c1.system - c0.system) / mb, 3),
        }
    finally:
        os.close(fd)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", help="a file of several GB (a model)")
    ap.add_argument("--mb", type=int, default=1500, help="MB read per case (default 1500)")
    ap.add_argument("--record-kib", type=int, default=1024, help="bytes a read, KiB (default 1024)")
    args = ap.parse_args()
    for threads in THREADS:
        for mapped in (True, False):
            print(run(args.file, threads, args.record_kib << 10, args.mb << 20, mapped), flush=True)


if __name__ == "__main__":
    main()
