"""--gpu: the same graphs on ggml's CUDA backend. Without a CUDA build (CI, this machine) the flag
is one line on stderr and exit status 2; with one, tests marked `cuda` (deselected where no CUDA
backend or device is there: conftest.py) compare with llama.cpp's own CUDA path on the same file."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from flashcli.engine.gpu import cuda_library

from conftest import token_logits
from synthetic import Shape, write_llama_gguf

SHAPE = Shape(n_layers=3, d_model=256, n_ff=512, n_heads=4, n_kv_heads=2, n_vocab=512)
Q4_K, Q8_0 = 12, 8


def _flashcli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "flashcli.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.skipif(cuda_library() is not None, reason="this llama-cpp-python has a CUDA backend")
@pytest.mark.parametrize("command", ["generate", "perplexity", "chat"])
def test_gpu_without_cuda_is_one_line_and_exit_2(command, synthetic_dir, tmp_path):
    path = write_llama_gguf(synthetic_dir / "gpu-flag.gguf", SHAPE, Q8_0)
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 20)
    args = {"generate": ["-p", "hi", "-n", "2"], "perplexity": ["-f", str(text)], "chat": []}[command]
    out = _flashcli(command, str(path), *args, "--gpu")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--gpu" in lines[0] and "CUDA" in lines[0], out.stderr
    assert out.stdout == ""


def test_gpu_budget_needs_gpu(synthetic_dir):
    path = write_llama_gguf(synthetic_dir / "gpu-flag.gguf", SHAPE, Q8_0)
    out = _flashcli("generate", str(path), "-p", "hi", "-n", "2", "--gpu-budget", "50%")
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == ["flashcli: error: --gpu-budget goes with --gpu"]


# llama.cpp CUDA runs in a process of its own: a process that has bound ggml itself (flashcli)
# crashed in llama.cpp's CUDA model load (seen on an H200, 2026-12-06; cause not established)
_REFERENCE = """
import llama_cpp as lc
import sys, numpy as np
path, out, n, every = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[5] == "all"
prompt = [int(t) for t in sys.argv[4].split(",")]
lc.llama_backend_init()
mp = lc.llama_model_default_params()
mp.n_gpu_layers = 0x7FFFFFFF
model = lc.llama_model_load_from_file(path.encode(), mp)
vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
cp = lc.llama_context_default_params()
cp.n_ctx, cp.n_batch, cp.n_ubatch = 512, 512, 512
cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
ctx = lc.llama_init_from_model(model, cp)
batch = lc.llama_batch_init(512, 0, 1)
def decode(tokens, first, outputs):
    batch.n_tokens = len(tokens)
    for i, t in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, first + i, 1
        batch.seq_id[i][0], batch.logits[i] = 0, i >= len(tokens) - outputs
    assert lc.llama_decode(ctx, batch) == 0
    return np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(outputs, vocab)).copy()
logits = step = decode(prompt, 0, len(prompt) if every else 1)
tokens = []
for _ in range(n):
    tokens.append(int(np.argmax(step[-1])))
    step = decode([tokens[-1]], len(prompt) + len(tokens) - 1, 1)
np.savez(out, logits=logits, tokens=np.array(tokens))
"""


def _llama_cpp_cuda(path, prompt, n, tmp_path, every=False):
    """llama.cpp with every layer on the GPU, through its C API (llama-cpp-python's Llama keeps
    no logits without logits_all): the prompt's logits (every position's [n, vocab] with
    every=True, else the last one's [1, vocab]) and n greedy tokens. Greedy decoding asks for
    the last position's logits only, as generation does: the head and the last layer then run
    on that one row, as ours do (the head over all rows is another kernel, MMQ rather than
    MMVQ, with other bits)."""
    out = tmp_path / "reference.npz"
    args = [sys.executable, "-c", _REFERENCE, str(path), str(out), str(n), ",".join(map(str, prompt))]
    run = subprocess.run([*args, "all" if every else "last"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    data = np.load(out)
    return data["logits"], data["tokens"].tolist()


def _greedy_ours(model, prompt, n):
    model.reset()
    logits = model.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = model.eval([out[-1]])
    return out


ARCHS = ["llama", "qwen2", "gemma3"]


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("weight_type", [Q4_K, Q8_0])
def test_gpu_greedy_matches_llama_cpp_cuda(arch, weight_type, synthetic_dir, tmp_path):
    """32 greedy tokens after a prompt, and the prompt's last logits to the bit, against llama.cpp
    with every layer on the GPU."""
    from flashcli.engine.gpu import Device
    from flashcli.engine.model import Model

    path = write_llama_gguf(synthetic_dir / f"gpu-{arch}-{weight_type}.gguf", SHAPE, weight_type, seed=3, arch=arch)
    prompt = [1] + list(range(40, 80))
    ref, want = _llama_cpp_cuda(path, prompt, 32, tmp_path)
    model = Model(path, n_ctx=512, device=Device())
    got = _greedy_ours(model, prompt, 32)
    model.reset()
    last = model.eval(prompt)
    print(
        f"{arch} type {weight_type}: last position's logits, max |ours - llama.cpp CUDA| = {np.abs(last - ref[0]).max():.3g}"
    )
    assert got == want
    assert np.array_equal(last, ref[0])  # the bits, not only the argmax


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("weight_type", [Q4_K, Q8_0])
def test_gpu_logits_match_llama_cpp_cuda(arch, weight_type, synthetic_dir, tmp_path):
    """Every position's logits of a prompt, against llama.cpp with every layer on the GPU: the
    same ggml CUDA kernels on the same graph give the same bits (all six equal on an H100,
    2026-12-06, once K.q accumulates in float32 as llama.cpp asks; 1-3% of the largest logit
    apart before)."""
    from flashcli.engine.gpu import Device
    from flashcli.engine.model import Model

    path = write_llama_gguf(synthetic_dir / f"gpu-{arch}-{weight_type}.gguf", SHAPE, weight_type, seed=3, arch=arch)
    prompt = [1] + list(range(40, 80))
    ref, _ = _llama_cpp_cuda(path, prompt, 1, tmp_path, every=True)
    ours = token_logits(Model(path, n_ctx=512, device=Device()), prompt)
    diff = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"{arch} type {weight_type}: max |ours - llama.cpp CUDA| / max |logit| = {diff:.2e}")
    assert np.array_equal(ours, ref)


@pytest.mark.cuda
def test_gpu_generate_cli_reports_the_gpu(synthetic_dir, tmp_path):
    path = write_llama_gguf(synthetic_dir / "gpu-cli.gguf", SHAPE, Q4_K, seed=4)
    stats = tmp_path / "stats.json"
    out = _flashcli("generate", str(path), "-p", "hello", "-n", "8", "--gpu", "--stats-json", str(stats), "-v")
    assert out.returncode == 0, out.stderr
    data = json.loads(stats.read_text())
    assert data["gpu_resident_bytes"] > 0 and data["gpu_compute_s"] > 0, data


@pytest.mark.cuda
@pytest.mark.parametrize("share", [0.5, 0.25])
def test_gpu_budget_streams_layers_and_matches_llama_cpp_cuda(share, synthetic_dir, tmp_path):
    """Under a GPU budget the last layers' matrices stream through the GPU, each once per pass
    (whatever the pass's tokens), and the greedy tokens are llama.cpp CUDA's."""
    from flashcli.engine.gpu import Device
    from flashcli.engine.model import Model

    shape = Shape(n_layers=8, d_model=256, n_ff=512, n_heads=4, n_kv_heads=2, n_vocab=512)
    path = write_llama_gguf(synthetic_dir / "gpu-budget.gguf", shape, Q4_K, seed=5)
    prompt = [1] + list(range(40, 80))
    _, want = _llama_cpp_cuda(path, prompt, 24, tmp_path)
    full = Model(path, n_ctx=512, device=Device())
    matrices = sum(full.weights.layer_bytes(i) for i in range(shape.n_layers))
    fixed = full.device.resident_bytes - matrices  # roughly: head, norms, KV caches
    device = Device(budget=int(share * matrices) + full.weights.output.raw.nbytes + (1 << 16))
    model = Model(path, n_ctx=512, device=device)
    assert 0 < len(device.streamed) < shape.n_layers, (device.streamed, fixed)
    streamed = sum(model.weights.layer_bytes(i) for i in device.streamed)
    assert device.pinned_bytes >= streamed  # copied up from page-locked host memory
    before = device.upload_bytes
    model.reset()
    model.eval(prompt)  # one pass of 41 tokens: each streamed matrix crosses once
    assert streamed <= device.upload_bytes - before < streamed + (2 << 20)
    assert _greedy_ours(model, prompt, 24) == want


@pytest.mark.parametrize("share", [None, 0.5])
def test_backend_seam_on_the_cpu_backend(share, synthetic_dir):
    """gpu.Device's code on ggml's CPU backend (no GPU needed): the same graphs, weights and KV
    caches resident in backend buffers, inputs copied in, outputs out; under a budget the last
    layers stream, each matrix once per pass. Against our CPU engine: the same kernels, but on
    matrices that are not repacked, so close rather than bit-equal."""
    from flashcli.engine.gpu import Device
    from flashcli.engine.model import Model

    shape = Shape(n_layers=6, d_model=256, n_ff=512, n_heads=4, n_kv_heads=2, n_vocab=512)
    path = write_llama_gguf(synthetic_dir / "seam.gguf", shape, Q8_0, seed=6)
    prompt = [1] + list(range(40, 70))
    want = token_logits(Model(path, n_ctx=256), prompt)
    probe = Model(path, n_ctx=256, device=Device(cpu_backend=True))
    matrices = sum(probe.weights.layer_bytes(i) for i in range(shape.n_layers))
    budget = None if share is None else int(share * matrices) + probe.weights.output.raw.nbytes + (1 << 16)
    device = Device(budget=budget, cpu_backend=True)
    model = Model(path, n_ctx=256, device=device) if share is not None else probe
    assert (len(device.streamed) > 0) == (share is not None)
    before = device.upload_bytes
    got = token_logits(model, prompt)
    streamed = sum(model.weights.layer_bytes(i) for i in device.streamed)
    assert streamed <= device.upload_bytes - before < streamed + (2 << 20)
    assert np.abs(got - want).max() < 2e-2 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9
    assert _greedy_ours(model, prompt, 8) == _greedy_ours(Model(path, n_ctx=256), prompt, 8)
