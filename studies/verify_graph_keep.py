"""A verifying pass's graph kept between passes or built for each (issue 36), alternated in one process.

The 1.5B (the plain GGUF) resident, warm, 2 threads, exact mode: passes of k + 1 tokens (k = 0,
4, 8) after a prompt, each rolled back, with model.KEEP_COLUMNS = 1 (only single tokens' graphs
kept, as before commit acd5da0) and 64 (a pass of up to 64 single columns kept), alternated 25
times; of each pair of passes the second is timed (the kept graph's reuse). Medians, and each
against one token's.

    PYTHONPATH=. python studies/verify_graph_keep.py
"""

import statistics
import time

from flashcli.decoding.loader import LoadOptions, load
from flashcli.engine import model as engine_model
from flashcli.engine.tokenizer import Tokenizer
from scripts.fetch_model import model_path

path = str(model_path("qwen2.5-coder-1.5b"))
loaded = load(path, LoadOptions(threads=2, n_ctx=512))
target, tok = loaded.model, Tokenizer(path)
prompt = tok.encode("def quicksort(items):\n    ")
target.eval(prompt)
start = target.state.n_past
draft = tok.encode(" " + "x = items[0] if items else None; return sorted(items)" * 2)
times: dict = {}
for _ in range(25):
    for keep in (1, 64):
        engine_model.KEEP_COLUMNS = keep
        for k in (0, 4, 8):
            for second in (False, True):
                target.rollback(start)
                target.exact = True
                t0 = time.perf_counter()
                target.eval([prompt[-1]] + draft[:k], all_logits=True)
                if second:
                    times.setdefault((keep, k), []).append(time.perf_counter() - t0)
                target.exact = False
for keep in (1, 64):
    one = statistics.median(times[(keep, 0)])
    row = [
        f"k={k}: {statistics.median(times[(keep, k)]) * 1e3:.1f} ms ({statistics.median(times[(keep, k)]) / one:.2f}x)"
        for k in (0, 4, 8)
    ]
    print(f"KEEP_COLUMNS={keep}", " ".join(row))
loaded.close()
