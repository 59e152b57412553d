"""Speeds this machine measured in earlier runs, for the cost model (loader.draft_pays, and the
draft length's prior in speculative.DraftLength until a run's own passes are measured).

A run that decoded under a budget leaves what it saw in ~/.cache/flashcli/measured.json (or
under $XDG_CACHE_HOME): the rate its streamed matrices arrived at (from passes that waited for
them), the rate a decoded token's products went through the model's weights (per model file),
and a draft's. Each figure keeps the last HISTORY runs' values; the cost model reads their
median, and only once MIN_RUNS runs have measured it: until then the priors below stand in
(BENCHMARKS.md has the figures they come from). One run slowed by other work on the cores is
then one value of several, not the figure, and a choice made from these figures does not flip
with whatever ran last. A cache that cannot be read or written is ignored: it only ever informs
a choice, never what is computed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

HISTORY = 9  # runs kept per figure
MIN_RUNS = 3  # runs that must have measured a figure before it replaces the prior
DISK_BOUND = 0.3  # passes that waited this share of their time for reads measured the disk
PRIORS = {
    "disk": 1.5e9,  # bytes/s of streamed matrices arriving
    "compute": 16e9,  # bytes/s of weights through one token's products
}


@dataclass(frozen=True)
class Figure:
    """A rate the cost model uses: the median of `runs` measured values, or the prior where
    fewer than MIN_RUNS runs measured it (`runs` then says how many did)."""

    value: float
    runs: int
    measured: bool

    def describe(self) -> str:
        if self.measured:
            return f"{self.value / 1e9:.2f} GB/s (median of {self.runs} runs)"
        return f"{self.value / 1e9:.2f} GB/s (prior: {self.runs} of {MIN_RUNS} runs measured)"


def _path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flashcli" / "measured.json"


def _load() -> dict:
    """{key: [values, oldest first]}; an older cache's single figure reads as one run."""
    try:
        data = json.loads(_path().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    out = {}
    for key, values in data.items():
        values = values if isinstance(values, list) else [values]
        kept = [float(v) for v in values if isinstance(v, (int, float)) and v > 0]
        if kept:
            out[key] = kept[-HISTORY:]
    return out


def _compute_key(model_file) -> str:
    return f"compute:{Path(model_file).name}"


def _figure(key: str, prior: float) -> Figure:
    values = _load().get(key, [])
    if len(values) < MIN_RUNS:
        return Figure(prior, len(values), False)
    return Figure(_median(values), len(values), True)


def _median(values: list[float]) -> float:  # not the statistics module's: it imports decimal, 0.6 MiB
    v, mid = sorted(values), len(values) // 2
    return v[mid] if len(v) % 2 else 0.5 * (v[mid - 1] + v[mid])


def disk() -> Figure:
    """Bytes per second at which streamed matrices arrive."""
    return _figure("disk", PRIORS["disk"])


def compute(model_file) -> Figure:
    """Bytes of weights per second through one decoded token's products, for this model file."""
    return _figure(_compute_key(model_file), PRIORS["compute"])


def remember(model_file, *, matrix_bytes: int, tokens: int, seconds: float, waited: float, streamed: int) -> None:
    """One run's decoding: `tokens` tokens through `matrix_bytes` of weights in passes that took
    `seconds`, of which `waited` waiting for `streamed` bytes of reads."""
    new = {}
    if tokens and seconds > waited and matrix_bytes:
        new[_compute_key(model_file)] = matrix_bytes * tokens / (seconds - waited)
    if streamed and seconds > 0 and waited > DISK_BOUND * seconds:
        new["disk"] = streamed / seconds
    if not new:
        return
    kept = _load()
    for key, value in new.items():
        kept[key] = (kept.get(key, []) + [value])[-HISTORY:]
    try:
        path = _path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(kept, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass
