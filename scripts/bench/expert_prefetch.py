"""Pre-gating on or off (issue 35): one decode run of a mixture of experts at a budget, cold cache.

Through the loader (no cgroup: the budget is flashcli's own; experts are read with O_DIRECT, so
the page cache holds none of them), greedy, N tokens after a fixed prompt; prints tok/s over the
decode steps after the first token, io wait a step, the expert hit rate, experts prefetched a
token, the first tokens (which must not depend on the switch), and per stretch of the run
(tokens 2-16, 17-32, 33-64, 65-N: the caches start empty) its tok/s, io wait, experts read a
token and the rate of the reads while waited for. Alternate the two runs a few
times: the virtual disk's rate varies from run to run.

    python -m scripts.bench.expert_prefetch MODEL on|off [--share 0.5] [-n 32] [--cold]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from .cgroup import drop_caches

PROMPT = "The history of the printing press begins"
PHASES = (16, 32, 64)  # tokens after which a stretch of the run is reported apart (its cache filling)


def run(path: str, prefetch: bool, share: float = 0.5, n: int = 32, threads: int = 2, warm: bool = True) -> dict:
    from flashcli.decoding.generate import generate_step
    from flashcli.decoding.loader import LoadOptions, load
    from flashcli.decoding.sampling import make_sampler
    from flashcli.engine.tokenizer import Tokenizer
    from flashcli.flash.flash_model import FlashOptions

    drop_caches()
    options = LoadOptions(
        dram_budget=int(os.path.getsize(path) * share),
        threads=threads,
        n_ctx=n + 64,
        flash=FlashOptions(expert_prefetch=prefetch, warm_experts=warm),
    )
    start = time.perf_counter()
    loaded = load(path, options)
    load_s = time.perf_counter() - start
    model, ffn = loaded.model, loaded.model.ffn

    def now():  # (seconds, io wait, experts read, bytes read)
        return time.perf_counter(), model.io_wait_s, sum(c.misses for c in ffn.caches), ffn.bytes_read

    tokens, marks = [], {}
    for i, t in enumerate(generate_step(model, Tokenizer(path).encode(PROMPT), make_sampler(0.0), n)):
        tokens.append(t)
        if i + 1 in (1, *PHASES, n):  # after the first token, and after each phase's last
            marks[i + 1] = now()
    (t0, waited, _, _), (t1, waited1, _, _) = marks[1], marks[n]
    seconds = t1 - t0
    telemetry = ffn.telemetry(n)
    loaded.close()
    ends = sorted(marks)
    phases = {}
    for lo, hi in zip(ends, ends[1:]):
        (a_t, a_w, a_e, a_b), (b_t, b_w, b_e, b_b), k = marks[lo], marks[hi], hi - lo
        phases[f"{lo + 1}-{hi}"] = {
            "tok_s": round(k / (b_t - a_t), 2),
            "io_wait_ms": round((b_w - a_w) / k * 1e3, 1),
            "experts_read": round((b_e - a_e) / k, 1),
            "read_GB_s_waiting": round((b_b - a_b) / max(b_w - a_w, 1e-9) / 1e9, 2),
        }
    return {
        "prefetch": prefetch,
        "tok_s": (n - 1) / seconds,
        "io_wait_ms": (waited1 - waited) / (n - 1) * 1e3,
        "hit_rate": telemetry.get("expert_hit_rate"),
        "prefetched_per_token": telemetry.get("experts_prefetched_per_token"),
        "guessed_right": telemetry.get("prefetch_guessed_right"),
        "first_tokens": tokens[:8],
        "load_s": round(load_s, 2),  # the slots' warm fill included (warm_s)
        "warm_s": round(telemetry.get("warm_s", 0.0), 2),
        "experts_warmed": telemetry.get("experts_warmed", 0),
        "first_token_s": round(t0 - start - load_s, 2),  # the prompt's pass
        "phases": phases,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("prefetch", choices=("on", "off"))
    ap.add_argument("--share", type=float, default=0.5, help="budget as a share of the file (default 0.5)")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="compute threads (default 2)")
    ap.add_argument("--cold", action="store_true", help="slots empty at load, not filled with calibration's hottest")
    args = ap.parse_args()
    print(json.dumps(run(args.model, args.prefetch == "on", args.share, args.n, args.threads, not args.cold)))


if __name__ == "__main__":
    main()
