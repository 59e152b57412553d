"""Dense decode, flashcli against llama.cpp on the same GGUF, the same threads, warm cache:
each engine evaluates the same 16-token prompt, then decodes single tokens; the median of the
per-token times, in one process per engine, engines alternating, three rounds."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from . import runner
from .runner import ROOT

CHILD = """
import json, statistics, sys, time
sys.path.insert(0, {root!r})
engine, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompt = [1] + list(range(300, 315))
if engine == "llama":
    from scripts.bench.engines import llama_model
    m = llama_model(path, 512, 2, True); ev = m.eval
else:
    from flashcli.engine.model import Model
    m = Model(path, n_threads=2, n_ctx=512); ev = m.eval
ev(prompt); ts = []
for _ in range(n):
    t = time.perf_counter(); ev([prompt[-1]]); ts.append(time.perf_counter() - t)
print(json.dumps(statistics.median(ts)))
"""


def run(quick: bool = False) -> dict:
    from scripts.fetch_model import model_path

    sys.path.insert(0, str(ROOT / "tests"))  # the synthetic GGUF writer lives with the tests
    from synthetic import LLAMA_1B, write_llama_gguf

    synthetic = ROOT / "models" / "synthetic-1b-q4_0.gguf"
    if not synthetic.exists():
        write_llama_gguf(synthetic, LLAMA_1B, weight_type=2, seed=0, embd_type=2)
    models = [
        ("Qwen2.5-Coder-1.5B Q4_K_M", model_path("qwen2.5-coder-1.5b")),
        ("synthetic llama 1.1B Q4_0", synthetic),
        ("Gemma 3 270M Q4_K_M", model_path("gemma3-270m")),
        ("SmolLM2-135M Q4_1", model_path("smollm2-135m")),
    ]
    rows = []
    for name, path in models:
        times = {"llama": [], "flashcli": []}
        for _ in range(1 if quick else 3):
            for engine in times:
                runner.quiet_cpu()
                p = subprocess.run(
                    [sys.executable, "-c", CHILD.format(root=str(ROOT)), engine, str(path), "16" if quick else "48"],
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=ROOT,
                )
                times[engine].append(json.loads(p.stdout.strip().splitlines()[-1]))
        llama, ours = statistics.median(times["llama"]), statistics.median(times["flashcli"])
        rows.append(
            {
                "model": name,
                "llama_tok_s": 1 / llama,
                "flashcli_tok_s": 1 / ours,
                "ratio": llama / ours,
                "rounds": len(times["llama"]),
            }
        )
    runner.save("dense", rows)
    return rows
