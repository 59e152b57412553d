"""Where a mixture of experts' token goes, without a profiler (issue 35): compute, io wait, the rest.

Loads MODEL (a converted file) at SHARE of its source's size through the loader (cold cache, no
cgroup), decodes N tokens after a fixed prompt and, over tokens FROM+1..N, prints ms a token in
all, in ggml's graphs (and how many graphs a token), waiting for expert reads (the FFN's
wait_s), and the rest (Python, numpy, the copies between graphs).

    SHARE=0.5 PYTHONPATH=. python studies/moe_token_split.py MODEL.flash.gguf 160 64
"""

import os
import sys
import time

from flashcli.decoding.generate import generate_step
from flashcli.decoding.loader import LoadOptions, load
from flashcli.decoding.sampling import make_sampler
from flashcli.engine import ggml
from flashcli.engine.tokenizer import Tokenizer
from scripts.bench.cgroup import drop_caches

path, n, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
share = float(os.environ.get("SHARE", "0.5"))
drop_caches()
loaded = load(
    path, LoadOptions(dram_budget=int(os.path.getsize(path.replace(".flash", "")) * share), threads=2, n_ctx=n + 32)
)
m = loaded.model
spent, on = [0.0, 0], [False]
untimed = ggml.Graph.compute


def timed(self):
    t = time.perf_counter()
    untimed(self)
    if on[0]:
        spent[0] += time.perf_counter() - t
        spent[1] += 1


ggml.Graph.compute = timed
prompt = Tokenizer(path).encode("The history of the printing press begins")
for i, _ in enumerate(generate_step(m, prompt, make_sampler(0.0), n)):
    if i + 1 == start:
        on[0], t0, w0 = True, time.perf_counter(), m.ffn.wait_s
k = n - start
total, compute, wait = (time.perf_counter() - t0) / k * 1e3, spent[0] / k * 1e3, (m.ffn.wait_s - w0) / k * 1e3
print(
    f"total {total:.1f} compute {compute:.1f} ({spent[1] / k:.0f} graphs) wait {wait:.1f} "
    f"rest {total - compute - wait:.1f} ms/token"
)
loaded.close()
