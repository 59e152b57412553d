"""Runs the chat Ctrl-C scenario of tests/test_chat.py (Ctrl-C the moment each kind of prompt is
up) many times with one core kept busy, as a test suite keeps it: the race of issue 31 showed
in 1 run of 12 on an idle machine and 5 of 24 with a core busy.

    python scripts/chat_ctrl_c_soak.py [RUNS] [--busy N]

Prints one line per run and a summary; exits 1 if any run failed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]

from test_chat import Terminal, ctrl_c_at_every_kind_of_prompt  # noqa: E402

from fetch_model import model_path  # noqa: E402


def spin():
    while True:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=int, nargs="?", default=50)
    parser.add_argument("--busy", type=int, default=1, help="cores kept busy by spinning meanwhile (default 1)")
    parser.add_argument(
        "--patience",
        type=float,
        default=5.0,
        help="the tests' timeouts times this (default 5): a lost Ctrl-C never brings its prompt, a loaded machine only delays it",
    )
    args = parser.parse_args()
    Terminal.PATIENCE = args.patience
    busy = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)]
    for p in busy:
        p.start()
    model, failed, start = model_path("smollm2-135m"), 0, time.monotonic()
    try:
        for i in range(args.runs):
            t0 = time.monotonic()
            try:
                ctrl_c_at_every_kind_of_prompt(model)
                status = "ok"
            except AssertionError as e:
                failed += 1
                lines = str(e).splitlines()
                status = "FAILED: " + lines[0] + " ... screen ends: " + repr("\n".join(lines[1:])[-400:])
            load = os.getloadavg()[0]
            print(
                f"run {i + 1}/{args.runs}: {status} ({time.monotonic() - t0:.1f} s, load average {load:.1f})",
                flush=True,
            )
    finally:
        for p in busy:
            p.terminate()
    print(f"{args.runs - failed} passed, {failed} failed in {time.monotonic() - start:.0f} s (busy cores: {args.busy})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
