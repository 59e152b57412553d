"""python -m scripts.bench [--section NAME ...] [--quick] [--report-only]"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import ablation, batch, columns, dense, disk, limits, moe, quality, report, runner, scale, speculative

SECTIONS = {
    "disk": disk,
    "dense": dense,
    "limits": limits,
    "ablation": ablation,
    "quality": quality,
    "speculative": speculative,
    "batch": batch,
    "columns": columns,
    "scale": scale,
    "moe": moe,
}
OPT_IN = {"scale", "moe"}  # hours, and files of 4 to 19 GB: run only when named
PARTIAL_REPORT = runner.OUT / "BENCHMARKS.sections.md"


def main():
    ap = argparse.ArgumentParser(description="flashcli's benchmarks: writes bench-out/*.json and BENCHMARKS.md")
    ap.add_argument(
        "--section",
        action="append",
        choices=list(SECTIONS),
        help="run only these (repeatable); their report goes to bench-out/BENCHMARKS.sections.md",
    )
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repeats: a smoke run, not for the record")
    ap.add_argument("--report-only", action="store_true", help="rewrite BENCHMARKS.md from bench-out/ only")
    args = ap.parse_args()
    if os.geteuid() != 0 and not args.report_only:
        sys.exit("bench: needs root (dropping the page cache, cgroup memory limits)")
    for name in [] if args.report_only else args.section or [s for s in SECTIONS if s not in OPT_IN]:
        t = time.time()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        SECTIONS[name].run(quick=args.quick)
        print(f"bench: {name} done in {time.time() - t:.0f} s", file=sys.stderr, flush=True)
    # a run of some sections reports beside their results: BENCHMARKS.md keeps the records of
    # earlier runs that a report made from bench-out/ alone would drop
    doc = PARTIAL_REPORT if args.section else report.DOC
    print(f"bench: wrote {report.write(doc)}", file=sys.stderr)


if __name__ == "__main__":
    main()
