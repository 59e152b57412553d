"""One row per architecture: a small synthetic model of each family against llama.cpp, and the
features flashcli does not run refused in one line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from flashcli.config import ModelConfig
from flashcli.errors import UnsupportedModel
from flashcli.generate import generate_step
from flashcli.gguf_file import GGUFFile
from flashcli.model import Model
from flashcli.sampling import make_sampler

from conftest import llama_cpp_greedy, llama_cpp_logits, token_logits
from synthetic import Shape, write_llama_gguf

# six layers: gemma3's sliding window (8 tokens here) on five of them, one global
SHAPE = Shape(n_layers=6, d_model=256, n_ff=512, n_heads=4, n_kv_heads=2, n_vocab=512)
ARCHS = ["llama", "qwen2", "gemma3"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("weight_type", [8, 12], ids=["Q8_0", "Q4_K"])
def test_architecture_matches_llama_cpp(arch, weight_type, synthetic_dir):
    path = write_llama_gguf(synthetic_dir / f"arch-{arch}-{weight_type}.gguf", SHAPE, weight_type, seed=1, arch=arch)
    assert ModelConfig.from_gguf(GGUFFile(path)).arch == arch
    tokens = [1] + np.random.default_rng(0).integers(3, SHAPE.n_vocab, 63).tolist()  # 64 > the window of 8
    ref, llm = llama_cpp_logits(path, tokens)
    ours = token_logits(Model(path, n_ctx=128), tokens)
    assert np.mean(ours.argmax(-1) == ref.argmax(-1)) >= 0.99
    assert np.abs(ours - ref).max() < 1e-4 * np.abs(ref).max()
    want = llama_cpp_greedy(llm, tokens[:8], 24)
    assert list(generate_step(Model(path, n_ctx=128), tokens[:8], make_sampler(0.0), 24)) == want


def test_sliding_window_is_applied(synthetic_dir):
    """Gemma 3's local layers see 8 tokens here: without the window the logits would differ."""
    path = write_llama_gguf(synthetic_dir / "arch-gemma3-window.gguf", SHAPE, 8, seed=1, arch="gemma3")
    gf = GGUFFile(path)
    cfg = ModelConfig.from_gguf(gf)
    assert cfg.sliding_window == 8 and cfg.swa_layers == (True,) * 5 + (False,)
    tokens = list(range(3, 40))
    windowed = token_logits(Model(path, n_ctx=64), tokens)
    m = Model(path, n_ctx=64)
    object.__setattr__(m.cfg, "swa_layers", (False,) * 6)  # the same model with global attention
    unwindowed = token_logits(m, tokens)
    np.testing.assert_array_equal(windowed[:8], unwindowed[:8])  # within the window: identical
    assert np.abs(windowed[16:] - unwindowed[16:]).max() > 1e-3


@pytest.mark.parametrize(
    "arch,extra,needle",
    [
        ("gemma3", {"gemma3.expert_count": 8, "gemma3.expert_used_count": 2}, "expert_count"),
        ("gemma3", {"gemma3.attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ("gemma3", {"gemma3.final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ],
)
def test_unhandled_features_are_refused_by_name(arch, extra, needle, synthetic_dir):
    path = write_llama_gguf(synthetic_dir / f"unsupported-{needle}.gguf", SHAPE, 8, arch=arch, extra=extra)
    with pytest.raises(UnsupportedModel, match=needle):
        ModelConfig.from_gguf(GGUFFile(path))
    r = subprocess.run(
        [sys.executable, "-m", "flashcli.cli", "generate", str(path), "-p", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr
