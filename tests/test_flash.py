"""Flash generation against dense generation: exactness with everything cached, quality with the
predictor, the budget in fact (a cgroup limit), and the command line around it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import RELU_MODEL, TEXT

from flashcli import ggml
from flashcli.config import ModelConfig
from flashcli.engine import load
from flashcli.flash import BundleDenseFFN, FlashModel, FlashOptions
from flashcli.generate import generate_step
from flashcli.gguf_file import GGUFFile
from flashcli.model import Model
from flashcli.perplexity import perplexity, token_logits
from flashcli.sampling import make_sampler
from flashcli.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = (Path(__file__).parent / "data" / "heldout.txt").read_text()
FLASHCLI = [sys.executable, "-m", "flashcli.cli"]
PROMPT = "The three primary colors are"


def dense_of_file(path):
    """Dense generation of a converted file: every neuron, straight from the mapped bundles."""
    gf = GGUFFile(path)
    pool = ggml.ThreadPool(2)
    return Model(path, n_ctx=512, ffn=BundleDenseFFN(gf, ModelConfig.from_gguf(gf), pool), gguf_file=gf, pool=pool)


def greedy(model, tokens, n=32):
    return list(generate_step(model, tokens, make_sampler(0.0), n))


def test_predictor_off_full_window_is_token_identical_to_dense_of_the_file(smollm2, smollm2_flash):
    tokens = Tokenizer(smollm2).encode(PROMPT)
    want = greedy(dense_of_file(smollm2_flash), tokens)
    flash = FlashModel(smollm2_flash, n_ctx=512, options=FlashOptions(predictor=False))
    assert greedy(flash, tokens) == want
    naive = FlashModel(smollm2_flash, n_ctx=512, options=FlashOptions(predictor=False, naive=True))
    assert greedy(naive, tokens) == want  # the whole FFN re-read every token: same numbers


def test_flash_stays_close_to_dense_on_the_original_gguf(smollm2, smollm2_flash):
    """Not bit-identical: the down column is re-quantized (Q4_1 -> Q8_0) and multiplied without
    quantizing the activations. Close in logits and perplexity."""
    tokens = Tokenizer(smollm2).encode(TEXT)[:256]
    dense = token_logits(Model(smollm2, n_ctx=512), tokens)
    flash = token_logits(FlashModel(smollm2_flash, n_ctx=512, options=FlashOptions(predictor=False), all_logits=True), tokens)
    assert np.mean(dense.argmax(-1) == flash.argmax(-1)) >= 0.9
    assert np.abs(dense - flash).mean() < 0.1 * dense.std()


def test_cache_smaller_than_the_wanted_set_still_computes_every_neuron(smollm2_flash):
    """Neurons beyond the cache are read and used once: output stays that of the full FFN."""
    tokens = list(range(1000, 1040))
    full = token_logits(FlashModel(smollm2_flash, n_ctx=256, options=FlashOptions(predictor=False), all_logits=True), tokens)
    probe = FlashModel(smollm2_flash, n_ctx=256, options=FlashOptions(predictor=False), all_logits=True)
    tight = FlashModel(smollm2_flash, probe.plan.minimum, n_ctx=256, options=FlashOptions(predictor=False), all_logits=True)
    small = token_logits(tight, tokens)
    assert max(tight.plan.slots) < tight.cfg.n_ff // 4
    assert tight.telemetry()["ffn_fraction_uncached_per_token"] > 0.5
    # the same neurons, summed in another grouping: equal up to rounding (which 8-bit
    # re-quantization downstream turns into small logit noise)
    assert np.abs(small - full).mean() < 0.05 * full.std()
    assert np.mean(small.argmax(-1) == full.argmax(-1)) >= 0.9


def dense_and_flash_perplexity(source, converted, n_tokens=512):
    """Perplexity on held-out text (not the calibration text): dense on the source, flash with
    default settings on the converted file; and the flash engine, for its telemetry."""
    tokens = Tokenizer(source).encode(HELDOUT)[:n_tokens]
    dense = perplexity(Model(source, n_ctx=512), tokens)["perplexity"]
    engine = load(converted, n_threads=2, n_ctx=512, all_logits=True)
    return dense, perplexity(engine, tokens)["perplexity"], engine


def test_smollm2_default_perplexity_within_3_percent(smollm2, smollm2_flash):
    dense, flash, engine = dense_and_flash_perplexity(smollm2, smollm2_flash)
    assert flash <= 1.03 * dense, (flash, dense)
    assert engine.telemetry()["ffn_fraction_predicted_per_token"] < 1.0


def test_relu_fixture_quality_and_new_reads(relu_model, relu_flash):
    dense, flash, engine = dense_and_flash_perplexity(relu_model, relu_flash)
    assert flash <= 1.02 * dense, (flash, dense)
    t = engine.telemetry()
    true_fraction = np.mean(GGUFFile(relu_flash).get("flashcli.predictor.true_fraction"))
    assert t["ffn_fraction_predicted_per_token"] <= 2.5 * true_fraction
    assert t["ffn_fraction_loaded_per_token"] <= 0.06  # new FFN neurons read per token


def run(args, **kw):
    return subprocess.run(FLASHCLI + [str(a) for a in args], capture_output=True, text=True, timeout=600, **kw)


def test_budget_too_small_is_one_line_with_the_minimum(smollm2_flash):
    r = run(["generate", smollm2_flash, "--dram-budget", "10M", "-p", "hi"])
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "minimum of" in r.stderr and r.stdout == ""


def test_budget_on_an_unconverted_file_says_convert(smollm2):
    r = run(["generate", smollm2, "--dram-budget", "1G", "-p", "hi"])
    assert r.returncode == 1 and "flashcli convert" in r.stderr


def test_json_lines_and_telemetry(smollm2_flash, tmp_path):
    stats = tmp_path / "s.json"
    r = run(["generate", smollm2_flash, "--json", "-n", "6", "-p", PROMPT, "--stats-json", stats, "-v"])
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [set(x) for x in lines[:-1]] == [{"token", "text"}] * 6
    assert lines[-1]["done"] is True
    s = json.loads(stats.read_text())
    for key in ("tokens_per_s", "io_ms", "mem_ms", "compute_ms", "bytes_read_per_token",
                "ffn_fraction_loaded_per_token", "cache_hit_rate", "peak_rss_bytes", "baseline_rss_bytes"):
        assert key in s and s[key] >= 0, key
    assert "neuron caches" in r.stderr  # --verbose prints the plan
    text = run(["generate", smollm2_flash, "-n", "6", "-p", PROMPT, "-q"]).stdout
    assert text == "".join(x["text"] for x in lines[:-1]) + "\n"


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/sys/fs/cgroup/memory").is_dir(),
                    reason="needs root and cgroup v1 to set a memory limit")
def test_relu_at_70_percent_budget_survives_a_cgroup_limit(relu_flash, tmp_path):
    """Budget = 70% of the ReLU fixture's file; cgroup limit = budget + the measured baseline;
    cold cache. It must finish, without an OOM kill and without thrashing: re-faulting evicted
    pages would show as major page faults beyond those of the same cold run without a limit."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from cgroup_run import run_limited

    budget = int(0.7 * RELU_MODEL.stat().st_size)
    stats = tmp_path / "s.json"
    cmd = FLASHCLI + ["generate", str(relu_flash), "-p", PROMPT, "-n", "24", "-q",
                      "--dram-budget", str(budget), "--stats-json", str(stats)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    free = run_limited(cmd, 64 << 30, **pipes)  # cold, no effective limit
    assert free["returncode"] == 0, free["stderr"]
    unlimited = json.loads(stats.read_text())
    assert unlimited["peak_rss_bytes"] - unlimited["baseline_rss_bytes"] <= budget  # the plan holds
    limited = run_limited(cmd, budget + unlimited["baseline_rss_bytes"], **pipes)
    assert limited["returncode"] == 0, limited["stderr"]
    assert limited["oom_kills"] == 0
    s = json.loads(stats.read_text())
    assert s["generated_tokens"] == 24 and s["bytes_read_per_token"] > 0
    assert s["major_page_faults"] <= 1.5 * unlimited["major_page_faults"] + 500, (s, unlimited)
