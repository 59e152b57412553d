"""Where a study's figures live: one JSON file under studies/results/, written under a temporary
name and renamed when complete, which the README's figures cite."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def default_out(study: str, model: str | None = None) -> Path:
    """studies/results/<study>[-<model file stem>].json"""
    return RESULTS / (f"{study}-{Path(model).stem}.json" if model else f"{study}.json")


def save(out: Path, payload: dict) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"results: {out}", file=sys.stderr)
    return out
