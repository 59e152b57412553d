"""GPU figures (issue 37), one phase per process, on a machine with a CUDA build:

    python -m scripts.bench.gpu llama N   # llama.cpp CUDA, N layers on the GPU (-1: every one)
    python -m scripts.bench.gpu ours S    # flashcli --gpu, S = full or the budget's share (0.5)

on the llama-3.1-8b shape (tests/synthetic.py: random weights, Q4_K matrices, Q6_K embeddings,
a 32000-token vocabulary, layer 0's bytes in every layer), made at /tmp/m/l8b.gguf on first use.
Greedy decoding of N_TOKENS tokens (16 under a budget) after a 32-token prompt, timed after the
prompt's pass; each phase prints one RESULT line. llama.cpp is imported before numpy: with numpy
imported first, its CUDA model load crashed on the GPU machine (2026-12-06), in a process of its own.
"""

import llama_cpp  # noqa: F401, I001  (first: see above)

import json
import os
import sys
import time

import numpy as np

sys.path[:0] = ["tests"]
from synthetic import Shape, write_llama_gguf  # noqa: E402

N_TOKENS = int(os.environ.get("N_TOKENS", 32))
PATH = "/tmp/m/l8b.gguf"
REF = "/tmp/m/ref.json"  # llama.cpp's tokens with every layer on the GPU
LLAMA_8B = Shape(n_layers=32, d_model=4096, n_ff=14336, n_heads=32, n_kv_heads=8, n_vocab=32000, context_length=8192)
PROMPT = [1] + list(range(300, 331))


def model() -> str:
    if not os.path.exists(PATH):
        os.makedirs(os.path.dirname(PATH), exist_ok=True)
        write_llama_gguf(PATH, LLAMA_8B, weight_type=12, embd_type=14, seed=2, repeat_layers=True)
    return PATH


def timed(step, n):
    step(PROMPT)
    out, t = [], time.perf_counter()
    for _ in range(n):
        out.append(step(None))
    return out, n / (time.perf_counter() - t)


def llama(ngl: int):
    from llama_cpp import Llama

    llm = Llama(model(), n_gpu_layers=ngl, n_ctx=512, n_batch=512, verbose=True)

    def step(p):
        if p is not None:
            llm.reset()
            llm.eval(p)
            return None
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])
        return tok

    return timed(step, N_TOKENS)


def ours(share: float | None):
    from flashcli.engine.gpu import Device
    from flashcli.engine.model import Model

    budget = None if share is None else int(share * os.path.getsize(model()))
    m = Model(model(), n_ctx=512, device=Device(budget=budget))
    state = {}

    def step(p):
        if p is not None:
            m.reset()
            state["logits"] = m.eval(p)
            return None
        tok = int(np.argmax(state["logits"]))
        state["logits"] = m.eval([tok])
        return tok

    out = timed(step, N_TOKENS if share is None else 16)
    print(m.telemetry(), flush=True)
    return out


def main(phase: str, arg: str):
    if phase == "llama":
        ngl = int(arg)
        tokens, rate = llama(ngl)
        if ngl < 0:
            with open(REF, "w") as f:
                json.dump(tokens, f)
        same = os.path.exists(REF) and tokens == json.load(open(REF))
        print(f"RESULT llama.cpp CUDA -ngl {arg}: {rate:.1f} tok/s, {len(tokens)} tokens, same as all layers: {same}")
    elif phase == "ours":
        tokens, rate = ours(None if arg == "full" else float(arg))
        ref = json.load(open(REF)) if os.path.exists(REF) else []
        same = tokens == ref[: len(tokens)]
        print(f"RESULT flashcli --gpu {arg}: {rate:.1f} tok/s, {len(tokens)} tokens, same as llama.cpp CUDA: {same}")
    else:
        raise SystemExit(f"unknown phase {phase}: llama N or ours S")


if __name__ == "__main__":
    main(*sys.argv[1:3])
