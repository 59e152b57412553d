"""One timed generation, run as its own process (inside a cgroup when limited):

    python -m scripts.bench.engines flashcli MODEL --tokens FILE -n 128 [--budget BYTES] [flash options]
    python -m scripts.bench.engines llama MODEL --tokens FILE -n 128 [--no-repack]

The prompt is a JSON list of token ids (the same ids for both engines). Greedy decoding.
Progress goes to --progress FILE as JSON lines (one at load, one after the prompt, one per
token), so that a run killed by a timeout still tells how far it got. The last line, on
success, carries the summary: prompt and decode tokens/s, peak RSS, and the engine's telemetry.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .llama_engine import last_logits, llama_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def peak_rss() -> int:
    from flashcli.decoding.generate import peak_rss_bytes

    return peak_rss_bytes()


class Progress:
    def __init__(self, path):
        self.f = open(path, "w") if path else None
        self.t0 = time.perf_counter()

    def __call__(self, event: str, **kw):
        if self.f:
            self.f.write(json.dumps({"event": event, "t": time.perf_counter() - self.t0, **kw}) + "\n")
            self.f.flush()


def run_llama(args, prompt, progress) -> dict:
    llm = llama_model(args.model, len(prompt) + args.n + 16, args.threads, not args.no_repack)
    progress("loaded")
    t0 = time.perf_counter()
    llm.eval(prompt)
    t_prompt = time.perf_counter() - t0
    progress("prompt", seconds=t_prompt)
    times = []
    token = int(np.argmax(last_logits(llm)))
    generated = [token]
    for i in range(args.n - 1):
        t = time.perf_counter()
        llm.eval([token])
        token = int(np.argmax(last_logits(llm)))
        times.append(time.perf_counter() - t)
        generated.append(token)
        progress("token", i=i, seconds=times[-1])
    return {"prompt_s": t_prompt, "decode_s": times, "telemetry": {}, "token_ids": generated}


def run_flashcli(args, prompt, progress) -> dict:
    from dataclasses import replace

    from flashcli.decoding.loader import LoadOptions, load
    from flashcli.flash.flash_model import ABLATIONS, FlashOptions

    options = ABLATIONS[args.ablation] if args.ablation else FlashOptions()
    if args.io_threads:
        options = replace(options, io_threads=args.io_threads)
    model = load(
        args.model,
        LoadOptions(dram_budget=args.budget, threads=args.threads, n_ctx=len(prompt) + args.n + 16, flash=options),
    ).model
    progress("loaded", baseline=args.baseline)
    t0 = time.perf_counter()
    logits = None
    for s in range(0, len(prompt), model.prompt_batch):
        logits = model.eval(prompt[s : s + model.prompt_batch])
    t_prompt = time.perf_counter() - t0
    progress("prompt", seconds=t_prompt)
    prompt_telemetry = model.telemetry() if hasattr(model, "telemetry") else {}
    if hasattr(model, "ffn") and hasattr(model.ffn, "stats"):
        model.ffn.stats.__init__()  # decode telemetry only
    if hasattr(model, "tokens"):
        model.tokens, model.seconds = 0, 0.0
        if getattr(model.ffn, "stream", None):
            model.ffn.stream.bytes_read, model.ffn.stream.wait_s = 0, 0.0
    times = []
    token = int(np.argmax(logits))
    for i in range(args.n - 1):
        t = time.perf_counter()
        token = int(np.argmax(model.eval([token])))
        times.append(time.perf_counter() - t)
        progress("token", i=i, seconds=times[-1])
    telemetry = model.telemetry() if hasattr(model, "telemetry") else {}
    plan = model.plan.as_dict() if hasattr(model, "plan") else {}
    return {
        "prompt_s": t_prompt,
        "decode_s": times,
        "telemetry": telemetry,
        "prompt_telemetry": prompt_telemetry,
        "plan": plan,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", choices=["flashcli", "llama"])
    ap.add_argument("model")
    ap.add_argument("--tokens", required=True, help="JSON list of prompt token ids")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--ablation", default=None)
    ap.add_argument("--io-threads", type=int, default=None)
    ap.add_argument("--no-repack", action="store_true")
    ap.add_argument("--progress", default=None)
    ap.add_argument("--baseline", type=int, default=0)
    args = ap.parse_args()
    prompt = json.loads(Path(args.tokens).read_text())
    progress = Progress(args.progress)
    result = (run_llama if args.engine == "llama" else run_flashcli)(args, prompt, progress)
    decode = result.pop("decode_s")
    result.update(
        {
            "prompt_tokens": len(prompt),
            "prompt_tok_s": len(prompt) / result["prompt_s"],
            "tokens": len(decode) + 1,
            "decode_tok_s": len(decode) / max(sum(decode), 1e-9),
            "median_token_ms": 1e3 * float(np.median(decode)) if decode else None,
            "peak_rss_bytes": peak_rss(),
        }
    )
    progress("done", **result)


if __name__ == "__main__":
    main()
