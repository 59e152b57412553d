"""Several tokens per pass over the weights (issue 18): speculative decoding under the budget.

The 1.5B (Qwen2.5-Coder-1.5B-Instruct Q4_K_M) at --dram-budget 50% of its GGUF, cold cache,
cgroup limit = budget + flashcli's measured baseline; four task prompts (a code edit, an
explanation, code from a description, free text), 128 tokens each after the chat template,
greedy. flashcli runs through its CLI, as a user runs it, with `--draft off`, `ngram` and `auto`
(auto pairs the 1.5B with the 0.5B); its stdout, the generated text, must be byte-identical
across the three. A budget of twice the file (the whole model resident) checks that drafting
does not slow a compute-bound decode.

References in the same run, llama.cpp with no limit (scripts.bench.engines, cold cache, the same
prompt token ids): plain greedy, llama-cpp-python's LlamaPromptLookupDecoding, and the 0.5B as a
draft through its LlamaDraftModel interface (DraftLlama below); whether each speculative run
gives plain greedy's tokens is recorded, and the best configuration is the reference.
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from . import runner
from .runner import engine_run, median

THREADS = 2
DRAFTS = ("off", "ngram", "auto")

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

# llama.cpp references: name -> engine options (draft_model filled in at run time)
LLAMA_CONFIGS = {
    "plain": {},
    "prompt lookup, 4 tokens": {"lookup": 4},
    "prompt lookup, 10 tokens": {"lookup": 10},
    "0.5B draft, 4 tokens": {"draft_model": True, "draft_max": 4},
    "0.5B draft, 8 tokens": {"draft_model": True, "draft_max": 8},
    "0.5B draft, up to 16 tokens, p >= 0.75": {"draft_model": True, "draft_max": 16, "draft_p_min": 0.75},
}


def run(quick: bool = False) -> dict:
    from scripts.fetch_model import fetch, model_path

    from .limits import flash_file

    qwen = model_path("qwen2.5-coder-1.5b")
    draft = fetch("qwen2.5-coder-0.5b", quiet=True)
    flash = flash_file(qwen)
    size = os.path.getsize(qwen)
    baseline = runner.flashcli_baseline(flash)
    budget = size // 2
    limit = budget + baseline
    n = 16 if quick else 128
    tasks = dict(list(TASKS.items())[:1]) if quick else TASKS
    timeout = 180 if quick else 600
    out = {
        "model": qwen.name,
        "draft_model": draft.name,
        "file_bytes": size,
        "baseline_bytes": baseline,
        "budget_bytes": budget,
        "limit_bytes": limit,
        "n": n,
        "threads": THREADS,
        "machine": runner.env_note(),
        "tasks": {},
    }

    for name, prompt in tasks.items():
        runs = {d: flashcli_run(flash, prompt, n, budget, limit, d, timeout) for d in DRAFTS}
        out["tasks"][name] = {
            "prompt": prompt,
            "prompt_tokens": len(runner.chat_tokens(qwen, prompt)),
            "runs": runs,
            "identical": identical(runs),
        }
    out["medians"] = {d: _medians([t["runs"][d] for t in out["tasks"].values()]) for d in DRAFTS}

    llama = {}
    for config, options in LLAMA_CONFIGS.items():
        options = {k: (str(draft) if k == "draft_model" else v) for k, v in options.items()}
        per_task = {}
        for name, prompt in tasks.items():
            per_task[name] = engine_run(
                "llama", qwen, runner.chat_tokens(qwen, prompt), n, timeout=timeout, threads=THREADS, **options
            )
        llama[config] = {
            "options": options,
            "tasks": per_task,
            "median_tok_s": median([r.get("decode_tok_s") or 0.0 for r in per_task.values()]),
            "all_ok": all(r.get("status") == "ok" for r in per_task.values()),
        }
    for config in llama.values():  # greedy-exact: plain greedy's tokens on every task
        for name, r in config["tasks"].items():
            plain = llama["plain"]["tasks"][name]
            both = r.get("status") == plain.get("status") == "ok"
            r["exact"] = r.get("token_ids") == plain.get("token_ids") if both else None
        exact = [r["exact"] for r in config["tasks"].values()]
        config["exact"] = None if None in exact else all(exact)
    out["llama"] = llama
    usable = {k: v for k, v in llama.items() if v["all_ok"]}
    out["llama_best"] = max(usable, key=lambda k: usable[k]["median_tok_s"]) if usable else None

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

    off, auto = out["medians"]["off"]["decode_tok_s"], out["medians"]["auto"]["decode_tok_s"]
    best = llama[out["llama_best"]]["median_tok_s"] if out["llama_best"] else None
    out["auto_over_off"] = auto / off if auto and off else None
    out["auto_over_llama_best"] = auto / best if auto and best else None
    w_off, w_auto = whole["medians"]["off"]["decode_tok_s"], whole["medians"]["auto"]["decode_tok_s"]
    out["whole_auto_over_off"] = w_auto / w_off if w_auto and w_off else None
    out["identical_every_task"] = all(t["identical"] for t in out["tasks"].values())
    runner.save("speculative", out)
    return out


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
        "bytes_read_per_token",
        "peak_rss_bytes",
        "max_usage_bytes",
    )
    return {k: median([r[k] for r in runs if r.get(k) is not None]) for k in keys}


# --- llama.cpp's speculative decoding, run inside the engine process (engines.run_llama) ---


def _llama_draft_model():
    from llama_cpp.llama_speculative import LlamaDraftModel

    class DraftLlama(LlamaDraftModel):
        """A second Llama (the draft model) behind llama-cpp-python's LlamaDraftModel interface:
        called with every token so far (the last one not yet evaluated by the target), it keeps its
        own KV cache, rolls it back to the longest prefix it shares with them (the rejected drafted
        tokens go), evaluates the rest, then drafts up to k tokens greedily, stopping before a token
        whose probability under the draft is below p_min (as llama.cpp's common/speculative.cpp)."""

        def __init__(self, llm, k: int, p_min: float = 0.0):
            self.llm, self.k, self.p_min = llm, k, p_min
            self.seconds = 0.0

        def __call__(self, input_ids, /, **kwargs):
            from .llama_engine import last_logits

            t = time.perf_counter()
            ids = np.asarray(input_ids, dtype=np.intc)
            have = self.llm._input_ids
            m = min(len(have), len(ids))
            differ = np.nonzero(have[:m] != ids[:m])[0]
            keep = min(int(differ[0]) if len(differ) else m, len(ids) - 1)  # re-evaluate at least the last
            self.llm.n_tokens = keep  # eval() drops the KV cache from n_tokens on
            self.llm.eval(ids[keep:].tolist())
            drafted = []
            while True:
                logits = last_logits(self.llm)
                if self.p_min and _top_probability(logits) < self.p_min:
                    break
                drafted.append(int(np.argmax(logits)))
                if len(drafted) == self.k:
                    break
                self.llm.eval(drafted[-1:])
            self.seconds += time.perf_counter() - t
            return np.array(drafted, dtype=np.intc)

    return DraftLlama


def _top_probability(logits: np.ndarray) -> float:
    return 1.0 / float(np.sum(np.exp(logits - logits.max())))


def run_llama_speculative(args, prompt: list[int], progress) -> dict:
    """Greedy decoding through Llama.generate with a draft_model: prompt lookup (--lookup K) or
    a draft GGUF (--draft-model PATH --draft-max K [--draft-p-min P]). Every target pass (Llama.eval) is counted,
    the tokens kept for the exactness check against plain greedy."""
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    from .llama_engine import llama_model

    k = args.lookup or args.draft_max
    n_ctx = len(prompt) + args.n + k + 16
    if args.lookup:
        draft = LlamaPromptLookupDecoding(num_pred_tokens=args.lookup)
    else:
        draft_llm = llama_model(args.draft_model, n_ctx + k, args.threads, True)
        draft = _llama_draft_model()(draft_llm, k, args.draft_p_min)
    llm = llama_model(args.model, n_ctx, args.threads, True, draft_model=draft)
    progress("loaded")

    passes = []  # tokens evaluated per target pass, the prompt's first
    target_eval = llm.eval

    def counted_eval(tokens):
        passes.append(len(tokens))
        target_eval(tokens)

    llm.eval = counted_eval
    t0 = time.perf_counter()
    if not args.lookup:  # the draft's prefill belongs to the prompt's time, as the target's does
        draft.llm.eval(prompt)
    generated, times, last, t_prompt = [], [], t0, 0.0
    stream = llm.generate(prompt, temp=0.0, repeat_penalty=1.0)
    for token in stream:
        now = time.perf_counter()
        if generated:  # tokens of one pass come out together: the pass's time goes to its first
            times.append(now - last)
            progress("token", i=len(times) - 1, seconds=times[-1])
        else:
            t_prompt = now - t0
            progress("prompt", seconds=t_prompt)
        last = now
        generated.append(int(token))
        if len(generated) == args.n:
            break
    stream.close()
    # a decode pass evaluates the last token and the drafted ones, and yields the accepted ones and one more
    decode_passes = max(len(passes) - 1, 1)
    drafted = sum(passes[1:]) - (len(passes) - 1)
    telemetry = {
        "target_passes": decode_passes,
        "tokens_per_pass": (len(generated) - 1) / decode_passes,
        "drafted_tokens": drafted,
        "acceptance_rate": (len(generated) - 1 - decode_passes) / drafted if drafted else None,
    }
    if not args.lookup:
        telemetry["draft_ms_per_token"] = 1e3 * draft.seconds / max(len(generated) - 1, 1)
    return {"prompt_s": t_prompt, "decode_s": times, "telemetry": telemetry, "token_ids": generated}
