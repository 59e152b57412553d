"""One read an expert or three (issue 35, item 2): what laying an expert's gate, up and down out
as one record would buy on this disk.

Bursts of O_DIRECT reads at random offsets of FILE, as a layer's fetch issues them (1 or 2
experts a burst, as a decode's misses come): each expert either as three reads of 1 MiB (the
stacked tensors: gate, up and down apart) or as one read of 3 MiB (one record), all of a burst
in flight at once on 8 threads; the two kinds alternate, cold page cache at the start. Prints the
median and mean milliseconds an expert of each kind.

    python studies/expert_read_shapes.py FILE [--bursts 150]
"""

import argparse
import mmap
import os
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor, wait

MIB = 1 << 20


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--bursts", type=int, default=150)
    args = ap.parse_args()
    size = os.path.getsize(args.file)
    fd = os.open(args.file, os.O_RDONLY | os.O_DIRECT)
    pool = ThreadPoolExecutor(8)
    buffers = [mmap.mmap(-1, 3 * MIB) for _ in range(8)]
    for b in buffers:
        b.write(b"\1" * (3 * MIB))  # mapped in: no first-touch cost in the reads

    def burst(experts: int, split: bool) -> float:
        reads = [(MIB, 3)] * 3 * experts if split else [(3 * MIB, 1)] * experts
        futures = []
        for i, (n, _) in enumerate(reads):
            offset = random.randrange(0, (size - n) // 4096) * 4096
            futures.append(pool.submit(os.preadv, fd, [memoryview(buffers[i])[:n]], offset))
        t = time.perf_counter()
        wait(futures)
        return (time.perf_counter() - t) / experts

    os.system("echo 3 > /proc/sys/vm/drop_caches")
    per_expert = {True: [], False: []}
    for _ in range(args.bursts):
        for split in (True, False):
            per_expert[split].append(burst(random.choice((1, 1, 2)), split))
    for split, name in ((True, "three reads of 1 MiB"), (False, "one read of 3 MiB")):
        v = per_expert[split]
        print(f"{name}: median {statistics.median(v) * 1e3:.2f} ms an expert, mean {statistics.mean(v) * 1e3:.2f}")
    os.close(fd)


if __name__ == "__main__":
    main()
