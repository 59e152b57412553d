"""Run a command under a real memory limit (cgroup v1), from a cold page cache.

    sudo python -m scripts.bench.cgroup --limit 160M [--no-drop-caches] -- flashcli generate ...

Creates /sys/fs/cgroup/memory/flashcli-<pid>, sets memory.limit_in_bytes (page cache of the
group's files counts against it, as it should for a tool that reads from disk), drops the page
cache, runs the command inside the group, then prints one JSON line on stderr: exit status,
wall time, peak usage (memory.max_usage_in_bytes), how often the limit was hit, and whether the
OOM killer fired. Needs root and cgroup v1 (as on the development machines).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flashcli.flash.budget import parse_size  # noqa: E402

ROOT = Path("/sys/fs/cgroup/memory")


def drop_caches():
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run_limited(cmd: list[str], limit: int, drop: bool = True, timeout: float | None = None, **popen) -> dict:
    """Runs cmd inside a new memory cgroup of `limit` bytes (after dropping the page cache),
    killed after `timeout` seconds; returns its exit status, output and the group's counters."""
    group = ROOT / f"flashcli-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        if drop:
            drop_caches()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())), **popen)
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            timed_out = True
        wall = time.perf_counter() - t0
        oom = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
        stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
        return {
            "returncode": proc.returncode,
            "timed_out": timed_out,
            "wall_s": wall,
            "limit_bytes": limit,
            "max_usage_bytes": int((group / "memory.max_usage_in_bytes").read_text()),
            "failcnt": int((group / "memory.failcnt").read_text()),
            "oom_kills": int(oom.get("oom_kill", 0)),
            "page_cache_left_bytes": int(stat.get("cache", 0)),
            "stdout": out,
            "stderr": err,
        }
    finally:
        for _ in range(50):  # the group can be removed once its last task has gone
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", required=True, help="memory limit, e.g. 160M")
    ap.add_argument("--no-drop-caches", action="store_true")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    result = run_limited(cmd, parse_size(args.limit), drop=not args.no_drop_caches)
    print(json.dumps({k: v for k, v in result.items() if k not in ("stdout", "stderr")}), file=sys.stderr)
    sys.exit(result["returncode"] if result["returncode"] >= 0 else 128 - result["returncode"])


if __name__ == "__main__":
    main()
