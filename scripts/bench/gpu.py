"""GPU figures (issue 37): decoding speed of flashcli --gpu against llama.cpp CUDA on one file,
one phase per process, on a machine with a CUDA build (`make setup GPU=cuda`):

    python -m scripts.bench.gpu llama MODEL NGL P [P ...]     # llama.cpp, NGL layers on the GPU (-1: all + head)
    python -m scripts.bench.gpu ours MODEL SHARE P [P ...]    # flashcli, SHARE of the file's bytes on the GPU (1: all)
    python -m scripts.bench.gpu peer MODEL SHARE              # the NGL whose layers fit SHARE of the file's bytes

P: sequences decoded together (1: one stream; 16, 64: batched decoding). Each sequence gets a
32-token prompt, decoded before the clock starts; then STEPS passes of one token per sequence,
greedy. Only the passes are timed (each pass until its logits are in host memory); the argmax
is taken outside the clock, for both engines. llama.cpp runs through llama-cpp-python's C API
(llama_decode on a llama_batch, llama_synchronize), flash attention off (llama-cpp-python's
default, and flashcli's graph), n_threads = every core, its KV cache per sequence (not unified);
flashcli through Model.eval_parts, its products batched across sequences (--batched-products);
BENCH_NO_PIN=1: without the page-locked copies of streamed matrices (the ablation).
Each (P) prints one line `RESULT {json}`; with P = 1 the greedy tokens are in it, to compare.
The peer of a flashcli budget is llama.cpp with -ngl N, N the most layers whose matrices fit in
the same bytes of GPU memory (llama.cpp offloads the last N layers and keeps the head on the
CPU unless N = every layer + 1). llama.cpp is imported before numpy: with numpy first, its CUDA
model load crashed on the GPU machine (2026-12-06), so it runs in a process of its own.
"""

import llama_cpp as lc  # noqa: I001  (first: see above)

import json
import os
import sys
import time

import numpy as np

STEPS = {1: int(os.environ.get("STEPS_ONE", 64))}
BATCH_STEPS = int(os.environ.get("STEPS_BATCH", 32))
PROMPT = 32


def prompt(s: int) -> list[int]:
    """Sequence s's prompt: a BOS-like first token, then ids that differ between sequences."""
    return [1] + [300 + 7 * s + j for j in range(PROMPT - 1)]


def report(engine: str, setting, p: int, steps: int, seconds: float, tokens=None, **extra):
    out = {"engine": engine, "setting": setting, "parallel": p, "steps": steps, "decode_s": round(seconds, 4)}
    out["tokens_per_s"] = round(p * steps / seconds, 2)
    out |= extra
    if tokens is not None:
        out["tokens"] = tokens
    print("RESULT " + json.dumps(out), flush=True)


def _decode(ctx, batch, items):
    """llama_decode of items (token, position, sequence, wants logits)."""
    batch.n_tokens = len(items)
    for i, (tok, pos, seq, out) in enumerate(items):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, out
    if lc.llama_decode(ctx, batch) != 0:
        raise SystemExit("llama_decode failed")


def llama(path: str, ngl: int, parallels: list[int]):
    lc.llama_backend_init()
    mp = lc.llama_model_default_params()
    mp.n_gpu_layers = 0x7FFFFFFF if ngl < 0 else ngl  # as llama-cpp-python's Llama: every layer and the head
    model = lc.llama_model_load_from_file(path.encode(), mp)
    if not model:
        raise SystemExit(f"llama.cpp could not load {path}")
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    for p in parallels:
        steps = STEPS.get(p, BATCH_STEPS)
        cp = lc.llama_context_default_params()
        cp.n_ctx = p * 128
        cp.n_batch = cp.n_ubatch = 512
        cp.n_seq_max = p
        cp.n_threads = cp.n_threads_batch = os.cpu_count()
        cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = lc.llama_init_from_model(model, cp)
        batch = lc.llama_batch_init(512, 0, 1)

        items = [(t, j, s, j == PROMPT - 1) for s in range(p) for j, t in enumerate(prompt(s))]
        nxt = []
        for first in range(0, len(items), 512):  # a call's logits are that call's outputs only
            chunk = items[first : first + 512]
            _decode(ctx, batch, chunk)
            lc.llama_synchronize(ctx)
            rows = sum(out for *_, out in chunk)
            nxt += list(np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(rows, n_vocab)).argmax(-1))
        seconds, tokens = 0.0, [int(nxt[0])]
        for step in range(steps):
            t = time.perf_counter()
            _decode(ctx, batch, [(int(nxt[s]), PROMPT + step, s, True) for s in range(p)])
            lc.llama_synchronize(ctx)
            logits = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(p, n_vocab))
            seconds += time.perf_counter() - t
            nxt = logits.argmax(-1)
            tokens.append(int(nxt[0]))
        report("llama.cpp", ngl, p, steps, seconds, tokens[:-1] if p == 1 else None)
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)
    lc.llama_model_free(model)


def ours(path: str, share: float, parallels: list[int]):
    sys.path.insert(0, os.getcwd())
    from flashcli.engine import gpu
    from flashcli.engine.decode_state import Part
    from flashcli.engine.gpu import Device
    from flashcli.engine.model import Model

    if os.environ.get("BENCH_NO_PIN"):  # the ablation: streamed matrices copied from the mapped file
        gpu.PIN_SHARE = 0

    budget = None if share >= 1 else int(share * os.path.getsize(path))
    t = time.perf_counter()
    device = Device(budget=budget)
    model = Model(path, n_ctx=128, device=device, sequences=max(parallels))
    load_s = time.perf_counter() - t
    for p in parallels:
        steps = STEPS.get(p, BATCH_STEPS)
        model.batched_products = p > 1
        states = model.states[:p]
        for s in states:
            s.n_past = 0
        nxt = []
        for first in range(0, p, 16):  # prompts: 16 sequences a pass
            group = range(first, min(p, first + 16))
            out = model.eval_parts([Part(states[s], np.array(prompt(s), np.int64)) for s in group])
            nxt += [int(y[0].argmax()) for y in out]
        before = dict(device.telemetry())
        seconds, tokens = 0.0, [nxt[0]]
        for _ in range(steps):
            parts = [Part(states[s], np.array([nxt[s]], np.int64)) for s in range(p)]
            t = time.perf_counter()
            out = model.eval_parts(parts)
            seconds += time.perf_counter() - t
            nxt = [int(y[0].argmax()) for y in out]
            tokens.append(nxt[0])
        after = device.telemetry()
        extra = {k: after[k] for k in ("gpu", "gpu_resident_bytes", "gpu_streamed_layers", "gpu_pinned_host_bytes")}
        extra |= {k: round(after[k] - before[k], 4) for k in ("gpu_upload_bytes", "gpu_upload_s", "gpu_compute_s")}
        report("flashcli", share, p, steps, seconds, tokens[:-1] if p == 1 else None, load_s=round(load_s, 1), **extra)
    device.close()


def peer(path: str, share: float) -> int:
    """llama.cpp's -ngl whose offloaded layers' matrices fit share of the file's bytes."""
    sys.path.insert(0, os.getcwd())
    from flashcli.engine.gguf_file import GGUFFile

    gf = GGUFFile(path)
    layers: dict[int, int] = {}
    for name, t in gf.tensors.items():
        if name.startswith("blk.") and len(t.ne) >= 2:
            layer = int(name.split(".")[1])
            layers[layer] = layers.get(layer, 0) + t.raw.nbytes
    last_first = [layers[i] for i in sorted(layers, reverse=True)]  # llama.cpp offloads the last ones
    n = int(np.searchsorted(np.cumsum(last_first), share * os.path.getsize(path), side="right"))
    print(n)
    return n


def main(argv):
    phase, path, arg, *rest = argv
    if phase == "llama":
        llama(path, int(arg), [int(p) for p in rest] or [1])
    elif phase == "ours":
        ours(path, float(arg), [int(p) for p in rest] or [1])
    elif phase == "peer":
        peer(path, float(arg))
    else:
        raise SystemExit(f"unknown phase {phase}: llama, ours or peer")


if __name__ == "__main__":
    main(sys.argv[1:])
