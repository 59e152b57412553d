"""Does reading from disk slow a computation beside it? (issue 35: the reads ahead of a layer)

A numpy matmul (2 threads) and a memory copy, timed alone and then while O_DIRECT reads of 1 MiB
(8 at a time, random offsets of FILE) run through Linux AIO, so that no thread of ours wakes per
read; prints both times and the reads' rate, three times. Needs flashcli/flash/aio.py from
studies/moe_read_ahead_aio.patch, which applies at 52e80bc:

    git worktree add /tmp/aio 52e80bc && git -C /tmp/aio apply "$PWD/studies/moe_read_ahead_aio.patch"
    PYTHONPATH=/tmp/aio python studies/reads_beside_compute.py FILE
"""

import ctypes as C
import mmap
import os
import random
import sys
import threading
import time

import numpy as np

from flashcli.flash.aio import AsyncReads

path = sys.argv[1]
size = os.path.getsize(path)
os.environ.setdefault("OMP_NUM_THREADS", "2")
a = np.random.rand(2048, 2048).astype(np.float32)
b = np.random.rand(2048, 64).astype(np.float32)
big = np.ones(64 << 20, np.float32)
big2 = np.empty_like(big)


def compute_cpu(n=40):
    t = time.perf_counter()
    for _ in range(n):
        a @ b
    return time.perf_counter() - t


def compute_mem(n=10):
    t = time.perf_counter()
    for _ in range(n):
        np.copyto(big2, big)
    return time.perf_counter() - t


reads = AsyncReads(path, 64)
buf = mmap.mmap(-1, 32 << 20)
buf.write(b"\1" * (32 << 20))
base = C.addressof(C.c_char.from_buffer(buf))
stop = False
got = [0]


def reader():
    tag = 0
    while not stop:
        batch = []
        for i in range(8):
            tag += 1
            off = random.randrange(0, (size - (1 << 20)) // 4096) * 4096
            batch.append((tag, base + i * (4 << 20), 1 << 20, off))
        reads.start(batch)
        reads.wait([t for t, *_ in batch])
        got[0] += 8 << 20
        reads.ended.clear()


os.system("echo 3 > /proc/sys/vm/drop_caches")
for _rep in range(3):
    c0, m0 = compute_cpu(), compute_mem()
    stop = False
    got[0] = 0
    th = threading.Thread(target=reader)
    th.start()
    t = time.perf_counter()
    c1, m1 = compute_cpu(), compute_mem()
    stop = True
    th.join()
    dt = time.perf_counter() - t
    print(
        f"matmul {c0:.3f} s alone, {c1:.3f} s with reads; copy {m0:.3f} alone, {m1:.3f} with reads; reads {got[0] / dt / 1e9:.2f} GB/s",
        flush=True,
    )
reads.close()
