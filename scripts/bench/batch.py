"""Many prompts at once: `flashcli generate --batch FILE --parallel N` under the budget, against
llama.cpp's own batched decoding (issue 24).

The 1.5B (Qwen2.5-Coder-1.5B-Instruct Q4_K_M, its converted file) at --dram-budget 50% of its
GGUF, cold cache, cgroup limit = budget + flashcli's measured baseline; 16 short coding
questions (data/batch_prompts.jsonl), `--chat -n 64`, greedy, through the CLI at
--parallel 1, 8, 16 and the most the budget holds, in the default mode (each text the one its
prompt gets alone; --draft auto: n-gram drafts where a pass waits for its reads), the same with
--draft off from 8 up, and with --batched-products (a pass's tokens as one batch on ggml's
batched kernels) from 8 up. Aggregate tokens/s: every generated token in the JSON Lines over the wall
time of the process, load and prefill included.

Reference in the same run, llama.cpp with no limit and warm (llama-cpp-python's low-level API,
`llama()` below, in a process of its own that loads the model once): its batched decoding as
llama-server -np N does it, N sequences in one context, one llama_decode a step carrying every
live sequence's next token and the prompts that join (continuous batching), greedy; at N = 1
that is one prompt at a time. Its aggregate tokens/s is generated tokens over the time from
the first prompt to the last token, prefill included (the model's load excluded).

The opt-in mode's divergence: per prompt, the tokens until its text first differs from the
default mode's (texts re-tokenized), and the perplexity of held-out text decoded token by token
through passes of 16 sequences (teacher-forced), exact against batched products.

    python -m scripts.bench --section batch                      (the record: run as root)
    python -m scripts.bench.batch section [--model GGUF] [--prompts K] [-n N] [--parallel P ...]
    python -m scripts.bench.batch llama MODEL --tokens FILE -n N --parallel P ... --progress FILE
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
from .runner import ROOT

THREADS = 2
PROMPTS = Path(__file__).resolve().parent / "data" / "batch_prompts.jsonl"
PROMPT_COUNT, TOKENS = 16, 64
PPL_SEQUENCES, PPL_PREFIX, PPL_STEPS = 16, 64, 64


def run(quick: bool = False, model=None, prompt_count=None, n=None, parallel=None, share: float = 0.5) -> dict:
    from flashcli.decoding.loader import LoadOptions, check, most_sequences
    from flashcli.engine.tokenizer import Tokenizer
    from scripts.fetch_model import model_path

    from .limits import flash_file

    source = Path(model or model_path("qwen2.5-coder-1.5b"))
    flash = flash_file(source)
    size = os.path.getsize(source)
    baseline = runner.flashcli_baseline(flash)
    budget = int(size * share)
    limit = budget + baseline
    prompts = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    prompts = prompts[: prompt_count or (4 if quick else PROMPT_COUNT)]
    n = n or (16 if quick else TOKENS)
    tok = Tokenizer(source)
    tokens = {p["id"]: tok.encode(tok.apply_chat_template(p["prompt"]), special=True) for p in prompts}
    context = max(map(len, tokens.values())) + n
    most = most_sequences(check(flash), LoadOptions(dram_budget=budget, n_ctx=context), 64)
    cap = min(most, len(prompts))  # more sequences than prompts would run as many as prompts
    parallels = sorted({1} | {p for p in parallel or (8, 16, cap) if p <= cap})
    out = {
        "model": source.name,
        "flash_model": Path(flash).name,
        "file_bytes": size,
        "baseline_bytes": baseline,
        "budget_bytes": budget,
        "limit_bytes": limit,
        "prompts_file": str(PROMPTS.relative_to(ROOT)),
        "prompt_count": len(prompts),
        "n": n,
        "most_sequences": most,
        "threads": THREADS,
        "quick": quick,
        "machine": runner.env_note(),
    }
    timeout = 600 if quick else 3600
    exact = [flashcli_batch(flash, prompts, n, p, budget, limit, timeout) for p in parallels]
    undrafted = [flashcli_batch(flash, prompts, n, p, budget, limit, timeout, draft="off") for p in parallels if p > 1]
    batched = [flashcli_batch(flash, prompts, n, p, budget, limit, timeout, True) for p in parallels if p > 1]
    llama = llama_reference(source, tokens, n, parallels, timeout)
    one = exact[0]
    single = next((r["aggregate_tok_s"] for r in llama["runs"] if r["parallel"] == 1), None)
    best_llama = max((r["aggregate_tok_s"] for r in llama["runs"]), default=None)
    for r in exact + undrafted + batched + llama["runs"]:
        r["same_as_parallel_1"] = same_text(r, one)
        r["over_llama_single"] = _ratio(r["aggregate_tok_s"], single)
        r["over_llama_best"] = _ratio(r["aggregate_tok_s"], best_llama)
    by_p = {r["parallel"]: r for r in exact}
    for r in batched:
        r["divergence"] = divergence(tok, r, by_p[r["parallel"]])
    out |= {"exact": exact, "undrafted": undrafted, "batched": batched, "llama": llama}
    out["identical_every_prompt"] = all(
        r["status"] == "ok" and r["same_as_parallel_1"] == len(prompts) for r in exact + undrafted
    )
    out["perplexity"] = batched_perplexity(flash, budget, *((4, 16, 8) if quick else ()))
    runner.save("batch", out)
    return out


def flashcli_batch(
    model, prompts, n, parallel, budget, limit, timeout, batched_products=False, draft="auto", chat=True
) -> dict:
    """One cold run of `flashcli generate --batch` inside a cgroup of `limit` bytes: its JSON Lines
    by prompt id, aggregate tokens/s over the process's wall time, bytes read per generated token
    (every read of the run, prefill included), and its --stats-json object under 'stats'."""
    with tempfile.TemporaryDirectory() as tmp:
        batch = Path(tmp) / "prompts.jsonl"
        batch.write_text("".join(json.dumps(p) + "\n" for p in prompts))
        args = [str(model), "--batch", str(batch), "--parallel", str(parallel), "--dram-budget", str(budget)]
        args += ["-n", str(n), "--draft", draft] + ["--chat"] * chat + ["--batched-products"] * batched_products
        run, data, idle = runner.limited_generate(args, limit, timeout, THREADS)
    results = _json_lines((run["stdout"] or b"").decode("utf-8", "replace"))
    generated = sum(r.get("generated_tokens", 0) for r in results.values())
    out = {
        "parallel": parallel,
        "batched_products": batched_products,
        "draft": draft,
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


def llama_reference(model, tokens: dict, n: int, parallels: list[int], timeout: float) -> dict:
    """llama.cpp's batched decoding at each of `parallels`, warm and with no limit, in one process
    (llama() below); its texts decoded by flashcli's stream decoder, so that equal tokens give
    equal text."""
    from flashcli.engine.tokenizer import StreamDecoder, Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokens_file, progress = Path(tmp) / "tokens.json", Path(tmp) / "progress.jsonl"
        tokens_file.write_text(json.dumps(tokens))
        cmd = [sys.executable, "-m", "scripts.bench.batch", "llama", str(model), "--tokens", str(tokens_file)]
        cmd += ["-n", str(n), "--threads", str(THREADS), "--progress", str(progress), "--parallel"]
        cmd += [str(p) for p in parallels]
        idle = runner.quiet_cpu()
        try:
            p = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True, cwd=ROOT)
            status, error = ("ok" if p.returncode == 0 else "failed"), p.stderr[-500:]
        except subprocess.TimeoutExpired as e:
            status, error = "timeout", str(e.stderr or "")[-500:]
        events = [json.loads(line) for line in progress.read_text().splitlines()] if progress.exists() else []
    tok = Tokenizer(model)

    def text(ids):
        d = StreamDecoder(tok)
        return "".join(d.add(t) for t in ids) + d.flush()

    runs = []
    for e in (e for e in events if e["event"] == "parallel"):
        results = {i: r | {"text": text(r.pop("token_ids"))} for i, r in e["results"].items()}
        generated = sum(r["generated_tokens"] for r in results.values())
        runs.append(
            {
                "parallel": e["parallel"],
                "seconds": e["seconds"],
                "generated_tokens": generated,
                "aggregate_tok_s": generated / e["seconds"],
                "status": "ok",
                "results": results,
            }
        )
    done = next((e for e in events if e["event"] == "done"), {})
    return {"cpu_idle_before": idle, "status": status, "error": error if status != "ok" else None, "runs": runs} | {
        "load_s": next((e["seconds"] for e in events if e["event"] == "loaded"), None),
        "peak_rss_bytes": done.get("peak_rss_bytes"),
    }


def divergence(tok, run: dict, exact: dict) -> dict:
    """Per prompt, the tokens the opt-in run's text shares with the default mode's before the
    first difference (None: the same text), both texts re-tokenized."""
    out = {}
    for i, r in run["results"].items():
        if "text" not in r or "text" not in exact["results"].get(i, {}):
            continue
        a, b = tok.encode(r["text"]), tok.encode(exact["results"][i]["text"])
        if r["text"] == exact["results"][i]["text"]:
            out[i] = None
            continue
        out[i] = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return out


def batched_perplexity(flash, budget, sequences=PPL_SEQUENCES, prefix=PPL_PREFIX, steps=PPL_STEPS) -> dict:
    """Perplexity of held-out text decoded through batched passes: `sequences` stretches of it,
    each prefilled with `prefix` tokens, then `steps` passes of one token of each (the text's,
    teacher-forced), scoring the next; with the default mode's products and with batched ones.
    Not `flashcli perplexity`: that evaluates windows as prompt batches, which are multiplied
    whole in both modes."""
    from flashcli.decoding.loader import LoadOptions, load
    from flashcli.engine.decode_state import Part
    from flashcli.engine.tokenizer import Tokenizer

    ids = Tokenizer(flash).encode((ROOT / "tests" / "data" / "heldout.txt").read_text())
    span = prefix + steps + 1
    streams = np.array(ids[: sequences * span], np.int64).reshape(sequences, span)
    model = load(flash, LoadOptions(dram_budget=budget, threads=THREADS, n_ctx=span, sequences=sequences)).model
    out = {"sequences": sequences, "prefix": prefix, "steps": steps}
    logprobs = {}
    for mode in ("exact", "batched_products"):
        model.batched_products = mode == "batched_products"
        scores, argmax = [], []
        for s, row in zip(model.states, streams):
            s.n_past = 0
            for start in range(0, prefix, model.prompt_batch):
                model.eval_parts([Part(s, row[start : min(start + model.prompt_batch, prefix)])])
        for t in range(steps):
            z = np.stack(
                [
                    x[0]
                    for x in model.eval_parts(
                        [Part(s, row[prefix + t : prefix + t + 1]) for s, row in zip(model.states, streams)]
                    )
                ]
            )
            z = z.astype(np.float64)
            m = z.max(1, keepdims=True)
            lse = (m + np.log(np.exp(z - m).sum(1, keepdims=True)))[:, 0]
            scores.append(z[np.arange(sequences), streams[:, prefix + t + 1]] - lse)
            argmax.append(z.argmax(1))
        logprobs[mode] = np.array(scores)
        out[mode] = {"perplexity": float(np.exp(-logprobs[mode].mean())), "argmax": np.array(argmax).tolist()}
    model.close()
    out["max_abs_logprob_diff"] = float(np.abs(logprobs["exact"] - logprobs["batched_products"]).max())
    same = np.array(out["exact"].pop("argmax")) == np.array(out["batched_products"].pop("argmax"))
    out["same_argmax_share"] = float(same.mean())
    return out


def same_text(run: dict, reference: dict) -> int:
    """How many prompts have the same text in both runs (a prompt that failed in either: not)."""
    ref = reference["results"]
    return sum(
        1 for i, r in run["results"].items() if "text" in r and "text" in ref.get(i, {}) and r["text"] == ref[i]["text"]
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


def llama(args):
    """llama.cpp's batched decoding, as llama-server -np N: the model loaded once and warmed by
    one prompt, then at each --parallel N a context of N sequences; every step one llama_decode
    of each live sequence's next token and the prompts that join it, greedy (argmax), a finished
    sequence's cache cleared for the next prompt. One progress line per N, with each prompt's
    token ids and the time from the first prompt to the last token."""
    import llama_cpp as lc

    from flashcli.engine.tokenizer import _quiet_stderr

    from .engines import Progress, peak_rss

    prompts = json.loads(Path(args.tokens).read_text())
    progress = Progress(args.progress)
    t0 = time.perf_counter()
    with _quiet_stderr():
        model = lc.llama_model_load_from_file(args.model.encode(), lc.llama_model_default_params())
    vocab = lc.llama_model_get_vocab(model)
    n_vocab = lc.llama_vocab_n_tokens(vocab)
    progress("loaded", seconds=time.perf_counter() - t0)
    per_seq = max(map(len, prompts.values())) + args.n + 1
    for i, parallel in enumerate([1] + args.parallel):  # the first: a warm-up, not reported
        params = lc.llama_context_default_params()
        params.n_ctx = parallel * -(-per_seq // 256) * 256
        params.n_batch = params.n_ctx
        params.n_ubatch, params.n_seq_max = 512, parallel
        params.n_threads = params.n_threads_batch = args.threads
        with _quiet_stderr():
            ctx = lc.llama_init_from_model(model, params)
        queue = list(prompts.items())[:1] if i == 0 else list(prompts.items())
        t = time.perf_counter()
        results = _llama_batches(lc, ctx, vocab, n_vocab, queue, parallel, args.n, params.n_ctx)
        seconds = time.perf_counter() - t
        with _quiet_stderr():
            lc.llama_free(ctx)
        if i:
            progress("parallel", parallel=parallel, seconds=seconds, results=results)
    lc.llama_model_free(model)
    progress("done", peak_rss_bytes=peak_rss())


def _llama_batches(lc, ctx, vocab, n_vocab, queue, parallel, n, n_tokens) -> dict:
    """The prompts of `queue` through `parallel` sequences of ctx: by prompt id, its counts and
    generated token ids."""
    memory = lc.llama_get_memory(ctx)
    batch = lc.llama_batch_init(n_tokens, 0, 1)
    live, free, results = {}, list(range(parallel)), {}
    try:
        while queue or live:
            batch.n_tokens, wants = 0, []
            for seq, s in live.items():
                _add(batch, wants, s["ids"][-1], s["pos"], seq, True)
                s["pos"] += 1
            while queue and free:  # prompts join this step
                seq = free.pop(0)
                id_, prompt = queue.pop(0)
                for k, token in enumerate(prompt):
                    _add(batch, wants, token, k, seq, k == len(prompt) - 1)
                live[seq] = {"id": id_, "prompt": len(prompt), "pos": len(prompt), "ids": []}
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            for seq, j in wants:
                s = live[seq]
                z = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, j), shape=(n_vocab,))
                token = int(np.argmax(z))
                eog = lc.llama_vocab_is_eog(vocab, token)
                if not eog:
                    s["ids"].append(token)
                if eog or len(s["ids"]) == n:
                    results[s["id"]] = {
                        "prompt_tokens": s["prompt"],
                        "generated_tokens": len(s["ids"]),
                        "finish_reason": "stop" if eog else "length",
                        "token_ids": s["ids"],
                    }
                    del live[seq]
                    lc.llama_memory_seq_rm(memory, seq, -1, -1)
                    free.append(seq)
    finally:
        lc.llama_batch_free(batch)
    return results


def _add(batch, wants: list, token: int, pos: int, seq: int, logits: bool):
    """One token of sequence `seq` at `pos` into a llama_batch; (seq, its index) into `wants`
    where its logits are wanted."""
    j = batch.n_tokens
    batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.seq_id[j][0] = token, pos, 1, seq
    batch.logits[j] = logits
    batch.n_tokens += 1
    if logits:
        wants.append((seq, j))


def main():
    ap = argparse.ArgumentParser(description="the batch section, or its llama.cpp reference process")
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("section", help="run the section (as root), writing bench-out/batch.json")
    s.add_argument("--model", default=None, help="a source GGUF (default: the 1.5B)")
    s.add_argument("--prompts", type=int, default=None)
    s.add_argument("-n", type=int, default=None)
    s.add_argument("--parallel", type=int, nargs="+", default=None)
    s.add_argument("--share", type=float, default=0.5, help="the budget, a share of the GGUF (default 0.5)")
    s.add_argument("--quick", action="store_true")
    r = sub.add_parser("llama", help="llama.cpp's batched decoding (the reference's own process)")
    r.add_argument("model")
    r.add_argument("--tokens", required=True, help="JSON object: prompt id -> chat-templated token ids")
    r.add_argument("-n", type=int, default=TOKENS)
    r.add_argument("--parallel", type=int, nargs="+", required=True)
    r.add_argument("--threads", type=int, default=THREADS)
    r.add_argument("--progress", default=None)
    args = ap.parse_args()
    if args.what == "llama":
        return llama(args)
    run(args.quick, args.model, args.prompts, args.n, args.parallel, args.share)


if __name__ == "__main__":
    main()
