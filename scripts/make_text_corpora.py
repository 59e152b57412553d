"""Builds the calibration and held-out text shipped with flashcli from the docstrings of Python's
standard library (Python Software Foundation License, permissive): real English prose that every
machine has, needing no download. Run once; the outputs are committed.

    python scripts/make_text_corpora.py
"""

import importlib
import inspect
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CALIBRATION_MODULES = ["subprocess", "threading", "logging", "argparse", "unittest", "asyncio.events", "http.server",
                       "email.message", "collections", "functools", "pathlib", "shutil", "tarfile", "zipfile",
                       "sqlite3", "socket", "ssl", "decimal", "fractions", "datetime", "calendar", "textwrap",
                       "difflib", "heapq", "bisect", "random", "statistics", "json", "csv", "pickle", "typing"]
HELDOUT_MODULES = ["inspect", "dataclasses", "enum", "contextlib", "tempfile", "configparser", "imaplib", "ftplib"]


def prose(module_names, limit_chars):
    out, seen = [], set()
    for name in module_names:
        mod = importlib.import_module(name)
        docs = [inspect.getdoc(mod)] + [inspect.getdoc(obj) for _, obj in inspect.getmembers(mod)
                                         if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == mod.__name__]
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


if __name__ == "__main__":
    header = "Text from the Python standard library's docstrings (Python Software Foundation License).\n\n"
    (ROOT / "converters" / "data" / "calibration.txt").write_text(header + prose(CALIBRATION_MODULES, 60_000))
    (ROOT / "tests" / "data" / "heldout.txt").write_text(header + prose(HELDOUT_MODULES, 12_000))
