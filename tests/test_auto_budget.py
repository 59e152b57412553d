"""--dram-budget auto (the default) and --memory-limit: the memory this process may use, read
from cgroup files (v1 and v2, a group's ancestors, a namespace that hides the path) or
MemAvailable; a model that fits runs resident; one that does not runs inside a real cgroup
limit instead of being killed, and inside --memory-limit by the kernel's count of its peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flashcli.flash.memory import Room, auto_budget, cgroup_dirs, cgroup_limits, margin_for

ROOT = Path(__file__).resolve().parent.parent
FLASHCLI = [sys.executable, "-m", "flashcli.cli"]
PROMPT = "The three primary colours are"
MiB = 1 << 20


def _write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v1_limits_of_the_group_and_its_ancestors(tmp_path):
    """The group's own limit, its parent's tighter one, and v1's "no limit" (a huge number)
    ignored; what other processes of a group hold (anon + shmem, less this process's) is left out."""
    root = tmp_path / "fs"
    _write(tmp_path / "cgroup", "5:cpu:/\n4:memory:/a/b\n0::/\n")
    _write(root / "memory/memory.limit_in_bytes", str(1 << 63))
    _write(root / "memory/a/memory.limit_in_bytes", str(300 * MiB))
    _write(root / "memory/a/memory.stat", f"total_rss {120 * MiB}\ntotal_shmem {10 * MiB}\ncache {999 * MiB}\n")
    _write(root / "memory/a/b/memory.limit_in_bytes", str(500 * MiB))
    _write(root / "memory/a/b/memory.stat", f"total_rss {30 * MiB}\n")
    dirs = cgroup_dirs(str(tmp_path / "cgroup"), root)
    assert dirs == [(root / "memory/a/b", "v1"), (root / "memory/a", "v1"), (root / "memory", "v1")]
    limits = cgroup_limits(own_anon=30 * MiB, dirs=dirs)
    assert [(lim.limit, lim.others) for lim in limits] == [(500 * MiB, 0), (300 * MiB, 100 * MiB)]


def test_cgroup_v2_limit_and_a_hidden_path(tmp_path):
    """v2: memory.max ("max" = none) up the tree; a path the namespace hides: the mount's root."""
    root = tmp_path / "fs"
    _write(tmp_path / "cgroup", "0::/user.slice/app\n")
    _write(root / "cgroup.controllers", "memory\n")
    _write(root / "user.slice/memory.max", f"{200 * MiB}\n")
    _write(root / "user.slice/memory.stat", f"anon {50 * MiB}\nshmem 0\nfile {900 * MiB}\n")
    _write(root / "user.slice/app/memory.max", "max\n")
    dirs = cgroup_dirs(str(tmp_path / "cgroup"), root)
    assert dirs == [(root / "user.slice/app", "v2"), (root / "user.slice", "v2"), (root, "v2")]
    assert [(lim.limit, lim.others) for lim in cgroup_limits(10 * MiB, dirs)] == [(200 * MiB, 40 * MiB)]
    _write(tmp_path / "hidden", "0::/not/here\n")
    assert cgroup_dirs(str(tmp_path / "hidden"), root) == [(root, "v2")]


def test_auto_budget_resident_where_the_model_fits():
    room = Room(1000 * MiB, "test")
    left = 1000 * MiB - 100 * MiB - margin_for(1000 * MiB)
    assert auto_budget(left, 100 * MiB, room).budget is None
    assert auto_budget(left + 1, 100 * MiB, room).budget == left


def _generate(model, tmp_path, *extra, run=None):
    stats = tmp_path / "s.json"
    cmd = FLASHCLI + ["generate", str(model), "-p", PROMPT, "-n", "12", "-v", "--stats-json", str(stats), *extra]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "cwd": ROOT}
    result = run(cmd, **pipes) if run else subprocess.run(cmd, timeout=300, **pipes).__dict__
    assert result["returncode"] == 0, result["stderr"]
    return result, json.loads(stats.read_text())


def test_a_model_that_fits_runs_resident(smollm2_flash, tmp_path):
    run, s = _generate(smollm2_flash, tmp_path)
    assert "no budget, all resident" in run["stderr"] and s["budget_plan"]["streamed_tensors"] == 0


def test_memory_limit_holds_the_whole_process(smollm2_flash, tmp_path):
    """--memory-limit below the peak of the same run with the model resident: a budget that
    streams, and the process's peak (the kernel's VmHWM) within the limit."""
    _, resident = _generate(smollm2_flash, tmp_path)
    limit = resident["peak_rss_bytes"] - 8 * MiB
    run, s = _generate(smollm2_flash, tmp_path, "--memory-limit", str(limit))
    assert "--memory-limit" in run["stderr"] and s["budget_plan"]["streamed_tensors"] > 0
    assert s["peak_rss_bytes"] <= limit, (s["peak_rss_bytes"], limit)


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.isdir("/sys/fs/cgroup/memory"),
    reason="needs root and cgroup v1 to set a memory limit",
)
def test_no_budget_under_a_cgroup_limit_runs_inside_it(smollm2_flash, tmp_path):
    """A cgroup limit below what the same run uses with the model resident (its group's peak),
    no --dram-budget given: the budget comes from the limit, the run finishes, no OOM kill, the
    group's peak within the limit."""
    from bench.cgroup import run_limited

    resident, _ = _generate(smollm2_flash, tmp_path, run=lambda cmd, **kw: run_limited(cmd, 64 << 30, **kw))
    limit = resident["max_usage_bytes"] - 16 * MiB
    run, s = _generate(smollm2_flash, tmp_path, run=lambda cmd, **kw: run_limited(cmd, limit, timeout=300, **kw))
    assert "cgroup limit" in run["stderr"] and s["budget_plan"]["streamed_tensors"] > 0
    assert run["oom_kills"] == 0 and s["generated_tokens"] > 0
    assert run["max_usage_bytes"] <= limit, (run["max_usage_bytes"], limit)
