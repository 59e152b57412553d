"""A converted mixture's calibration picks (converters/expert_calibration.py) and the slots filled
with the experts picked most before the first token (expert_cache.fill_hottest): the picks are
the routers' own (replayed here in numpy on the dense model's FFN inputs), the slots hold the
experts picked most, and the tokens stay llama.cpp's."""

from __future__ import annotations

import numpy as np
import pytest

from flashcli.decoding.generate import generate_step
from flashcli.decoding.loader import LoadOptions, check, load
from flashcli.decoding.sampling import make_sampler
from flashcli.engine import ggml
from flashcli.engine.config import ModelConfig
from flashcli.engine.expert_records import calibration_picks
from flashcli.engine.gguf_file import GGUFFile
from flashcli.engine.model import Model
from flashcli.flash.flash_model import FlashOptions, plan_for

from conftest import llama_cpp_greedy, llama_cpp_logits

NAME = "tiny-qwen3moe"


@pytest.fixture(scope="module")
def converted(made, tmp_path_factory):
    from converters.convert import convert

    source = made(NAME, "Q8_0")
    return source, convert(source, tmp_path_factory.mktemp("calibration") / "moe.flash.gguf").output


def test_the_stored_picks_are_the_routers_own_on_the_calibration_text(converted):
    """Every layer's router replayed in numpy (softmax order = logits order; top k) on the FFN
    inputs the dense model computes for the calibration text gives the counts the file keeps."""
    from converters.calibration import calibration_tokens
    from converters.expert_calibration import CALIBRATION_TOKENS

    source, flash = converted
    gf = GGUFFile(source)
    cfg = ModelConfig.from_gguf(gf)
    stored = calibration_picks(GGUFFile(flash), cfg.n_layers, cfg.n_expert)
    tokens = calibration_tokens(source, CALIBRATION_TOKENS)
    model = Model(source, n_ctx=len(tokens))
    inputs = {}
    model.on_ffn_input = lambda layer, h: inputs.setdefault(layer, h.astype(np.float32).copy())
    model.eval(tokens, hidden=True)
    want = np.zeros((cfg.n_layers, cfg.n_expert), np.int64)
    for layer, h in inputs.items():
        router = gf.tensor(f"blk.{layer}.ffn_gate_inp.weight")
        w = ggml.dequantize_rows(router.rows(), router.ggml_type, router.row_len)  # [n_expert, d]
        top = np.argsort(-(h @ w.T), axis=1, kind="stable")[:, : cfg.n_expert_used]
        np.add.at(want[layer], top.ravel(), 1)
    assert stored.sum() == len(tokens) * cfg.n_layers * cfg.n_expert_used
    # the graphs' sums and numpy's may order a near tie differently: a few picks, no more
    assert np.abs(stored - want).sum() <= 0.01 * stored.sum()


def test_the_slots_start_with_the_experts_picked_most_and_the_tokens_stay_llama_cpps(converted):
    """Before the first token each pool holds the experts its layers picked most in calibration
    (by share of the layer's picks, as many as it has slots); decoding from there gives llama.cpp's
    greedy tokens on the source, and so does the run that starts empty."""
    source, flash = converted
    gf, cfg = check(flash)
    picks = calibration_picks(gf, cfg.n_layers, cfg.n_expert)
    budget = plan_for(gf, cfg, None, 128).minimum + 4 * 2**20
    prompt = [1, 400, 23, 977, 5, 61]
    _, llm = llama_cpp_logits(source, prompt)
    want = llama_cpp_greedy(llm, prompt, 12)
    for warm in (True, False):
        loaded = load(flash, LoadOptions(dram_budget=budget, n_ctx=128, flash=FlashOptions(warm_experts=warm)))
        ffn = loaded.model.ffn
        for pool in ffn.pools:
            held = {(pool.layers[r], int(e)) for r, e in zip(pool.owner, pool.expert_in) if e >= 0}
            if warm:
                ranked = sorted(
                    (
                        (-picks[layer, e] / picks[layer].sum(), layer, e)
                        for layer in pool.layers
                        for e in range(cfg.n_expert)
                    ),
                )
                assert held == {(layer, e) for _, layer, e in ranked[: pool.n_slots]}
            else:
                assert not held
        assert (ffn.warmed > 0) == warm
        assert list(generate_step(loaded.model, prompt, make_sampler(0.0), 12)) == want
        loaded.close()


def test_a_file_without_picks_starts_empty(made):
    """A GGUF (no calibration) runs with its caches empty until tokens ask for experts."""
    source = made(NAME, "Q8_0")
    gf, cfg = check(source)
    assert calibration_picks(gf, cfg.n_layers, cfg.n_expert) is None
    loaded = load(source, LoadOptions(dram_budget=plan_for(gf, cfg, None, 128).minimum, n_ctx=128))
    assert loaded.model.ffn.warmed == 0 and all((p.expert_in < 0).all() for p in loaded.model.ffn.pools)
    loaded.close()
