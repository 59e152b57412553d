"""Many prompts at once: `flashcli generate --batch FILE --parallel N` under the budget.

The 1.5B (Qwen2.5-Coder-1.5B-Instruct Q4_K_M, its converted file) at --dram-budget 50% of its
GGUF, cold cache, cgroup limit = budget + flashcli's measured baseline; 32 short coding
questions (data/batch_prompts.jsonl), `--chat -n 96 --draft off`, greedy, through the CLI at
--parallel 1, 4, 8 and 16. Sequences decoded together share each pass over the weights, so the
bytes read per generated token should fall as --parallel rises, while every prompt's text stays
the one --parallel 1 gives (one prompt at a time). Aggregate tokens/s: every generated token in
the JSON Lines over the wall time of the process, load and prefill included.

Reference in the same run, llama.cpp with no limit (llama-cpp-python, cold cache, the same
chat-templated prompt token ids): the prompts one at a time in one process that loads the model
once (main() below), greedy up to 96 tokens, stopping at end of generation. Its aggregate
tokens/s counts generation time, prefill included and the model's load excluded; the figure with
the load (the process's wall time) is kept beside it.

    python -m scripts.bench.batch MODEL --tokens FILE -n 96 [--threads 2] [--progress FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import runner
from .cgroup import drop_caches
from .runner import ROOT

THREADS = 2
PARALLEL = (1, 4, 8, 16)
PROMPTS = Path(__file__).resolve().parent / "data" / "batch_prompts.jsonl"


def run(quick: bool = False) -> dict:
    from scripts.fetch_model import model_path

    from .limits import flash_file

    qwen = model_path("qwen2.5-coder-1.5b")
    flash = flash_file(qwen)
    size = os.path.getsize(qwen)
    baseline = runner.flashcli_baseline(flash)
    budget = size // 2
    limit = budget + baseline
    prompts = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    prompts = prompts[:8] if quick else prompts
    n = 16 if quick else 96
    timeout = 600 if quick else 3600
    out = {
        "model": qwen.name,
        "flash_model": Path(flash).name,
        "file_bytes": size,
        "baseline_bytes": baseline,
        "budget_bytes": budget,
        "limit_bytes": limit,
        "prompts_file": str(PROMPTS.relative_to(ROOT)),
        "prompt_count": len(prompts),
        "n": n,
        "threads": THREADS,
        "quick": quick,
        "machine": runner.env_note(),
    }

    runs = [flashcli_batch(flash, prompts, n, p, budget, limit, timeout) for p in (PARALLEL[:2] if quick else PARALLEL)]
    llama = llama_reference(qwen, prompts, n, timeout)
    one = runs[0]
    for r in runs + [llama]:
        r["same_as_parallel_1"] = same_text(r, one)
        r["over_parallel_1"] = _ratio(r["aggregate_tok_s"], one["aggregate_tok_s"])
        r["over_llama"] = _ratio(r["aggregate_tok_s"], llama["aggregate_tok_s"])
    out["runs"], out["llama"] = runs, llama
    # the chat template applied alike: flashcli's prompt token counts are llama.cpp's
    out["prompt_tokens_match_llama"] = all(
        r.get("prompt_tokens") == llama["results"].get(i, {}).get("prompt_tokens")
        for i, r in one["results"].items()
        if "text" in r
    )
    out["identical_every_prompt"] = all(r["status"] == "ok" and r["same_as_parallel_1"] == len(prompts) for r in runs)
    runner.save("batch", out)
    return out


def flashcli_batch(model, prompts: list[dict], n: int, parallel: int, budget: int, limit: int, timeout: float) -> dict:
    """One cold run of `flashcli generate --batch` inside a cgroup of `limit` bytes: its JSON Lines
    by prompt id, aggregate tokens/s over the process's wall time, bytes read per generated token
    (every read of the run, prefill included), and its --stats-json object under 'stats'."""
    with tempfile.TemporaryDirectory() as tmp:
        batch = Path(tmp) / "prompts.jsonl"
        batch.write_text("".join(json.dumps(p) + "\n" for p in prompts))
        args = [str(model), "--batch", str(batch), "--parallel", str(parallel), "--dram-budget", str(budget)]
        args += ["--chat", "-n", str(n), "--draft", "off"]
        run, data, idle = runner.limited_generate(args, limit, timeout, THREADS)
    results = _json_lines((run["stdout"] or b"").decode("utf-8", "replace"))
    generated = sum(r.get("generated_tokens", 0) for r in results.values())
    out = {
        "parallel": parallel,
        "limit_bytes": limit,
        "cpu_idle_before": idle,
        "wall_s": run["wall_s"],
        "max_usage_bytes": run["max_usage_bytes"],
        "oom_kills": run["oom_kills"],
        "generated_tokens": generated,
        "aggregate_tok_s": generated / run["wall_s"],
        "bytes_read_per_generated_token": data["bytes_read"] / generated
        if "bytes_read" in data and generated
        else None,
        "prompt_errors": {i: r["error"] for i, r in results.items() if "error" in r},
        "missing": [p["id"] for p in prompts if p["id"] not in results],
        "stats": data,
        "results": results,
    }
    if run["returncode"] == 0:
        return out | {"status": "ok"}
    return out | runner.failure(run)


def llama_reference(model, prompts: list[dict], n: int, timeout: float) -> dict:
    """llama.cpp with no limit from a cold page cache, the prompts one at a time in one process
    (main() below); what it finished when cut short."""
    from flashcli.tokenizer import Tokenizer

    tok = Tokenizer(model)  # as runner.chat_tokens, with one tokenizer for every prompt
    tokens = {p["id"]: tok.encode(tok.apply_chat_template(p["prompt"]), special=True) for p in prompts}
    with tempfile.TemporaryDirectory() as tmp:
        tokens_file, progress = Path(tmp) / "tokens.json", Path(tmp) / "progress.jsonl"
        tokens_file.write_text(json.dumps(tokens))
        cmd = [
            sys.executable,
            "-m",
            "scripts.bench.batch",
            str(model),
            "--tokens",
            str(tokens_file),
            "-n",
            str(n),
            "--threads",
            str(THREADS),
            "--progress",
            str(progress),
        ]
        idle = runner.quiet_cpu()
        drop_caches()
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True, cwd=ROOT)
            returncode, timed_out, stderr = p.returncode, False, p.stderr
        except subprocess.TimeoutExpired as e:
            returncode, timed_out, stderr = -9, True, str(e.stderr or "")
        wall = time.perf_counter() - t0
        events = [json.loads(line) for line in progress.read_text().splitlines()] if progress.exists() else []
    results = {
        e["id"]: {k: v for k, v in e.items() if k not in ("event", "t", "id")} for e in events if e["event"] == "answer"
    }
    loaded = next((e for e in events if e["event"] == "loaded"), {})
    done = next((e for e in events if e["event"] == "done"), None)
    generated = sum(r["generated_tokens"] for r in results.values())
    generate_s = sum(r["seconds"] for r in results.values())
    out = {
        "cpu_idle_before": idle,
        "wall_s": wall,
        "load_s": loaded.get("seconds"),
        "generated_tokens": generated,
        "generate_s": generate_s,
        "aggregate_tok_s": generated / generate_s if generate_s else 0.0,
        "aggregate_tok_s_with_load": generated / wall,
        "peak_rss_bytes": done.get("peak_rss_bytes") if done else None,
        "missing": [p["id"] for p in prompts if p["id"] not in results],
        "results": results,
    }
    if done and returncode == 0:
        return out | {"status": "ok"}
    return out | {"status": "timeout" if timed_out else "failed", "error": (stderr or "")[-500:]}


def same_text(run: dict, reference: dict) -> int:
    """How many prompts have the same text in both runs (a prompt that failed in either: not)."""
    ref = reference["results"]
    return sum(
        1
        for i, r in run["results"].items()
        if "text" in r and i in ref and "text" in ref[i] and r["text"] == ref[i]["text"]
    )


def _json_lines(text: str) -> dict:
    """flashcli's JSON Lines by prompt id; a line cut short by a kill is dropped."""
    out = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "id" in record:
            out[record.pop("id")] = record
    return out


def _ratio(a, b):
    return a / b if a and b else None


def main():
    """The llama.cpp reference's own process: the model loaded once, then each prompt in turn, its
    KV cache cleared between them. Progress goes to --progress as JSON lines: one at load, one per
    answer (with its text and seconds, prefill included), one at the end."""
    import llama_cpp

    from .engines import Progress, last_logits, llama_model, peak_rss

    ap = argparse.ArgumentParser(description="llama.cpp, greedy, one prompt at a time in one process")
    ap.add_argument("model")
    ap.add_argument("--tokens", required=True, help="JSON object: prompt id -> chat-templated token ids")
    ap.add_argument("-n", type=int, default=96, help="tokens to generate at most per prompt")
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--progress", default=None)
    args = ap.parse_args()
    prompts = json.loads(Path(args.tokens).read_text())
    progress = Progress(args.progress)

    t0 = time.perf_counter()
    llm = llama_model(args.model, max(map(len, prompts.values())) + args.n + 16, args.threads, True)
    progress("loaded", seconds=time.perf_counter() - t0)
    vocab = llm._model.vocab
    for id_, prompt in prompts.items():
        t = time.perf_counter()
        llm.reset()  # the next eval() drops the KV cache from position 0
        llm.eval(prompt)
        prefill_s = time.perf_counter() - t
        generated, finish = [], "length"
        while True:
            token = int(np.argmax(last_logits(llm)))
            if llama_cpp.llama_vocab_is_eog(vocab, token):  # as flashcli: the end token is not counted
                finish = "stop"
                break
            generated.append(token)
            if len(generated) == args.n:
                break
            llm.eval([token])
        seconds = time.perf_counter() - t
        # token by token, as flashcli's stream decodes, so that equal tokens give equal text
        text = b"".join(llm.detokenize([g]) for g in generated).decode("utf-8", "replace")
        progress(
            "answer",
            id=id_,
            prompt_tokens=len(prompt),
            generated_tokens=len(generated),
            finish_reason=finish,
            prefill_s=prefill_s,
            seconds=seconds,
            text=text,
        )
    progress("done", peak_rss_bytes=peak_rss())


if __name__ == "__main__":
    main()
