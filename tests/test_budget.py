"""--dram-budget: the size parser and the planner that splits a budget."""

from __future__ import annotations

import pytest

from flashcli.budget import parse_size, plan_budget
from flashcli.bundles import BundleLayout
from flashcli.config import ModelConfig
from flashcli.errors import BudgetTooSmall
from flashcli.gguf_file import GGUFFile


@pytest.mark.parametrize("text,expected", [
    ("512M", 512 * 2**20), ("4G", 4 * 2**30), ("4GiB", 4 * 2**30), ("1.5G", int(1.5 * 2**30)),
    ("2GB", 2 * 10**9), ("100k", 100 * 1024), ("123", 123), (" 8 MiB ", 8 * 2**20), ("1.5g", int(1.5 * 2**30)),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "G", "4X", "-1G", "four", "1..5G"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def plan(gf, budget, want):
    cfg = ModelConfig.from_gguf(gf)
    lay = BundleLayout.from_metadata(gf, cfg.d_model)
    return plan_budget(gf, cfg, budget, 256, 32, 1, lay.payload_bytes, lay.stride, want), cfg


def test_planner_fits_the_budget_and_favours_layers_that_need_more(smollm2_flash):
    gf = GGUFFile(smollm2_flash)
    n_layers = ModelConfig.from_gguf(gf).n_layers
    want = [0.2] * (n_layers - 1) + [0.6]
    full, cfg = plan(gf, None, want)
    assert full.slots == (cfg.n_ff,) * n_layers
    budget = (full.minimum + full.budget) // 2
    p, _ = plan(gf, budget, want)
    parts = p.resident_weights + p.predictors + p.kv_cache + p.buffers + p.neuron_caches
    assert parts <= budget
    assert parts > 0.95 * budget  # the budget is used, not wasted
    assert p.slots[-1] > p.slots[0]  # the layer wanting 3x more gets more
    assert all(s <= cfg.n_ff for s in p.slots)
    lines = "\n".join(p.lines())
    assert "resident weights" in lines and "neuron caches" in lines


def test_budget_below_minimum_names_the_minimum(smollm2_flash):
    gf = GGUFFile(smollm2_flash)
    p, _ = plan(gf, None, [0.5] * 30)
    with pytest.raises(BudgetTooSmall, match="minimum of"):
        plan(gf, p.minimum - 1, [0.5] * 30)
    ok, _ = plan(gf, p.minimum, [0.5] * 30)
    assert min(ok.slots) >= 1
