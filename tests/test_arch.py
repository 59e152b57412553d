"""One row per architecture: a small synthetic model of each family against llama.cpp, and the
features flashcli does not run refused in one line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from converters.convert import convert
from converters.model_maker import SHAPES
from flashcli.decoding.generate import generate_step
from flashcli.decoding.sampling import make_sampler
from flashcli.engine.config import ModelConfig
from flashcli.engine.gguf_file import GGUFFile
from flashcli.engine.model import Model
from flashcli.errors import UnsupportedModel
from flashcli.flash.flash_model import ABLATIONS, FlashModel, FlashOptions

from conftest import llama_cpp, llama_cpp_greedy, llama_cpp_logits, token_logits
from synthetic import Shape, write_llama_gguf

# six layers: gemma3's sliding window (8 tokens here) on five of them, one global
SHAPE = Shape(n_layers=6, d_model=256, n_ff=512, n_heads=4, n_kv_heads=2, n_vocab=512)
TINY = [name for name in SHAPES if name.startswith("tiny-")]  # the model maker's, one a family
DENSE = [name for name in TINY if not SHAPES[name].n_expert]  # mixtures of experts: test_moe.py
TOKENS = [1] + np.random.default_rng(0).integers(3, 4000, 63).tolist()  # 64 > gemma's windows of 8


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("file_type", ["Q8_0", "Q4_K_M"])
def test_family_matches_llama_cpp(name, file_type, made):
    """llama.cpp's logits to the bit for a 64-token prompt, and its 16 greedy tokens after 32."""
    path = made(name, file_type)
    ref, llm = llama_cpp_logits(path, TOKENS)
    ours = token_logits(Model(path, n_ctx=128), TOKENS)
    np.testing.assert_array_equal(ours, ref)
    want = llama_cpp_greedy(llm, TOKENS[:32], 16)
    assert list(generate_step(Model(path, n_ctx=128), TOKENS[:32], make_sampler(0.0), 16)) == want


@pytest.mark.parametrize("name", DENSE)
def test_family_through_flash_matches_llama_cpp(name, made, tmp_path):
    """Flash generation (rows) at the minimum budget, where attention streams (the runtime
    reserve alone is several times a tiny model): the plain file as the plan decides, its
    conversion with half the FFN tensors streamed too (the "hybrid" configuration). llama.cpp's
    logits to the bit and its 16 greedy tokens."""
    path = made(name, "Q4_K_M")
    converted = convert(path, tmp_path / "rows.gguf", layout="rows").output
    ref, llm = llama_cpp_logits(path, TOKENS)
    want = llama_cpp_greedy(llm, TOKENS[:32], 16)
    for source, options in ((path, FlashOptions()), (converted, ABLATIONS["hybrid"])):
        flash = FlashModel(source, FlashModel(source, n_ctx=128).plan.minimum, n_ctx=128, options=options)
        streamed = set(flash.stream.matrices)
        assert any(".attn_" in n for n in streamed)
        if options is ABLATIONS["hybrid"]:
            assert len([n for n in streamed if ".ffn_" in n]) >= len(ffn_names(source)) // 2
        np.testing.assert_array_equal(token_logits(flash, TOKENS), ref)
        flash.reset()
        assert list(generate_step(flash, TOKENS[:32], make_sampler(0.0), 16)) == want


def ffn_names(path) -> list:
    return [n for n in GGUFFile(path).tensors if ".ffn_" in n and "_norm" not in n]


def test_longrope_long_factors_beyond_the_original_context(made):
    """Phi-3's rope uses its long factors where the context exceeds the original one (1024
    here), as llama.cpp picks them: both sized to 2048 tokens, the logits are llama.cpp's, and
    not those of the short factors."""
    path = made("tiny-phi3", "Q8_0")
    llm = llama_cpp(path, n_ctx=2048)
    llm.eval(TOKENS)
    ref = np.array(llm.scores[: len(TOKENS)], dtype=np.float32)
    np.testing.assert_array_equal(token_logits(Model(path, n_ctx=2048), TOKENS), ref)
    assert not np.array_equal(token_logits(Model(path, n_ctx=128), TOKENS), ref)


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
    "name,missing",
    [
        ("tiny-olmo2", "blk.1.post_ffw_norm.weight"),
        ("tiny-qwen3", "blk.0.attn_k_norm.weight"),
        ("tiny-phi3", "blk.2.ffn_up.weight"),
        ("tiny-gemma2", "blk.3.post_attention_norm.weight"),
    ],
)
def test_a_missing_tensor_is_named(name, missing, made, tmp_path):
    from converters.gguf_writer import TensorSpec, write_gguf

    gf = GGUFFile(made(name, "Q8_0"))
    kept = [t for n, t in gf.tensors.items() if n != missing]
    specs = [TensorSpec(t.name, t.ne, t.ggml_type, t.nbytes, lambda t=t: [t.raw]) for t in kept]
    without = tmp_path / "without.gguf"
    with open(without, "wb") as f:
        write_gguf(f, [gf.raw_metadata(k) for k in gf.metadata], specs, 32)
    assert missing in _generate_error(without)


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-granite"])
def test_capped_and_scaled_logits_from_a_streamed_head(name, made, monkeypatch):
    """The output head streamed in pieces (here forced: a tiny model's plan keeps it), each
    piece soft-capped (Gemma 2) or divided by the logit scale (Granite) as the whole head is."""
    import flashcli.flash.flash_model as flash_module

    ablate = flash_module._ablate_rows
    monkeypatch.setattr(
        flash_module,
        "_ablate_rows",
        lambda streamed, matrices, options: (
            ablate(streamed, matrices, options) | {m.name for m in matrices if m.layer < 0}
        ),
    )
    path = made(name, "Q4_K_M")
    flash = FlashModel(path, FlashModel(path, n_ctx=128).plan.minimum, n_ctx=128)
    assert flash.head_streamed
    ref, _ = llama_cpp_logits(path, TOKENS)
    np.testing.assert_array_equal(token_logits(flash, TOKENS), ref)
