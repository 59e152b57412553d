"""Mixtures of experts against llama.cpp on the same files: each family's router (softmax, top
k, renormalised or not, a shared expert), the experts on the kernels llama.cpp runs them on
(repacked where ggml repacks their type on this CPU), resident and through the expert cache."""

from __future__ import annotations

import numpy as np
import pytest

from flashcli.config import ModelConfig
from flashcli.errors import BadModelFile
from flashcli.generate import generate_step
from flashcli.gguf_file import GGUFFile
from flashcli.model import Model
from flashcli.sampling import make_sampler

from conftest import llama_cpp_greedy, llama_cpp_logits, token_logits
from synthetic import Shape, write_llama_gguf

SHAPE = Shape(n_layers=3, d_model=256, n_ff=512, n_heads=4, n_kv_heads=2, n_vocab=512)
# (arch, (experts, used per token, width of one), shared expert's width)
FAMILIES = {
    "mixtral": ("llama", (8, 2, 512), 0),
    "qwen3moe": ("qwen3moe", (16, 4, 256), 0),
    "qwen2moe": ("qwen2moe", (8, 2, 256), 512),
}


def moe_file(directory, family: str, weight_type: int, seed: int = 1) -> str:
    arch, experts, shared = FAMILIES[family]
    path = directory / f"moe-{family}-{weight_type}.gguf"
    if not path.exists():
        write_llama_gguf(path, SHAPE, weight_type, seed=seed, arch=arch, experts=experts, shared_ff=shared)
    return str(path)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("weight_type", [8, 12], ids=["Q8_0", "Q4_K"])
def test_a_mixture_of_experts_gives_llama_cpp_logits(family, weight_type, synthetic_dir):
    path = moe_file(synthetic_dir, family, weight_type)
    cfg = ModelConfig.from_gguf(GGUFFile(path))
    assert cfg.moe and cfg.n_expert == FAMILIES[family][1][0]
    tokens = [1] + np.random.default_rng(0).integers(3, SHAPE.n_vocab, 47).tolist()
    ref, llm = llama_cpp_logits(path, tokens)
    ours = token_logits(Model(path, n_ctx=128), tokens)
    np.testing.assert_array_equal(ours, ref)
    want = llama_cpp_greedy(llm, tokens[:8], 16)
    assert list(generate_step(Model(path, n_ctx=128), tokens[:8], make_sampler(0.0), 16)) == want


def test_each_token_uses_the_experts_its_router_picks(synthetic_dir):
    """The same file with every token sent to other experts gives other logits: the test above
    could not pass with a router that picked wrongly."""
    path = moe_file(synthetic_dir, "qwen3moe", 8)
    tokens = list(range(3, 40))
    right = token_logits(Model(path, n_ctx=64), tokens)
    m = Model(path, n_ctx=64)
    for layer in m.weights.layers:  # the experts in another order
        t = layer["ffn_up_exps"]
        object.__setattr__(t, "raw", np.roll(t.raw.reshape(t.ne[2], -1), 1, axis=0).reshape(-1))
    assert np.abs(token_logits(m, tokens) - right).max() > 1e-3


def test_a_mixture_without_its_used_count_is_refused(synthetic_dir):
    path = write_llama_gguf(
        synthetic_dir / "moe-no-used.gguf", SHAPE, 8, arch="qwen3moe", extra={"qwen3moe.expert_count": 8}
    )
    with pytest.raises(BadModelFile, match="expert_used_count"):
        ModelConfig.from_gguf(GGUFFile(path))
