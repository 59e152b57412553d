"""Builds the calibration and held-out text shipped with flashcli from the docstrings of Python's
standard library (Python Software Foundation License, permissive): real English prose that every
machine has, needing no download. Run once; the outputs are committed, and what was written
(modules, sizes, sha256) goes to studies/results/make_text_corpora.json (or --out).

    python studies/make_text_corpora.py [--out FILE]
"""

import argparse
import hashlib
import importlib
import inspect
import re
import sys
from pathlib import Path

from _results import default_out, save

ROOT = Path(__file__).resolve().parent.parent
CALIBRATION_MODULES = [
    "subprocess",
    "threading",
    "logging",
    "argparse",
    "unittest",
    "asyncio.events",
    "http.server",
    "email.message",
    "collections",
    "functools",
    "pathlib",
    "shutil",
    "tarfile",
    "zipfile",
    "sqlite3",
    "socket",
    "ssl",
    "decimal",
    "fractions",
    "datetime",
    "calendar",
    "textwrap",
    "difflib",
    "heapq",
    "bisect",
    "random",
    "statistics",
    "json",
    "csv",
    "pickle",
    "typing",
]
HELDOUT_MODULES = ["inspect", "dataclasses", "enum", "contextlib", "tempfile", "configparser", "imaplib", "ftplib"]


def prose(module_names, limit_chars):
    out, seen = [], set()
    for name in module_names:
        mod = importlib.import_module(name)
        docs = [inspect.getdoc(mod)] + [
            inspect.getdoc(obj)
            for _, obj in inspect.getmembers(mod)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == mod.__name__
        ]
        for doc in docs:
            for para in (doc or "").split("\n\n"):
                para = " ".join(line.strip() for line in para.splitlines())
                letters = sum(c.isalpha() or c.isspace() for c in para)
                if len(para) < 120 or letters < 0.9 * len(para) or para in seen or re.search(r">>>|\{|\}|==", para):
                    continue
                seen.add(para)
                out.append(para)
                if sum(len(p) for p in out) > limit_chars:
                    return "\n\n".join(out) + "\n"
    return "\n\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", type=Path, default=None, help="results JSON (default: studies/results/make_text_corpora.json)"
    )
    args = ap.parse_args()
    header = "Text from the Python standard library's docstrings (Python Software Foundation License).\n\n"
    written = {}
    for path, modules, limit in (
        (ROOT / "converters" / "data" / "calibration.txt", CALIBRATION_MODULES, 60_000),
        (ROOT / "tests" / "data" / "heldout.txt", HELDOUT_MODULES, 12_000),
    ):
        text = header + prose(modules, limit)
        path.write_text(text)
        written[str(path.relative_to(ROOT))] = {
            "modules": modules,
            "chars": len(text),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
        }
    save(args.out or default_out("make_text_corpora"), {"python": sys.version.split()[0], "files": written})


if __name__ == "__main__":
    main()
