"""A speculative pass's compute (issue 36): the target's pass over k+1 tokens against one token's.

The 1.5B (Qwen2.5-Coder-1.5B-Instruct Q4_K_M, the plain GGUF) resident, warm, 2 threads: after a
prompt, the pass speculative decoding runs to verify k drafted tokens (`model.exact` on: every
token with the bits it gets alone, as speculative_step runs it), timed for k = 0 (one token, a
plain decoding step) to 8, each rolled back so that every pass starts at the same position; and
the same passes on ggml's batched products (exact off) for comparison. Median of REPS.

    python -m scripts.bench.verify_pass [--model GGUF] [--reps N] [-k 0 1 2 4 8] [--exact-only]
    perf record -g python -m scripts.bench.verify_pass -k 1 --reps 200 --exact-only   (a profile)
"""

from __future__ import annotations

import argparse
import json
import time

from .runner import env_note, median

KS = (0, 1, 2, 4, 8)
REPS = 9
PROMPT = "def quicksort(items):\n    "


def run(model=None, reps: int = REPS, ks=KS, modes=(True, False)) -> dict:
    from flashcli.decoding.loader import LoadOptions, load
    from flashcli.engine.tokenizer import Tokenizer
    from scripts.fetch_model import model_path

    path = str(model or model_path("qwen2.5-coder-1.5b"))
    loaded = load(path, LoadOptions(threads=2, n_ctx=512))
    target, tok = loaded.model, Tokenizer(path)
    prompt = tok.encode(PROMPT)
    target.eval(prompt)
    start = target.state.n_past
    draft = tok.encode(" " + "x = items[0] if items else None; return sorted(items)" * 2)
    out = {"model": path, "machine": env_note(), "reps": reps, "passes": {}}
    for exact in modes:
        rows = {}
        for k in ks:
            tokens = [prompt[-1]] + draft[:k]
            times = []
            for _ in range(reps + 1):  # the first: warm-up
                target.rollback(start)
                target.exact = exact
                t0 = time.perf_counter()
                target.eval(tokens, all_logits=True)
                times.append(time.perf_counter() - t0)
                target.exact = False
            rows[k] = median(times[1:])
        out["passes"]["exact" if exact else "batched"] = {
            str(k): {"ms": s * 1e3, "over_one_token": s / rows[0] if 0 in rows else None} for k, s in rows.items()
        }
    loaded.close()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--reps", type=int, default=REPS)
    ap.add_argument("-k", type=int, nargs="+", default=KS, help=f"drafted tokens a pass verifies (default {KS})")
    ap.add_argument("--exact-only", action="store_true", help="only the exact passes (to profile one, with -k K)")
    args = ap.parse_args()
    out = run(args.model, args.reps, tuple(args.k), (True,) if args.exact_only else (True, False))
    print(json.dumps(out, indent=1))
    for mode, rows in out["passes"].items():
        cells = "  ".join(
            f"k={k}: {r['ms']:.0f} ms" + (f" ({r['over_one_token']:.2f}x)" if r["over_one_token"] else "")
            for k, r in rows.items()
        )
        print(f"{mode:8s} {cells}")


if __name__ == "__main__":
    main()
