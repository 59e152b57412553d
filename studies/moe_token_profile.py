"""Where a token of a mixture of experts goes under a budget (issue 35): a cProfile of the decode.

Loads MODEL at SHARE of its file size through the loader (cold cache, no cgroup), decodes WARM
tokens unprofiled (the caches filling), then profiles the next N - WARM: prints tok/s, io wait
and total ms a token, the FFN's telemetry, and the 25 functions with the most time of their
own. Graph computes show as ggml.py's `compute`; waits for expert reads as lock `acquire` and
queue `get`; the rest is Python. PF=1 in the environment turns pre-gating on.

    PYTHONPATH=. python studies/moe_token_profile.py MODEL.flash.gguf 0.5 192 96
"""

import cProfile
import os
import pstats
import sys
import time

from flashcli.decoding.generate import generate_step
from flashcli.decoding.loader import LoadOptions, load
from flashcli.decoding.sampling import make_sampler
from flashcli.engine.tokenizer import Tokenizer
from flashcli.flash.flash_model import FlashOptions
from scripts.bench.cgroup import drop_caches

path, share, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
warm = int(sys.argv[4]) if len(sys.argv) > 4 else 16
drop_caches()
options = LoadOptions(
    dram_budget=int(os.path.getsize(path) * share),
    threads=2,
    n_ctx=512,
    flash=FlashOptions(expert_prefetch=os.environ.get("PF") == "1"),
)
loaded = load(path, options)
m = loaded.model
gen = generate_step(m, Tokenizer(path).encode("The history of the printing press begins"), make_sampler(0.0), n)
for _ in range(warm):
    next(gen)
w0, t0 = m.io_wait_s, time.perf_counter()
profile = cProfile.Profile()
profile.enable()
k = sum(1 for _ in gen)
profile.disable()
dt = time.perf_counter() - t0
print(
    f"{k} tokens {k / dt:.2f} tok/s, io wait {(m.io_wait_s - w0) / k * 1e3:.1f} ms/token, total {dt / k * 1e3:.1f} ms/token"
)
print(m.ffn.telemetry(n))
pstats.Stats(profile).sort_stats("tottime").print_stats(25)
loaded.close()
