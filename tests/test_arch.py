"""One row per architecture: a small synthetic model of each family against llama.cpp, and the
features flashcli does not run refused in one line."""

from __future__ import annotations

import os
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
# every family at its tiny shape: write_llama_gguf's arguments
FAMILIES = {
    "llama": {"arch": "llama"},
    "llama3": {"arch": "llama", "rope_freqs": True},  # Llama 3's rope factors
    "qwen2": {"arch": "qwen2"},
    "qwen3": {"arch": "qwen3"},
    "gemma2": {"arch": "gemma2"},
    "gemma3": {"arch": "gemma3"},
    "granite": {"arch": "granite"},
    "olmo2": {"arch": "olmo2"},
    "phi3": {"arch": "phi3"},
    "smollm3": {"arch": "smollm3"},
}
TOKENS = [1] + np.random.default_rng(0).integers(3, SHAPE.n_vocab, 63).tolist()  # 64 > the window of 8


def family_file(directory, family: str, weight_type: int) -> str:
    return write_llama_gguf(
        directory / f"arch-{family}-{weight_type}.gguf", SHAPE, weight_type, seed=1, **FAMILIES[family]
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("weight_type", [8, 12], ids=["Q8_0", "Q4_K"])
def test_architecture_matches_llama_cpp(family, weight_type, synthetic_dir):
    """llama.cpp's logits to the bit for a 64-token prompt, and its 16 greedy tokens after 32."""
    path = family_file(synthetic_dir, family, weight_type)
    assert ModelConfig.from_gguf(GGUFFile(path)).arch == FAMILIES[family]["arch"]
    ref, llm = llama_cpp_logits(path, TOKENS)
    ours = token_logits(Model(path, n_ctx=128), TOKENS)
    np.testing.assert_array_equal(ours, ref)
    want = llama_cpp_greedy(llm, TOKENS[:32], 16)
    assert list(generate_step(Model(path, n_ctx=128), TOKENS[:32], make_sampler(0.0), 16)) == want


@pytest.mark.parametrize("family", FAMILIES)
def test_family_through_flash_matches_llama_cpp(family, synthetic_dir, tmp_path):
    """Flash generation (rows) on the plain file and on its conversion, part of the FFN resident
    and the rest streamed: llama.cpp's logits to the bit and its greedy tokens."""
    from converters.convert import convert
    from flashcli.flash import FlashModel

    path = family_file(synthetic_dir, family, 12)
    converted = convert(path, tmp_path / "rows.gguf", layout="rows").output
    ref, llm = llama_cpp_logits(path, TOKENS)
    want = llama_cpp_greedy(llm, TOKENS[:32], 16)
    for source in (path, converted):
        # the runtime reserve alone is several times a tiny model: what is over the minimum decides
        budget = FlashModel(source, n_ctx=128).plan.minimum + int(0.8 * os.path.getsize(source))
        flash = FlashModel(source, budget, n_ctx=128)
        assert flash.stream is not None and 0 < flash.plan.ffn_resident_fraction < 1
        np.testing.assert_array_equal(token_logits(flash, TOKENS), ref)
        assert list(generate_step(FlashModel(source, budget, n_ctx=128), TOKENS[:32], make_sampler(0.0), 16)) == want


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
        ("llama", {"llama.expert_count": 8}, "expert_count"),
        ("gemma3", {"gemma3.attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ("gemma3", {"gemma3.final_logit_softcapping": 30.0}, "final_logit_softcapping"),
        ("olmo2", {"olmo2.attention.sliding_window": 4096}, "sliding_window"),  # OLMo 3
        ("granite", {"granite.expert_count": 8}, "expert_count"),
    ],
)
def test_unhandled_features_are_refused_by_name(arch, extra, needle, synthetic_dir):
    path = write_llama_gguf(synthetic_dir / f"unsupported-{needle}.gguf", SHAPE, 8, arch=arch, extra=extra)
    with pytest.raises(UnsupportedModel, match=needle):
        ModelConfig.from_gguf(GGUFFile(path))
    assert needle in _generate_error(path)


def _generate_error(path) -> str:
    """flashcli generate's stderr, checked to be one line with exit status 1 and no output."""
    r = subprocess.run(
        [sys.executable, "-m", "flashcli.cli", "generate", str(path), "-p", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


def test_a_family_not_run_is_refused_naming_it_and_the_families_run(synthetic_dir):
    path = write_llama_gguf(synthetic_dir / "arch-falcon.gguf", SHAPE, 8, arch="falcon")
    err = _generate_error(path)
    assert "'falcon'" in err and all(name in err for name in ("llama", "qwen3", "gemma2", "phi3", "smollm3"))


@pytest.mark.parametrize(
    "family,missing",
    [
        ("olmo2", "blk.1.post_ffw_norm.weight"),
        ("qwen3", "blk.0.attn_k_norm.weight"),
        ("phi3", "blk.2.ffn_up.weight"),
        ("gemma2", "blk.3.post_attention_norm.weight"),
    ],
)
def test_a_missing_tensor_is_named(family, missing, synthetic_dir):
    path = write_llama_gguf(
        synthetic_dir / f"arch-{family}-no-{missing}.gguf", SHAPE, 8, **FAMILIES[family], omit=(missing,)
    )
    assert missing in _generate_error(path)
