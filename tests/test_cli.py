"""The command line as a shell user meets it: stdout carries only the answer, errors are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flashcli.engine.tokenizer import Tokenizer

from conftest import llama_cpp_greedy, llama_cpp_logits
from synthetic import TINY, write_llama_gguf
from test_convert import _retype as retype

FLASHCLI = [sys.executable, "-m", "flashcli.cli"]


def run(args, stdin=None, timeout=300):
    return subprocess.run(
        FLASHCLI + [str(a) for a in args], input=stdin, capture_output=True, text=True, timeout=timeout
    )


def test_generate_greedy_equals_llama_cpp_and_stdout_is_only_text(smollm2, tmp_path):
    prompt = "The three primary colors are"
    stats_path = tmp_path / "stats.json"
    r = run(["generate", smollm2, "-p", prompt, "-n", "12", "--stats-json", stats_path])
    assert r.returncode == 0, r.stderr
    tok = Tokenizer(smollm2)
    prompt_tokens = tok.encode(prompt)
    _, llm = llama_cpp_logits(smollm2, prompt_tokens)
    want = llama_cpp_greedy(llm, prompt_tokens, 12)
    assert r.stdout == tok.decode(want) + "\n"
    stats = json.loads(stats_path.read_text())
    for key in ("prompt_tokens", "generated_tokens", "tokens_per_s", "peak_rss_bytes"):
        assert key in stats
    assert stats["prompt_tokens"] == len(prompt_tokens)
    assert stats["generated_tokens"] == 12
    assert "tok/s" in r.stderr


def test_prompt_from_stdin_and_dash(smollm2):
    a = run(["generate", smollm2, "-n", "5", "-q"], stdin="Once upon a time")
    b = run(["generate", smollm2, "-n", "5", "-q", "-p", "-"], stdin="Once upon a time")
    c = run(["generate", smollm2, "-n", "5", "-q", "-p", "Once upon a time"])
    assert a.returncode == b.returncode == c.returncode == 0
    assert a.stdout == b.stdout == c.stdout
    assert a.stdout.strip()
    assert a.stderr == ""


def test_chat_template_and_end_of_generation(smollm2, tmp_path):
    stats_path = tmp_path / "s.json"
    r = run(["generate", smollm2, "--chat", "-n", "200", "-q", "-p", "Say hello.", "--stats-json", stats_path])
    assert r.returncode == 0, r.stderr
    stats = json.loads(stats_path.read_text())
    assert stats["finish_reason"] == "stop"  # the instruct model ends its answer with <|im_end|>
    assert "<|im_end|>" not in r.stdout and r.stdout.strip()


def test_sampling_is_seeded(smollm2):
    args = [
        "generate",
        smollm2,
        "-n",
        "16",
        "-q",
        "-p",
        "My favourite food is",
        "--temperature",
        "1.0",
        "--top-p",
        "0.95",
    ]
    a = run(args + ["--seed", "1"])
    b = run(args + ["--seed", "1"])
    assert a.returncode == 0 and a.stdout == b.stdout


def test_perplexity_command(smollm2, tmp_path):
    from conftest import TEXT

    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    r = run(["perplexity", smollm2, "--file", text, "--max-tokens", "200", "--json"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tokens"] == 200
    # the same number from llama.cpp's logits
    tokens = Tokenizer(smollm2).encode(TEXT)[:200]
    ref, _ = llama_cpp_logits(smollm2, tokens)
    z = ref.astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ppl = float(np.exp(-logp[np.arange(199), tokens[1:]].mean()))
    assert out["perplexity"] == pytest.approx(ppl, rel=0.01)


def test_perplexity_runs_at_the_smallest_budget_generate_accepts(smollm2_flash):
    """perplexity sizes its windows to the budget: where generate's short context fits and 512-token
    windows do not (their KV cache and activations), it scores in shorter windows; it refuses only
    a budget that even the shortest window does not fit."""
    from flashcli.flash.flash_model import FlashModel

    # generate -n 8 after a short prompt holds a context of 256 positions (the cache's padding)
    smallest = FlashModel(smollm2_flash, n_ctx=64).plan.minimum
    generate = ["generate", smollm2_flash, "-p", "The history of", "-n", "8", "-q", "--dram-budget"]
    assert run(generate + [smallest - 1]).returncode == 1
    r = run(generate + [smallest])
    assert r.returncode == 0, r.stderr
    heldout = os.path.join(os.path.dirname(__file__), "data", "heldout.txt")
    measure = ["perplexity", smollm2_flash, "-f", heldout, "--max-tokens", "40", "--json"]
    roomy = run(measure)
    tight = run(measure + ["-v", "--dram-budget", smallest])
    assert roomy.returncode == 0 and tight.returncode == 0, tight.stderr
    roomy, tight_out = json.loads(roomy.stdout), json.loads(tight.stdout)
    assert roomy["window"] == 512 and tight_out["window"] < 512 and tight_out["window_requested"] == 512
    assert f"scoring in windows of {tight_out['window']} tokens" in tight.stderr
    # 40 tokens: one window either way, so the same number (every weight on the same kernels)
    assert np.isfinite(tight_out["perplexity"])
    assert tight_out["perplexity"] == pytest.approx(roomy["perplexity"], rel=1e-4)
    refused = run(measure + ["--dram-budget", smallest - 1])
    assert refused.returncode == 1 and "below the minimum" in refused.stderr and refused.stdout == ""


@pytest.mark.parametrize(
    "case", ["missing", "not_gguf", "truncated", "directory", "unsupported_arch", "unsupported_type"]
)
def test_bad_model_is_one_line_error(case, tmp_path, smollm2, synthetic_dir):
    path = tmp_path / "m.gguf"
    if case == "not_gguf":
        path.write_bytes(b"hello, I am not a model" * 10)
    elif case == "truncated":
        with open(smollm2, "rb") as f:
            path.write_bytes(f.read(40_000_000))
    elif case == "directory":
        path.mkdir()
    elif case == "unsupported_arch":
        import gguf

        w = gguf.GGUFWriter(str(path), "mamba")
        w.add_block_count(1)
        w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    elif case == "unsupported_type":
        write_llama_gguf(path, TINY, weight_type=8)
        retype(path, "blk.0.ffn_up.weight", 16)  # IQ2_XXS: not run by flashcli
    r = run(["generate", path, "-p", "hi", "-n", "2"])
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("flashcli: error:")
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    if case.startswith("unsupported"):
        assert "mamba" in r.stderr or "IQ2_XXS" in r.stderr


def test_empty_prompt_and_no_prompt(smollm2):
    r = run(["generate", smollm2, "-p", "   "])
    assert r.returncode != 0 and "empty" in r.stderr


BAD_INPUTS = [
    # (options, words the one-line error must contain)
    (["--dram-budget", ""], "empty"),
    (["--dram-budget", "0"], "more than zero"),
    (["--dram-budget", "-1G"], "cannot read"),
    (["--dram-budget", "1e3"], "cannot read"),
    (["--dram-budget", "4 GB"], "cannot read"),
    (["--dram-budget", "abc"], "cannot read"),
    (["--dram-budget", "0%"], "more than zero"),
    (["--dram-budget", "1K"], "minimum of"),
    (["-n", "0"], "-n"),
    (["-n", "-1"], "-n"),
    (["--threads", "0"], "--threads"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "2"], "--top-p"),
    (["--top-p", "0"], "--top-p"),
    (["--sparsity", "1.5"], "--sparsity"),
    (["--sparsity", "some"], "--sparsity"),
    (["--sparsity", "0.5"], "rows layout"),  # SmolLM2 computes every neuron: nothing to set
]


@pytest.mark.parametrize("options,words", BAD_INPUTS, ids=[" ".join(o) or "empty" for o, _ in BAD_INPUTS])
def test_bad_options_are_one_line_errors(options, words, smollm2_flash):
    r = run(["generate", smollm2_flash, "-p", "hi", "-n", "2"] + options)
    assert r.returncode in (1, 2), r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flashcli: error:"), r.stderr
    assert words in lines[0], lines[0]
    assert r.stdout == ""


def test_bad_prompts_are_one_line_errors(smollm2, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    cases = [
        (["--prompt-file", latin1], None, "not UTF-8"),
        ([], b"\xff\xfe broken", "not UTF-8"),
        (["-p", ""], None, "empty"),
        (["--prompt-file", tmp_path / "nope.txt"], None, "no such file"),
        (["-p", "word " * 9000, "-n", "10", "--ctx", "512"], None, "more than the context"),
    ]
    for options, stdin, words in cases:
        r = subprocess.run(
            FLASHCLI + ["generate", str(smollm2)] + [str(o) for o in options],
            input=stdin,
            capture_output=True,
            timeout=300,
        )
        err = r.stderr.decode()
        assert r.returncode == 1, err
        assert len(err.strip().splitlines()) == 1 and words in err, err
        assert r.stdout == b""


def test_a_budget_beyond_the_machine_is_a_warning(smollm2_flash):
    r = run(["generate", smollm2_flash, "-p", "hi", "-n", "2", "-q", "--dram-budget", "100T"])
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().startswith("flashcli: warning:") and "memory" in r.stderr
    assert r.stdout.strip()


def test_budget_as_a_share_of_the_file(smollm2_flash, tmp_path):
    stats = tmp_path / "s.json"
    r = run(["generate", smollm2_flash, "-p", "hi", "-n", "2", "-q", "--dram-budget", "90%", "--stats-json", stats])
    assert r.returncode == 0, r.stderr
    assert json.loads(stats.read_text())["dram_budget_bytes"] == int(0.9 * os.path.getsize(smollm2_flash))


def test_two_runs_at_once_on_the_same_file(smollm2, smollm2_flash):
    """Two shells, one converted file: both finish, both with the dense model's text."""
    prompt = "The three primary colors are"
    want = run(["generate", smollm2, "-p", prompt, "-n", "16", "-q"]).stdout
    args = FLASHCLI + ["generate", str(smollm2_flash), "-p", prompt, "-n", "16", "-q", "--dram-budget", "80%"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out == want
