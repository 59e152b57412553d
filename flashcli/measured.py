"""Speeds this machine measured in earlier runs, for the cost model (loader.draft_pays, and the
draft length's prior in speculative.DraftLength until a run's own passes are measured).

A run that decoded under a budget leaves what it saw in ~/.cache/flashcli/measured.json (or
under $XDG_CACHE_HOME): the rate its streamed matrices arrived at (from passes that waited for
them), the rate a decoded token's products went through the model's weights (per model file),
and a draft's. The next run reads them; until a run has, the priors below stand in (BENCHMARKS.md
has the figures they come from). A cache that cannot be read or written is ignored: it only ever
informs a choice, never what is computed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

KEEP = 0.5  # weight of what earlier runs measured against the newest run's figure
DISK_BOUND = 0.3  # passes that waited this share of their time for reads measured the disk
PRIORS = {
    "disk": 1.5e9,  # bytes/s of streamed matrices arriving
    "compute": 16e9,  # bytes/s of weights through one token's products
}


def _path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flashcli" / "measured.json"


def _load() -> dict:
    try:
        data = json.loads(_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def disk_rate() -> float:
    """Bytes per second at which streamed matrices arrive."""
    return float(_load().get("disk", PRIORS["disk"]))


def compute_rate(model_file) -> float:
    """Bytes of weights per second through one decoded token's products, for this model file."""
    return float(_load().get(f"compute:{Path(model_file).name}", PRIORS["compute"]))


def is_measured(model_file) -> bool:
    return f"compute:{Path(model_file).name}" in _load()


def remember(model_file, *, matrix_bytes: int, tokens: int, seconds: float, waited: float, streamed: int) -> None:
    """One run's decoding: `tokens` tokens through `matrix_bytes` of weights in passes that took
    `seconds`, of which `waited` waiting for `streamed` bytes of reads."""
    new = {}
    if tokens and seconds > waited and matrix_bytes:
        new[f"compute:{Path(model_file).name}"] = matrix_bytes * tokens / (seconds - waited)
    if streamed and seconds > 0 and waited > DISK_BOUND * seconds:
        new["disk"] = streamed / seconds
    if not new:
        return
    kept = _load()
    kept.update({k: v if k not in kept else KEEP * float(kept[k]) + (1 - KEEP) * v for k, v in new.items()})
    try:
        path = _path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(kept, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass
