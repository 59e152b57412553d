"""The paper's scale, scaled down (issue 34; scripts/bench/scale.py measures 8B and 14B models):
a 1B shape (TinyLlama-1.1B's, random weights, Q4_K) through `flashcli convert` in memory far
below the file's size, then `flashcli generate` at a quarter of the file within that budget,
its greedy tokens those of llama.cpp on the source file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from gguf import GGMLQuantizationType as Q
from test_convert_memory import peak_convert_kib

from conftest import llama_cpp, llama_cpp_greedy
from synthetic import LLAMA_1B, write_llama_gguf

PROMPT = "hello world once upon a time"
N = 8


@pytest.mark.slow
def test_a_1b_converts_in_little_memory_and_runs_at_a_quarter_as_llama_cpp(tmp_path):
    from flashcli.engine.tokenizer import Tokenizer

    source = write_llama_gguf(tmp_path / "l1b.gguf", LLAMA_1B, int(Q.Q4_K), seed=3)
    size = os.path.getsize(source)
    flash = tmp_path / "l1b.flash.gguf"
    # streamed: a few chunks in flight (read ahead, repacked, queued for the writer: about 150 MiB
    # over the interpreter here, whatever the file's size), never a share of the file. Not a third
    # of it: measured at 193-208 MiB against 197, that bound failed a CI run on allocator slack.
    assert peak_convert_kib(source, flash) * 1024 < size / 2

    budget = size // 4
    run = subprocess.run(
        [sys.executable, "-m", "flashcli.cli", "generate", str(flash), "-p", PROMPT, "-n", str(N)]
        + ["--dram-budget", str(budget), "--draft", "off", "--json", "-t", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    ids = [r["token"] for r in lines if "token" in r]
    done = lines[-1]
    assert done["bytes_read_per_token"] > 0.5 * size  # three quarters of it are not resident
    assert done["peak_rss_bytes"] <= budget + done["baseline_rss_bytes"] + (16 << 20)

    llm = llama_cpp(source, n_ctx=64)
    want = llama_cpp_greedy(llm, Tokenizer(source).encode(PROMPT), N)
    assert ids == want[: len(ids)] and (len(ids) == N or done["finish_reason"] == "stop")
