"""llama.cpp's own speed, the reference the benchmarks compare with: warm, no memory limit, its
decode loop in C calls (llama_decode, and its greedy sampler chain picking the token, so no
logits are copied to Python), each prompt evaluated outside the timing.

    python -m scripts.bench.llama_warm MODEL PROMPTS.json N [--threads T]

PROMPTS.json holds a list of token-id lists; one JSON object comes out on stdout: per prompt the
decode tokens/s and the token ids, and the model's load time. The first prompt is decoded once
before the timed runs (warm: weights paged in, repacked, caches hot).
"""

from __future__ import annotations

import argparse
import json
import time


def decode(llm, prompt: list[int], n: int) -> tuple[list[int], float]:
    """n greedy tokens after `prompt` (evaluated first, untimed); (tokens, decode seconds for
    the n - 1 tokens after the first, which the prompt's logits give)."""
    import llama_cpp as lc

    llm.reset()
    llm.eval(prompt)
    ctx = llm._ctx.ctx
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
    try:
        token = lc.llama_sampler_sample(chain, ctx, -1)
        out = [int(token)]
        one = (lc.llama_token * 1)()
        t0 = time.perf_counter()
        for _ in range(n - 1):
            one[0] = token
            if lc.llama_decode(ctx, lc.llama_batch_get_one(one, 1)) != 0:
                raise RuntimeError("llama_decode failed")
            token = lc.llama_sampler_sample(chain, ctx, -1)
            out.append(int(token))
        return out, time.perf_counter() - t0
    finally:
        lc.llama_sampler_free(chain)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("prompts")
    ap.add_argument("n", type=int)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from .llama_engine import llama_model

    prompts = json.load(open(args.prompts))
    t0 = time.perf_counter()
    llm = llama_model(args.model, max(len(p) for p in prompts) + args.n + 16, args.threads, True)
    load_s = time.perf_counter() - t0
    decode(llm, prompts[0], min(args.n, 16))  # warm-up
    runs = []
    for prompt in prompts:
        tokens, seconds = decode(llm, prompt, args.n)
        runs.append({"token_ids": tokens, "decode_s": seconds, "decode_tok_s": (len(tokens) - 1) / seconds})
    print(json.dumps({"load_s": load_s, "threads": args.threads, "runs": runs}))


if __name__ == "__main__":
    main()
