"""What reading costs the CPU (issue 35): disk.measure's O_DIRECT reads at random aligned
offsets, 1 and 8 in flight, into buffers already mapped in or into memory never touched (as an
expert slot's first fill); MB/s and the process's user and system CPU milliseconds per MB. On 2
cores that CPU time is taken from the compute wherever reads run beside it.

    python -m scripts.bench.read_cpu FILE [--mb 1500] [--record-kib 1024]
"""

from __future__ import annotations

import argparse

from .disk import measure

THREADS = (1, 8)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", help="a file of a GB or more (a model)")
    ap.add_argument("--mb", type=int, default=1500, help="MB read per case (default 1500)")
    ap.add_argument("--record-kib", type=int, default=1024, help="bytes a read, KiB (default 1024)")
    args = ap.parse_args()
    for threads in THREADS:
        for fresh in (False, True):
            r = measure(args.file, args.record_kib << 10, threads, args.mb << 20, fresh=fresh)
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}, flush=True)


if __name__ == "__main__":
    main()
