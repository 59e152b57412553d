"""How much memory this process may use, and the DRAM budget that leaves room for the rest.

The room is the tightest of: each cgroup memory limit over this process (cgroup v1
`memory.limit_in_bytes`, v2 `memory.max`, the group's own and each ancestor's), less what the
group's other processes hold there (anonymous and shmem pages: page cache is reclaimed under
the limit, so it does not count), and the kernel's MemAvailable plus what this process holds
already. `--dram-budget` bounds the model's memory, not the interpreter's baseline (measured,
about 100 MiB), so the budget that fits the room is the room less the baseline and a margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .budget import format_size

CGROUP_ROOT = Path("/sys/fs/cgroup")
# Beyond the plan and the baseline measured before loading: Python objects made while loading
# and generating, and file pages mapped for the header, which the cgroup charges.
MARGIN_BYTES = 32 << 20
MARGIN_FRACTION = 0.02  # of the room, on top


@dataclass(frozen=True)
class Room:
    """What this process may hold in all (what it holds now included), and where that comes from."""

    total: int
    source: str  # how it was found, for -v


@dataclass(frozen=True)
class Limit:
    """One cgroup's memory limit and what its other processes hold."""

    path: Path  # the limit's file
    limit: int
    others: int


def read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # v2 writes "max" where there is no limit


def meminfo(key: str) -> int | None:
    """A /proc/meminfo field in bytes (MemAvailable, MemTotal)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name == key:
                    return int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def own_bytes() -> tuple[int, int]:
    """(resident, anonymous + shmem resident) bytes of this process."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssShmem"):
                fields[name] = int(rest.split()[0]) * 1024
    return fields.get("VmRSS", 0), fields.get("RssAnon", 0) + fields.get("RssShmem", 0)


def _stat(path: Path, keys: tuple) -> int:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    values = dict(line.split()[:2] for line in lines if len(line.split()) >= 2)
    return sum(int(values.get(k, 0)) for k in keys)


def cgroup_dirs(proc_cgroup: str = "/proc/self/cgroup", root: Path = CGROUP_ROOT) -> list[tuple[Path, str]]:
    """The memory cgroup directories of this process, its own first then each ancestor's, with
    the version ("v1", "v2"). In a container whose cgroup namespace hides the path, the mount's
    root is the group."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            found.append((root / "memory", path, "v1"))
        elif controllers == "":
            for mount in (root, root / "unified"):
                if (mount / "cgroup.controllers").exists():
                    found.append((mount, path, "v2"))
                    break
    dirs = []
    for mount, path, version in found:
        here = mount / path.lstrip("/")
        if not here.is_dir():
            here = mount
        while True:
            dirs.append((here, version))
            if here == mount:
                break
            here = here.parent
    return dirs


def cgroup_limits(own_anon: int, dirs: list | None = None) -> list[Limit]:
    """Each memory limit over this process (none where a group sets none)."""
    out = []
    physical = meminfo("MemTotal") or 1 << 62
    for here, version in cgroup_dirs() if dirs is None else dirs:
        if version == "v1":
            file, used = here / "memory.limit_in_bytes", ("total_rss", "total_shmem")
        else:
            file, used = here / "memory.max", ("anon", "shmem")
        limit = read_int(file)
        if limit is None or limit >= physical:  # v1's "no limit" is a huge number
            continue
        others = max(0, _stat(here / "memory.stat", used) - own_anon)
        out.append(Limit(file, limit, others))
    return out


def process_room() -> Room:
    """What this process may hold in all: the tightest cgroup limit less its other processes'
    share, or MemAvailable plus what this process holds now, whichever is less."""
    rss, anon = own_bytes()
    available = meminfo("MemAvailable")
    best = Room(rss + available, f"MemAvailable {format_size(available)} + this process's {format_size(rss)}")
    if available is None:
        best = Room(1 << 62, "no MemAvailable in /proc/meminfo")
    for lim in cgroup_limits(anon):
        room = lim.limit - lim.others
        if room < best.total:
            held = f", less {format_size(lim.others)} held by other processes there" if lim.others else ""
            best = Room(room, f"cgroup limit {format_size(lim.limit)} at {lim.path}{held}")
    return best


@dataclass(frozen=True)
class AutoBudget:
    """The budget chosen for a room: None where the model fits whole (it runs resident)."""

    budget: int | None
    room: Room
    baseline: int
    margin: int
    needed: int  # the model's plan with every matrix resident

    @property
    def available(self) -> int:
        return self.room.total - self.baseline - self.margin

    def describe(self) -> str:
        head = (
            f"room {format_size(self.room.total)} ({self.room.source}) - baseline {format_size(self.baseline)} "
            f"- margin {format_size(self.margin)} = {format_size(self.available)} for the model"
        )
        if self.budget is None:
            return f"--dram-budget auto: {head}; it needs {format_size(self.needed)} resident: no budget, all resident"
        return (
            f"--dram-budget auto: {head}; it needs {format_size(self.needed)} resident: "
            f"budget {format_size(self.budget)}"
        )


def margin_for(room: int) -> int:
    return MARGIN_BYTES + int(MARGIN_FRACTION * room)


def auto_budget(needed: int, baseline: int, room: Room) -> AutoBudget:
    """No budget where the whole model (`needed`, its plan without a budget) fits the room beside
    the baseline and a margin; else what is left there. A room smaller than the baseline gives
    a budget of 1 byte, which the plan refuses with its minimum."""
    margin = margin_for(room.total)
    left = room.total - baseline - margin
    return AutoBudget(None if needed <= left else max(left, 1), room, baseline, margin, needed)


def explicit_room(limit: int, what: str) -> Room:
    return Room(limit, f"{what} {format_size(limit)}")
