"""Several tokens per pass over the weights (issues 18 and 23): speculative decoding under a budget.

The 1.5B (Qwen2.5-Coder-1.5B-Instruct Q4_K_M, converted) at --dram-budget 35%, 50% and 75% of its
GGUF, cold cache, cgroup limit = budget + flashcli's measured baseline; four task prompts (a code
edit, an explanation, code from a description, free text), 128 tokens each after the chat
template, greedy. flashcli runs through its CLI, as a user runs it, with `--draft off`, `ngram`
and `auto` (auto pairs the 1.5B with the lean draft of the 0.5B beside it, made by `flashcli
convert --layout draft`); its stdout, the generated text, must be byte-identical across the three.
A budget of twice the file (the whole model resident) checks that drafting does not slow a
compute-bound decode.

The reference, in the same run: llama.cpp warm with no memory limit, its decode loop in C calls
and its prompt outside the timing (scripts.bench.llama_warm), on the same prompt token ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

from . import runner
from .runner import ROOT, median

THREADS = 2
DRAFTS = ("off", "ngram", "auto")
# budgets, as shares of the GGUF's size (BENCH_SHARES=0.5 runs only that one)
SHARES = tuple(float(x) for x in os.environ.get("BENCH_SHARES", "0.35,0.5,0.75").split(","))

_SNIPPET = """def load_scores(path):
    scores = {}
    for line in open(path):
        name, score = line.split(",")
        scores[name] = int(score)
    return scores
"""

# long answers on purpose: each task should run its full 128 tokens
TASKS = {
    "code edit": "Change this function so that it closes the file, skips blank lines and lines starting with #, "
    "strips whitespace around names, and raises a ValueError naming the line number on a malformed "
    "line. Show the whole function.\n\n" + _SNIPPET,
    "explanation": "Explain step by step what this code does, what can go wrong with unusual input files, and how "
    "you would test it.\n\n" + _SNIPPET,
    "code from description": "Write a Python class LRUCache with a fixed capacity, get(key) and put(key, value) "
    "methods in O(1) time using a dict and a doubly linked list, with docstrings and type "
    "hints.",
    "free text": "Write a short essay for a newcomer on why version control matters in a team of programmers, "
    "with concrete examples of problems it prevents.",
}


def lean_draft(draft_source) -> str:
    """The 0.5B's lean draft beside it (made once, as `flashcli convert` makes it)."""
    out = str(draft_source)[: -len(".gguf")] + ".draft.gguf"
    if not os.path.exists(out):
        cmd = [sys.executable, "-m", "flashcli.cli", "convert", str(draft_source), "--layout", "draft", "-q"]
        subprocess.run(cmd, cwd=ROOT, check=True)
    return out


def run(quick: bool = False) -> dict:
    from scripts.fetch_model import fetch, model_path

    from .limits import flash_file

    qwen = model_path("qwen2.5-coder-1.5b")
    draft = lean_draft(fetch("qwen2.5-coder-0.5b", quiet=True))
    flash = flash_file(qwen)
    size = os.path.getsize(qwen)
    baseline = runner.flashcli_baseline(flash)
    n = 16 if quick else 128
    tasks = dict(list(TASKS.items())[:1]) if quick else TASKS
    timeout = 180 if quick else 600
    out = {
        "model": qwen.name,
        "draft_model": os.path.basename(draft),
        "file_bytes": size,
        "baseline_bytes": baseline,
        "n": n,
        "threads": THREADS,
        "machine": runner.env_note(),
        "budgets": {},
    }
    for share in (0.5,) if quick else SHARES:
        budget = int(size * share)
        limit = budget + baseline
        per_task = {}
        for name, prompt in tasks.items():
            runs = {d: flashcli_run(flash, prompt, n, budget, limit, d, timeout) for d in DRAFTS}
            per_task[name] = {"runs": runs, "identical": identical(runs)}
        out["budgets"][f"{share:.0%}"] = {
            "budget_bytes": budget,
            "limit_bytes": limit,
            "tasks": per_task,
            "medians": {d: _medians([t["runs"][d] for t in per_task.values()]) for d in DRAFTS},
            "identical_every_task": all(t["identical"] for t in per_task.values()),
        }
    prompts = {name: runner.chat_tokens(qwen, prompt) for name, prompt in tasks.items()}
    out["llama"] = llama_warm(qwen, prompts, n)
    out["llama"]["same_text"] = _same_text_as_llama(qwen, out, prompts)

    # the whole model in budget: compute-bound, where drafting must not cost
    whole_budget = 2 * os.path.getsize(flash)
    whole = {"budget_bytes": whole_budget, "limit_bytes": whole_budget + baseline, "tasks": {}}
    for name, prompt in tasks.items():
        runs = {
            d: flashcli_run(flash, prompt, n, whole_budget, whole_budget + baseline, d, timeout)
            for d in ("off", "auto")
        }
        whole["tasks"][name] = {"runs": runs, "identical": identical(runs)}
    whole["medians"] = {d: _medians([t["runs"][d] for t in whole["tasks"].values()]) for d in ("off", "auto")}
    out["whole"] = whole

    llama = out["llama"]["median_tok_s"]
    for b in out["budgets"].values():
        off, auto = b["medians"]["off"]["decode_tok_s"], b["medians"]["auto"]["decode_tok_s"]
        b["auto_over_off"] = auto / off if auto and off else None
        b["auto_over_llama"] = auto / llama if auto and llama else None
    w_off, w_auto = whole["medians"]["off"]["decode_tok_s"], whole["medians"]["auto"]["decode_tok_s"]
    out["whole_auto_over_off"] = w_auto / w_off if w_auto and w_off else None
    runner.save("speculative", out)
    return out


def llama_warm(model, prompts: dict, n: int) -> dict:
    """scripts.bench.llama_warm on every task's prompt in one process: per task its decode
    tokens/s and token ids, and the median."""
    runner.quiet_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "prompts.json")
        with open(path, "w") as f:
            json.dump(list(prompts.values()), f)
        cmd = [sys.executable, "-m", "scripts.bench.llama_warm", str(model), path, str(n), "--threads", str(THREADS)]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return {"status": "failed", "stderr": done.stderr[-2000:], "median_tok_s": None}
    data = json.loads(done.stdout)
    runs = dict(zip(prompts, data["runs"]))
    return {
        "status": "ok",
        "wall_s": time.perf_counter() - t0,
        "load_s": data["load_s"],
        "tasks": runs,
        "median_tok_s": median([r["decode_tok_s"] for r in runs.values()]),
    }


def _same_text_as_llama(model, out: dict, prompts: dict) -> dict:
    """Per task, whether flashcli's text at 50% with --draft off is llama.cpp's greedy text (its
    tokens up to the first end-of-generation token)."""
    from flashcli.engine.tokenizer import Tokenizer

    if out["llama"].get("status") != "ok" or "50%" not in out["budgets"]:
        return {}
    tok = Tokenizer(model)
    same = {}
    for name in prompts:
        ids = out["llama"]["tasks"][name]["token_ids"]
        stop = next((i for i, t in enumerate(ids) if tok.is_end_of_generation(t)), len(ids))
        ours = out["budgets"]["50%"]["tasks"][name]["runs"]["off"]
        same[name] = ours["status"] == "ok" and ours["text"] == tok.decode(ids[:stop])
    return same


def flashcli_run(model, prompt: str, n: int, budget: int, limit: int, draft: str, timeout: float) -> dict:
    """One cold run of `flashcli generate` inside a cgroup of `limit` bytes; the stats JSON's
    fields, with tokens_per_s (decode) as decode_tok_s, and stdout (the generated text)."""
    args = [str(model), "--dram-budget", str(budget), "--chat", "-n", str(n), "-p", prompt, "--draft", draft]
    run, data, idle = runner.limited_generate(args, limit, timeout, THREADS)
    text = run["stdout"] or b""
    out = {
        "draft_option": draft,
        "limit_bytes": limit,
        "cpu_idle_before": idle,
        "wall_s": run["wall_s"],
        "max_usage_bytes": run["max_usage_bytes"],
        "oom_kills": run["oom_kills"],
        "text": text.decode("utf-8", "replace"),
        "text_sha256": hashlib.sha256(text).hexdigest(),
    }
    if run["returncode"] == 0 and data:
        if data.get("draft") is None:  # one token per pass, said or not
            data.setdefault("tokens_per_pass", 1.0)
        return out | {"status": "ok", "decode_tok_s": data.get("tokens_per_s")} | data
    return out | runner.failure(run) | {"decode_tok_s": 0.0}


def identical(runs: dict) -> bool:
    """Whether every run finished and wrote the same bytes."""
    return all(r["status"] == "ok" for r in runs.values()) and len({r["text_sha256"] for r in runs.values()}) == 1


def _medians(runs: list[dict]) -> dict:
    keys = (
        "decode_tok_s",
        "tokens_per_pass",
        "acceptance_rate",
        "draft_ms_per_token",
        "pass_draft_ms",
        "pass_target_compute_ms",
        "pass_io_wait_ms",
        "bytes_read_per_token",
        "peak_rss_bytes",
        "max_usage_bytes",
    )
    return {k: median([r[k] for r in runs if r.get(k) is not None]) for k in keys}
