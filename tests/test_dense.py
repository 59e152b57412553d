"""The dense engine against llama.cpp itself: the real models of each architecture, and
synthetic GGUFs of every weight type."""

from __future__ import annotations

import numpy as np
import pytest

from flashcli.decoding.generate import generate_step
from flashcli.decoding.perplexity import perplexity
from flashcli.decoding.sampling import make_sampler
from flashcli.engine.gguf_file import GGUFFile
from flashcli.engine.model import Model
from flashcli.engine.tokenizer import Tokenizer

from conftest import HELDOUT, TEXT, llama_cpp, llama_cpp_greedy, llama_cpp_logits, llama_cpp_perplexity, token_logits
from reference import ReferenceModel
from synthetic import TINY, write_llama_gguf

WEIGHT_TYPES = {
    "F32": 0,
    "F16": 1,
    "BF16": 30,
    "Q8_0": 8,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q5_0": 6,
    "Q5_1": 7,
    "Q2_K": 10,
    "Q3_K": 11,
    "Q4_K": 12,
    "Q5_K": 13,
    "Q6_K": 14,
    "IQ4_NL": 20,
}
PROMPTS = [
    ("chat", "Write a Python function that reverses a string."),
    ("chat", "Name three planets and one fact about each."),
    ("plain", "The history of the printing press begins"),
]
REAL = ["smollm2", pytest.param("gemma3"), pytest.param("qwen", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", REAL)
def test_real_model_matches_llama_cpp(name, request):
    """Logits over 300 tokens of real text (top-1 >= 99%), perplexity within 0.5% under the same
    protocol, and 32-token greedy continuations identical on chat and plain prompts."""
    path = request.getfixturevalue(name)
    tok = Tokenizer(path)
    tokens = tok.encode(TEXT)[:300]
    assert len(tokens) >= 256
    ref, _ = llama_cpp_logits(path, tokens)
    model = Model(path, n_ctx=512)
    ours = token_logits(model, tokens)
    agreement = float(np.mean(ours.argmax(-1) == ref.argmax(-1)))
    assert agreement >= 0.99, f"top-1 agreement {agreement:.3f}"
    assert np.median(np.abs(ours - ref)) < 0.05 * np.median(np.abs(ref - ref.mean(-1, keepdims=True)))

    text = tok.encode(HELDOUT)[:600]
    llm = llama_cpp(path, n_ctx=512)
    want_ppl = llama_cpp_perplexity(llm, text, window=300)
    got_ppl = perplexity(model, text, window=300)["perplexity"]
    assert got_ppl == pytest.approx(want_ppl, rel=0.005), (got_ppl, want_ppl)

    for kind, prompt in PROMPTS:
        prompt_tokens = (
            tok.encode(tok.apply_chat_template(prompt), special=True) if kind == "chat" else tok.encode(prompt)
        )
        want = llama_cpp_greedy(llm, prompt_tokens, 32)
        got = list(generate_step(model, prompt_tokens, make_sampler(0.0), 32))
        assert got == want, (kind, prompt, tok.decode(got), tok.decode(want))


@pytest.mark.parametrize("type_name", list(WEIGHT_TYPES))
def test_synthetic_weight_type_matches_llama_cpp(type_name, synthetic_dir):
    """Every weight type against llama.cpp, on the kernels ggml picks on this CPU: repacked ones
    where its CPU_REPACK buffer takes the type (which types depends on the CPU), plain ones else."""
    from flashcli.engine.repack import repacked_types

    path = write_llama_gguf(synthetic_dir / f"tiny-{type_name}.gguf", TINY, WEIGHT_TYPES[type_name], seed=1)
    rng = np.random.default_rng(0)
    tokens = [1] + rng.integers(3, TINY.n_vocab, 63).tolist()
    ref, llm = llama_cpp_logits(path, tokens)
    model = Model(path, n_ctx=128)
    repacked = len(model.weights.repacked.tensors)
    print(
        f"\n{type_name}: compared {'repacked' if repacked else 'plain'} kernels ({repacked} of "
        f"{len(model.weights.matrices)} matrices repacked; ggml repacks {', '.join(repacked_types())} on this CPU)"
    )
    ours = token_logits(model, tokens)
    agreement = float(np.mean(ours.argmax(-1) == ref.argmax(-1)))
    assert agreement >= 0.99, f"{type_name}: top-1 agreement {agreement:.3f}"
    scale = np.abs(ref).mean()
    assert np.abs(ours - ref).max() < 1e-3 * scale, f"{type_name}: max |diff| {np.abs(ours - ref).max():.5f}"
    want = llama_cpp_greedy(llm, tokens[:8], 16)
    got = list(generate_step(Model(path, n_ctx=128), tokens[:8], make_sampler(0.0), 16))
    assert got == want


@pytest.mark.parametrize("activation", ["silu", "relu"])
def test_engine_matches_numpy_reference(activation, synthetic_dir):
    """The ReLU fixture has no llama.cpp reference (llama.cpp ignores its activation key): the
    dense engine must agree with an independent float32 forward pass for both activations."""
    path = write_llama_gguf(synthetic_dir / f"tiny-{activation}.gguf", TINY, 8, seed=2, ffn_activation=activation)
    tokens = list(range(3, 40))
    ref = ReferenceModel(GGUFFile(path)).logits(tokens)
    ours = token_logits(Model(path, n_ctx=64), tokens)
    np.testing.assert_allclose(ours, ref, atol=0.05 * np.abs(ref).max())
    assert np.mean(ours.argmax(-1) == ref.argmax(-1)) >= 0.95


def test_activation_choice_changes_the_model(synthetic_dir):
    """relu and silu files with identical weights must give different outputs: the key is read."""
    silu = write_llama_gguf(synthetic_dir / "act-silu.gguf", TINY, 8, seed=3, ffn_activation="silu")
    relu = write_llama_gguf(synthetic_dir / "act-relu.gguf", TINY, 8, seed=3, ffn_activation="relu")
    tokens = list(range(3, 20))
    a = token_logits(Model(silu, n_ctx=32), tokens)
    b = token_logits(Model(relu, n_ctx=32), tokens)
    assert np.abs(a - b).max() > 0.1
    ref_relu = ReferenceModel(GGUFFile(relu)).logits(tokens)
    assert np.abs(b - ref_relu).max() < np.abs(a - ref_relu).max()


def test_batched_prompt_equals_token_by_token(smollm2):
    tokens = Tokenizer(smollm2).encode(TEXT)[:40]
    m = Model(smollm2, n_ctx=64)
    batch = token_logits(m, tokens)
    m.reset()
    one_by_one = np.stack([m.eval([t]) for t in tokens])
    # batched and single-token matmuls accumulate in different orders: close, not bit-equal
    np.testing.assert_allclose(batch[0], one_by_one[0], rtol=1e-5, atol=1e-4)
    assert np.abs(batch - one_by_one).mean() < 0.1 * batch.std()
    assert np.mean(batch.argmax(-1) == one_by_one.argmax(-1)) >= 0.9
