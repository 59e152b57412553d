"""One mixture of experts at one budget, against llama.cpp with no limit, several runs of each in
the same run (issue 35): llama.cpp's single warm run on the 30B varied from 4.0 to 5.4 tok/s
between bench runs, so a ratio of one run each is loose.

flashcli: `scale.generate` on the converted file (cold cache, cgroup limit = budget + baseline),
R times; llama.cpp: warm, no limit, the prompt R times in one process. Prints tok/s of each run,
io wait, whether the greedy tokens match llama.cpp's, and the ratio of the medians.

    python -m scripts.bench.moe_ratio SOURCE.gguf [--share 0.5] [--repeat 3] [-n 32]

The cache starts empty, so a short run is mostly its filling: -n 128 (llama-bench's tg128)
shows a reply's length, -n 32 (moe.N, the section's) its start.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from . import moe, runner, scale


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="the GGUF (its .flash.gguf beside it, from flashcli convert)")
    ap.add_argument("--share", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("-n", type=int, default=moe.N, help=f"tokens generated (default {moe.N})")
    args = ap.parse_args()
    flash = args.source[: -len(".gguf")] + ".flash.gguf"
    budget = int(os.path.getsize(args.source) * args.share)
    limit = budget + runner.flashcli_baseline(args.source)
    ours = [scale.generate(flash, moe.PROMPT, args.n, budget, limit) for _ in range(args.repeat)]
    theirs = scale.llama_unlimited(args.source, [moe.PROMPT] * args.repeat, args.n)["runs"]
    a = [r["stats"]["tokens_per_s"] for r in ours]
    b = [r["decode_tok_s"] for r in theirs]
    out = {
        "n": args.n,
        "flashcli": a,
        "io_wait_ms": [r["stats"]["io_wait_ms"] for r in ours],
        "llama": b,
        "same": [r["token_ids"] == theirs[0]["token_ids"] for r in ours],
        "ratio_of_medians": statistics.median(a) / statistics.median(b),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
