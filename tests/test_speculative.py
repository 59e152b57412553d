"""Speculative decoding: exact greedy output for every draft source, the sampling rule keeps the
target's distribution, KV rollback, and the loader's choices (vocabulary, budget, cost model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flashcli.decoding.generate import generate_step, prefill
from flashcli.decoding.loader import LoadOptions, load
from flashcli.decoding.sampling import make_sampler
from flashcli.decoding.speculative import ModelDrafter, NgramDrafter, SpeculationStats, accept, speculative_step
from flashcli.engine.model import Model
from flashcli.engine.tokenizer import Tokenizer
from flashcli.flash.flash_model import FlashModel, FlashOptions

from conftest import QWEN, TEXT, verify_batch
from synthetic import TINY, write_llama_gguf

FLASHCLI = [sys.executable, "-m", "flashcli.cli"]
QWEN_DRAFT = QWEN.parent / "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"


def speculate(target, drafter, tokens, n, sampler=None, max_draft=8):
    stats = SpeculationStats()
    out = list(speculative_step(target, drafter, tokens, sampler or make_sampler(0.0), n, max_draft, stats, prefill))
    return out, stats


def test_rollback_gives_the_bits_of_a_fresh_run(smollm2):
    """Tokens evaluated after a rollback get exactly the logits a run that never saw the rolled
    back tokens gives."""
    tokens = Tokenizer(smollm2).encode(TEXT)[:40]
    m = Model(smollm2, n_ctx=128)
    m.eval(tokens[:30])
    m.eval([5, 6, 7, 8])  # drafted tokens a verification rejects
    m.rollback(30)
    after = m.eval(tokens[30:34], all_logits=True)
    m.reset()
    m.eval(tokens[:30])
    fresh = m.eval(tokens[30:34], all_logits=True)
    np.testing.assert_array_equal(after, fresh)


def test_exact_mode_gives_each_token_its_single_token_bits(smollm2):
    """A verifying batch equals token-by-token decoding bit for bit (kernels.py splits products
    into batches the kernels compute as one column), where a plain batch does not."""
    batch, single = verify_batch(smollm2)
    np.testing.assert_array_equal(batch, single)


@pytest.fixture(scope="module")
def relu_as_draft(relu_model):
    """The ReLU fixture shares SmolLM2's tokenizer: a draft that agrees with it often, not always."""
    return relu_model


@pytest.mark.parametrize("source", ["ngram", "model"])
def test_greedy_output_is_the_output_without_speculation(smollm2, smollm2_flash, relu_as_draft, source):
    """Same file, same budget (everything streamed: the verifying pass reads each matrix once),
    with and without drafting: the same tokens. Rejections happen, so rollback is exercised."""
    tok = Tokenizer(smollm2)
    prompts = [
        tok.encode(tok.apply_chat_template(p), special=True)
        for p in ("Write a Python function that reverses a string.", "List the days of the week, one per line.")
    ]
    budget = FlashModel(smollm2_flash, n_ctx=512).plan.minimum + (24 << 20)
    target = FlashModel(smollm2_flash, budget, n_ctx=512, options=FlashOptions(prompt_batches=(16, 512)))
    assert target.stream is not None and target.stream.head_streamed
    drafter = NgramDrafter() if source == "ngram" else ModelDrafter(Model(relu_as_draft, n_ctx=512), "relu", prefill)
    total = SpeculationStats()
    for prompt in prompts:
        want = list(generate_step(target, prompt, make_sampler(0.0), 48))
        got, stats = speculate(target, drafter, prompt, 48)
        assert got == want, (source, tok.decode(got), tok.decode(want))
        total.passes += stats.passes
        total.drafted += stats.drafted
        total.accepted += stats.accepted
    print(f"{source}: {total.as_dict()}")
    assert 0 < total.accepted < total.drafted  # some drafts accepted, some rolled back


def test_a_lean_draft_proposes_its_vocabulary_and_never_changes_the_output(smollm2, smollm2_flash, smollm2_draft):
    """A lean draft (a head of 2048 tokens, matrices re-encoded) drafts for SmolLM2 under a
    budget: every drafted id is one of its head's tokens, it disagrees with the target often
    (so output taken from the draft's logits would differ), and the output is the target's own,
    greedy and sampled with a seed."""
    from flashcli.engine.bundles import DRAFT_VOCAB
    from flashcli.engine.gguf_file import GGUFFile

    vocabulary = np.asarray(GGUFFile(smollm2_draft).get(DRAFT_VOCAB), np.int64)
    assert len(vocabulary) == 2048 and len(np.unique(vocabulary)) == 2048
    tok = Tokenizer(smollm2)
    prompt = tok.encode(tok.apply_chat_template("Write a Python function that reverses a string."), special=True)
    budget = FlashModel(smollm2_flash, n_ctx=256).plan.minimum + (24 << 20)
    target = FlashModel(smollm2_flash, budget, n_ctx=256, options=FlashOptions(prompt_batches=(16, 512)))
    draft = FlashModel(smollm2_draft, None, n_ctx=256)
    assert draft.weights.output.n_rows == 2048
    drafter = ModelDrafter(draft, "lean", prefill, vocabulary=vocabulary, n_vocab=target.cfg.n_vocab)
    proposed = []
    propose = drafter.propose

    def recorded(tokens, k, sampler):
        drafts, dists = propose(tokens, k, sampler)
        proposed.extend(drafts)
        for q in dists:
            assert q is None or (
                len(q) == target.cfg.n_vocab and q[np.setdiff1d(np.arange(len(q)), vocabulary)].sum() == 0
            )
        return drafts, dists

    drafter.propose = recorded
    for seed, temperature in ((0, 0.0), (3, 0.8)):
        want = list(generate_step(target, prompt, make_sampler(temperature, seed=seed), 40))
        got, stats = speculate(target, drafter, prompt, 40, make_sampler(temperature, seed=seed))
        if temperature == 0.0:
            assert got == want, (tok.decode(got), tok.decode(want))
            assert 0 < stats.accepted < stats.drafted, stats  # the draft is wrong at times: verification decides
        assert all(0 <= x < target.cfg.n_vocab for x in got)
    assert proposed and set(proposed) <= set(vocabulary.tolist())


def test_sampling_rule_keeps_the_target_distribution():
    """Drafted x ~ q, accepted with min(1, p/q), else redrawn from max(0, p - q): the emitted
    token is distributed as p, for a model draft (q) and a deterministic one (n-gram)."""
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    q = np.array([0.1, 0.4, 0.1, 0.3, 0.1])
    sampler = make_sampler(1.0, seed=0)
    n = 40000
    for deterministic in (False, True):
        counts = np.zeros(len(p))
        for _ in range(n):
            x = 1 if deterministic else int(sampler.rng.choice(len(q), p=q))
            out = accept(p, x, None if deterministic else q, sampler)
            counts[x if out is None else out] += 1
        assert np.abs(counts / n - p).max() < 0.01, (deterministic, counts / n)


def test_speculative_sampling_matches_the_target_on_a_tiny_model(synthetic_dir):
    """On a tiny model, the second token's distribution with a (different) draft model equals
    the target's exactly computed one: sum over the first token of p(t1) p(t2 | t1)."""
    target_path = write_llama_gguf(synthetic_dir / "spec-target.gguf", TINY, 8, seed=11)
    draft_path = write_llama_gguf(synthetic_dir / "spec-draft.gguf", TINY, 8, seed=12)
    target, draft = Model(target_path, n_ctx=64), Model(draft_path, n_ctx=64)
    prompt = [1, 17, 42, 99]
    k, temperature = 3, 1.0
    exact_sampler = make_sampler(temperature, top_k=k)
    p1 = exact_sampler.distribution(prefill(target, prompt))
    want = np.zeros(TINY.n_vocab)
    for t1 in np.flatnonzero(p1):
        target.reset()
        want += p1[t1] * exact_sampler.distribution(prefill(target, prompt + [int(t1)]))
    drafter = ModelDrafter(draft, "tiny", prefill)
    counts = np.zeros(TINY.n_vocab)
    runs = 3000
    for seed in range(runs):
        out, _ = speculate(target, drafter, prompt, 2, make_sampler(temperature, top_k=k, seed=seed), max_draft=2)
        counts[out[1]] += 1
    tv = 0.5 * np.abs(counts / runs - want).sum()
    assert tv < 0.04, tv


def run(args, **kw):
    return subprocess.run(FLASHCLI + [str(a) for a in args], capture_output=True, text=True, timeout=900, **kw)


def test_a_draft_with_another_vocabulary_is_refused(smollm2, gemma3):
    r = run(["generate", smollm2, "--draft", gemma3, "--dram-budget", "90%", "-p", "hi", "-n", "4"])
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "vocabulary" in r.stderr


def test_a_budget_too_small_for_draft_and_target_is_one_line_with_the_minimum(smollm2_flash, relu_model):
    """Enough for the target alone, not with the draft beside it: one line naming the minimum."""
    alone = FlashModel(smollm2_flash, n_ctx=64).plan.minimum
    r = run(
        [
            "generate",
            smollm2_flash,
            "--draft",
            relu_model,
            "--dram-budget",
            str(alone + (1 << 20)),
            "-p",
            "hi",
            "-n",
            "4",
        ]
    )
    assert r.returncode == 1 and r.stdout == ""
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "minimum of" in line and "draft" in line, line
    ok = run(
        [
            "generate",
            smollm2_flash,
            "--draft",
            "ngram",
            "--dram-budget",
            str(alone + (1 << 20)),
            "-p",
            "hi",
            "-n",
            "4",
            "-q",
        ]
    )
    assert ok.returncode == 0, ok.stderr


@pytest.mark.slow
def test_the_plan_chooses_the_draft_by_its_cost(qwen):
    """The 1.5B at half its size: streaming dominates, the resident 0.5B pays; with twice its
    size in budget nothing streams, drafting cannot pay and auto runs without the model draft."""
    assert QWEN_DRAFT.exists(), "make test fetches qwen2.5-coder-0.5b"
    size = os.path.getsize(qwen)
    half = load(qwen, LoadOptions(dram_budget=size // 2, n_ctx=256, draft="auto"))
    try:
        assert half.draft_model is not None, half.notes
        # the 0.5B beside it, lean (converters/lean_draft.py, 238 MiB) where `flashcli convert` made it
        assert half.model.plan.parts["draft model"] > 200 << 20 and half.model.stream is not None
    finally:
        half.close()
    whole = load(qwen, LoadOptions(dram_budget=2 * size, n_ctx=256, draft="auto"))
    try:
        assert whole.draft_model is None and any("does not pay" in n for n in whole.notes), whole.notes
    finally:
        whole.close()


@pytest.mark.slow
def test_qwen_with_its_draft_at_half_its_size_is_exact(qwen, tmp_path):
    """`--draft auto` at 50%: the 0.5B drafts, the text is byte-identical to --draft off."""
    outs = {}
    for draft in ("off", "auto"):
        stats = tmp_path / f"{draft}.json"
        r = run(
            [
                "generate",
                qwen,
                "--dram-budget",
                "50%",
                "--chat",
                "-n",
                "40",
                "--draft",
                draft,
                "-q",
                "--stats-json",
                stats,
                "-p",
                "Write a Python function that checks whether a number is prime.",
            ]
        )
        assert r.returncode == 0, r.stderr
        outs[draft] = (r.stdout, json.loads(stats.read_text()))
    assert outs["auto"][0] == outs["off"][0]
    s = outs["auto"][1]
    assert (
        s["draft"]
        and s["draft"].endswith(("0.5B-Instruct.Q4_K_M.gguf", "0.5B-Instruct.Q4_K_M.draft.gguf"))
        and s["tokens_per_pass"] > 1.5
    ), s


def test_auto_draft_is_off_on_a_bundles_file(relu_flash):
    """A bundles file's neuron FFN sums a batch in another order than a token alone: verifying
    drafts would change the output, so auto does not draft there."""
    loaded = load(relu_flash, LoadOptions(dram_budget=os.path.getsize(relu_flash), n_ctx=128, draft="auto"))
    try:
        assert loaded.drafter is None and "bundles" in loaded.notes[0]
    finally:
        loaded.close()
