"""Where a mixture of experts' compute goes (issue 35): each graph of a decode timed by what runs it.

Loads MODEL at SHARE of its file size through the loader (no cgroup, the page cache as it is),
decodes N tokens after a fixed prompt and times every ggml graph of the last N - FROM of them by
its caller: `_run_experts` (a layer's experts: mul_mat_id over the slots and their weighted sum),
`eval_parts` (a layer's attention and the FFN input; the output head), `_route` (a layer's
router). Prints ms a token in all and each kind's count, median and ms a token.

    PYTHONPATH=. python studies/moe_graph_times.py MODEL.flash.gguf [SHARE 0.5] [N 96] [FROM 64]
"""

import collections
import os
import sys
import time

import numpy as np

from flashcli.decoding.generate import generate_step
from flashcli.decoding.loader import LoadOptions, load
from flashcli.decoding.sampling import make_sampler
from flashcli.engine import ggml
from flashcli.engine.tokenizer import Tokenizer

path = sys.argv[1]
share, n, start = (float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (0.5, 96, 64)
loaded = load(path, LoadOptions(dram_budget=int(os.path.getsize(path) * share), threads=2, n_ctx=256))
times, timing = collections.defaultdict(list), [False]
untimed = ggml.Graph.compute


def timed(self):
    t = time.perf_counter()
    untimed(self)
    if timing[0]:
        times[sys._getframe(1).f_code.co_name].append(time.perf_counter() - t)


ggml.Graph.compute = timed
prompt = Tokenizer(path).encode("The history of the printing press begins")
for i, _ in enumerate(generate_step(loaded.model, prompt, make_sampler(0.0), n)):
    if i + 1 == start:
        timing[0], t0 = True, time.perf_counter()
k = n - start
print(f"tokens {start + 1}-{n}: {(time.perf_counter() - t0) / k * 1e3:.1f} ms a token")
for name, v in sorted(times.items(), key=lambda kv: -sum(kv[1])):
    print(f"{name}: {len(v) / k:.1f} a token, median {np.median(v) * 1e3:.3f} ms, {sum(v) / k * 1e3:.1f} ms a token")
loaded.close()
