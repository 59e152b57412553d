"""Flash generation against llama.cpp under the same memory limit (cold cache, cgroup v1).

The 1.5B (Qwen2.5-Coder-1.5B-Instruct Q4_K_M) at a budget of 50% of its GGUF, 128 tokens
after a chat prompt; the cgroup limit is the budget plus flashcli's measured baseline, for
both engines. llama.cpp runs memory-mapped, with and without its weight repacking. Then the
tokens/s against the limit from 40% to 150% of the file, a 512-token prompt at 50%, and the
budget that holds everything against flashcli's dense engine.
"""

from __future__ import annotations

import os
import subprocess
import sys

from . import runner
from .runner import ROOT, engine_run, median_run

PROMPT = "Write a Python function that merges two sorted lists into one sorted list, with a docstring and two examples."
SWEEP = (0.4, 0.5, 0.6, 0.8, 1.0, 1.5)


def flash_file(model) -> str:
    """MODEL.flash.gguf beside a source in models/, in bench-out/ for a source elsewhere (a
    fixture in ../shared is not ours to write beside)."""
    out = str(model)[: -len(".gguf")] + ".flash.gguf"
    if os.path.dirname(os.path.abspath(out)) != str(ROOT / "models"):
        os.makedirs(runner.OUT, exist_ok=True)
        out = str(runner.OUT / os.path.basename(out))
    if not os.path.exists(out):
        subprocess.run(
            [sys.executable, "-m", "flashcli.cli", "convert", str(model), "-o", out, "-q"], cwd=ROOT, check=True
        )
    return out


def run(quick: bool = False) -> dict:
    from scripts.fetch_model import model_path

    qwen = model_path("qwen2.5-coder-1.5b")
    flash = flash_file(qwen)
    size = os.path.getsize(qwen)
    baseline = runner.flashcli_baseline(flash)
    tokens = runner.chat_tokens(qwen, PROMPT)
    n = 32 if quick else 128
    repeats = 1 if quick else 3
    budget = size // 2
    limit = budget + baseline
    out = {
        "model": str(qwen.name),
        "file_bytes": size,
        "baseline_bytes": baseline,
        "budget_bytes": budget,
        "limit_bytes": limit,
        "prompt_tokens": len(tokens),
        "n": n,
        "machine": runner.env_note(),
    }
    out["flashcli"] = median_run(
        [engine_run("flashcli", flash, tokens, n, limit, budget=budget) for _ in range(repeats)]
    )
    out["llama_unlimited"] = median_run([engine_run("llama", qwen, tokens, n) for _ in range(repeats)])
    timeout = 120 if quick else 300
    out["llama_limited"] = engine_run("llama", qwen, tokens, n, limit, timeout=timeout)
    out["llama_limited_no_repack"] = engine_run("llama", qwen, tokens, n, limit, timeout=timeout, no_repack=True)

    long_prompt = runner.text_tokens(qwen, 512)
    out["prefill_flashcli"] = engine_run("flashcli", flash, long_prompt, 2, limit, budget=budget)
    out["prefill_llama_unlimited"] = engine_run("llama", qwen, long_prompt, 2)

    # a budget that holds everything, against the dense engine on the source file
    for name in ("smollm2-135m", "qwen2.5-coder-1.5b"):
        src = model_path(name)
        whole = flash_file(src)
        out[f"whole_{name}"] = {
            "dense": median_run(
                [
                    engine_run(
                        "flashcli", src, tokens if name.startswith("qwen") else runner.chat_tokens(src, PROMPT), 32
                    )
                    for _ in range(repeats)
                ]
            ),
            "flash": median_run(
                [
                    engine_run(
                        "flashcli",
                        whole,
                        tokens if name.startswith("qwen") else runner.chat_tokens(src, PROMPT),
                        32,
                        budget=2 * os.path.getsize(whole),
                    )
                    for _ in range(repeats)
                ]
            ),
        }

    sweep = []
    for share in (0.5, 1.0) if quick else SWEEP:
        b = int(share * size)
        row = {"share": share, "limit_bytes": b + baseline}
        row["flashcli"] = engine_run("flashcli", flash, tokens, 32, b + baseline, timeout=timeout, budget=b)
        row["llama"] = engine_run("llama", qwen, tokens, 32, b + baseline, timeout=timeout)
        sweep.append(row)
    out["sweep"] = sweep
    runner.save("limits", out)
    return out
