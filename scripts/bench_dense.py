"""Decode speed, flashcli's dense engine against llama.cpp (llama-cpp-python) on the same GGUF,
the same thread count, side by side in one run.

    python scripts/bench_dense.py [--threads 2] [--tokens 64] [--skip-1b]

Models: SmolLM2-135M-Instruct Q4_1 (models/, fetched by `make model`) and a synthetic
llama-shaped model of 1.1B parameters in Q4_0 (written once to models/synthetic-1b-q4_0.gguf).
Each engine evaluates the same 16-token prompt, then decodes N single tokens; we report the median
per-token time. Warm cache: this measures compute, not disk.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flashcli.model import Model  # noqa: E402
from flashcli.synthetic import LLAMA_1B, write_llama_gguf  # noqa: E402
from flashcli.tokenizer import _quiet_stderr  # noqa: E402


def median_decode_s(eval_tokens, prompt, n_tokens) -> float:
    """Evaluates the prompt, then n_tokens single tokens; the median seconds of one."""
    eval_tokens(prompt)
    times = []
    for _ in range(n_tokens):
        t = time.perf_counter()
        eval_tokens([prompt[-1]])
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_llama_cpp(path, prompt, n_tokens, threads):
    from llama_cpp import Llama

    with _quiet_stderr():
        llm = Llama(str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    return median_decode_s(llm.eval, prompt, n_tokens)


def bench_flashcli(path, prompt, n_tokens, threads):
    return median_decode_s(Model(path, n_threads=threads, n_ctx=512).eval, prompt, n_tokens)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--skip-1b", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    models = [("SmolLM2-135M Q4_1", ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf", 0.3)]
    if not args.skip_1b:
        path = ROOT / "models" / "synthetic-1b-q4_0.gguf"
        if not path.exists():
            print(f"writing {path} (once)", file=sys.stderr)
            write_llama_gguf(path, LLAMA_1B, weight_type=2, seed=0, embd_type=2)
        models.append(("synthetic llama 1.1B Q4_0", path, 0.5))

    rows = []
    prompt = [1] + list(range(300, 315))
    for name, path, target in models:
        llama_s = bench_llama_cpp(path, prompt, args.tokens, args.threads)
        ours_s = bench_flashcli(path, prompt, args.tokens, args.threads)
        row = {"model": name, "threads": args.threads, "llama_cpp_tok_s": 1 / llama_s,
               "flashcli_tok_s": 1 / ours_s, "ratio": llama_s / ours_s, "target_ratio": target}
        rows.append(row)
        print(f"{name:28s} llama.cpp {1 / llama_s:7.1f} tok/s  flashcli {1 / ours_s:7.1f} tok/s  "
              f"ratio {llama_s / ours_s:.2f} (target >= {target})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
