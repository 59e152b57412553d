"""--dram-budget: the size parser and the planners that split a budget."""

from __future__ import annotations

import pytest

from flashcli.budget import parse_size, plan_neurons, plan_rows
from flashcli.bundles import layer_layouts
from flashcli.config import ModelConfig
from flashcli.errors import BudgetTooSmall
from flashcli.ffn_stream import ffn_tensors
from flashcli.gguf_file import GGUFFile


@pytest.mark.parametrize("text,expected", [
    ("512M", 512 * 2**20), ("4G", 4 * 2**30), ("4GiB", 4 * 2**30), ("1.5G", int(1.5 * 2**30)),
    ("2GB", 2 * 10**9), ("100k", 100 * 1024), ("123", 123), ("8MiB", 8 * 2**20), ("1.5g", int(1.5 * 2**30)),
    ("50%", 500), ("12.5%", 125),
])
def test_parse_size(text, expected):
    assert parse_size(text, reference=1000) == expected


@pytest.mark.parametrize("bad", ["", " ", "G", "4X", "-1G", "four", "1..5G", "0", "0G", "0%", "1e3", "4 GB",
                                 " 8M", "-50%", "abc", "5%%"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad, reference=1000)


def test_a_share_needs_a_reference():
    with pytest.raises(ValueError, match="model file"):
        parse_size("50%")


def test_rows_plan_fits_the_budget_and_streams_what_it_cannot_hold(smollm2):
    gf = GGUFFile(smollm2)
    cfg = ModelConfig.from_gguf(gf)
    tensors = ffn_tensors(gf, cfg)
    everything = plan_rows(gf, cfg, None, 256, 1, tensors, set())
    assert everything.streamed == () and everything.ffn_resident_fraction == 1.0
    smallest = plan_rows(gf, cfg, everything.minimum, 256, 1, tensors, set()).minimum  # its prompt batch is smaller
    budget = smallest + sum(t.nbytes for t in tensors) // 2
    p = plan_rows(gf, cfg, budget, 256, 1, tensors, set())
    assert p.total <= budget
    assert p.total > budget - 2 * max(t.nbytes for t in tensors)  # the budget is used, not wasted
    assert 0 < len(p.streamed) < len(tensors) and 0 < p.ffn_resident_fraction < 1
    lines = "\n".join(p.lines())
    assert "resident weights" in lines and "streamed" in lines
    with pytest.raises(BudgetTooSmall, match="minimum of"):
        plan_rows(gf, cfg, p.minimum - 1, 256, 1, tensors, set())
    assert plan_rows(gf, cfg, p.minimum, 256, 1, tensors, set()).ffn_resident_fraction == 0.0


def test_rows_plan_keeps_repackable_tensors_resident_first(qwen_like):
    gf, cfg, tensors, repackable = qwen_like
    full = plan_rows(gf, cfg, None, 256, 1, tensors, repackable)
    smallest = plan_rows(gf, cfg, full.minimum, 256, 1, tensors, repackable).minimum
    p = plan_rows(gf, cfg, smallest + sum(t.nbytes for t in tensors) // 2, 256, 1, tensors, repackable)
    assert 0 < len(p.streamed) < len(tensors)
    streamed = set(p.streamed)
    assert any(t.name not in repackable for t in tensors)
    # no repackable tensor is streamed while a non-repackable one is resident
    if any(n in repackable for n in streamed):
        assert all(t.name in streamed for t in tensors if t.name not in repackable)


@pytest.fixture(scope="module")
def qwen_like(smollm2):
    """SmolLM2's tensors with a made-up split into repackable and not, alternating by layer."""
    gf = GGUFFile(smollm2)
    cfg = ModelConfig.from_gguf(gf)
    tensors = ffn_tensors(gf, cfg)
    return gf, cfg, tensors, {t.name for t in tensors if int(t.name.split(".")[1]) % 2 == 0}


def test_neuron_plan_fits_the_budget_and_favours_layers_that_need_more(smollm2_bundles):
    gf = GGUFFile(smollm2_bundles)
    cfg = ModelConfig.from_gguf(gf)
    strides = [x.stride for x in layer_layouts(gf, cfg.d_model, cfg.n_layers)]
    want = [0.2] * (cfg.n_layers - 1) + [0.6]
    full = plan_neurons(gf, cfg, None, 256, 1, strides, want, 1 << 20)
    assert full.slots == (cfg.n_ff,) * cfg.n_layers
    budget = (full.minimum + full.total) // 2
    p = plan_neurons(gf, cfg, budget, 256, 1, strides, want, 1 << 20)
    assert p.total <= budget
    assert p.total > 0.95 * budget  # the budget is used, not wasted
    assert p.slots[-1] > p.slots[0]  # the layer wanting 3x more gets more
    assert all(s <= cfg.n_ff for s in p.slots)
    with pytest.raises(BudgetTooSmall, match="minimum of"):
        plan_neurons(gf, cfg, p.minimum - 1, 256, 1, strides, want, 1 << 20)
    assert min(plan_neurons(gf, cfg, p.minimum, 256, 1, strides, want, 1 << 20).slots) >= 1
