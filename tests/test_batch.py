"""`generate --batch`: many prompts decoded together, each with the text it gets alone."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys

import numpy as np
import pytest

from flashcli.decoding.batch_input import parse

from conftest import TEXT

FLASHCLI = [sys.executable, "-m", "flashcli.cli"]

# per-prompt options, and the flags that give a run of its own the same ones
PROMPTS = [
    ({"prompt": "Write a Python function that reverses a string."}, []),
    ({"prompt": "What is a monad?", "max_tokens": 9}, ["-n", "9"]),
    ({"prompt": "Name three colours.", "temperature": 0.8, "seed": 7}, ["--temperature", "0.8", "--seed", "7"]),
    ({"prompt": "Once upon a time", "chat": False}, ["--no-chat"]),
    (
        {"prompt": "hi", "temperature": 1.2, "top_k": 20, "seed": 1},
        ["--temperature", "1.2", "--top-k", "20", "--seed", "1"],
    ),
    ({"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4,", "chat": False}, ["--no-chat"]),  # drafts it takes
]
N = 20


def _jsonl(tmp_path, objects) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))
    return str(path)


def _batch(model, source, *options, stdin=None, check=True):
    r = subprocess.run(
        FLASHCLI + ["generate", str(model), "--batch", source, "-n", str(N), *options],
        input=stdin,
        capture_output=True,
        text=True,
    )
    if check:
        assert r.returncode == 0, r.stderr
    return r, [json.loads(line) for line in r.stdout.splitlines()]


def _alone(model, prompt, flags, *options) -> str:
    chat = [] if "--no-chat" in flags else ["--chat"]
    flags = [f for f in flags if f != "--no-chat"]
    r = subprocess.run(
        FLASHCLI
        + ["generate", str(model), "-p", prompt, "-n", str(N), "-q", "--draft", "off", *chat, *flags, *options],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n")
    return r.stdout[:-1]


@pytest.mark.parametrize("where,draft", [("dense", "auto"), ("streamed", "auto"), ("streamed", "ngram")])
def test_each_prompt_gets_the_text_it_gets_alone(where, draft, smollm2, smollm2_flash, tmp_path):
    """Greedy and seeded sampling, per-prompt options, 3 sequences a pass over 5 prompts (so
    that prompts join as others finish): every text equals a run of its own. With --draft
    ngram the greedy ones carry drafted tokens, some taken and some not (the cache rolled back)."""
    model, options = (smollm2, []) if where == "dense" else (smollm2_flash, ["--dram-budget", "62M"])
    options += ["--draft", draft]
    objects = [dict(o, id=f"p{i}") for i, (o, _) in enumerate(PROMPTS)]
    r, out = _batch(
        model,
        _jsonl(tmp_path, objects),
        "--chat",
        "--parallel",
        "3",
        "--stats-json",
        str(tmp_path / "s.json"),
        *options,
    )
    assert [o["id"] for o in out] == [o["id"] for o in objects]  # input order
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["parallel"] == 3 and stats["generated_tokens"] == sum(o["generated_tokens"] for o in out)
    if where == "streamed":
        assert stats["bytes_read"] > 0  # something streamed: the pass read weights for 3 sequences
    if draft == "ngram":
        assert stats["drafted_tokens"] > stats["accepted_tokens"] > 0
    for (obj, flags), result in zip(PROMPTS, out):
        assert result["text"] == _alone(model, obj["prompt"], flags, *options[:-2]), obj
        assert result["finish_reason"] in ("stop", "length")
        assert result["generated_tokens"] <= obj.get("max_tokens", N)
    assert out[1]["generated_tokens"] <= 9


def test_a_bad_line_gets_an_error_and_the_others_complete(smollm2, tmp_path):
    lines = [
        json.dumps({"id": "ok1", "prompt": "hi"}),
        "{not json",
        json.dumps({"id": "empty", "prompt": "  "}),
        json.dumps({"id": "typed", "prompt": "hi", "max_tokens": "ten"}),
        json.dumps({"id": "long", "prompt": "word " * 200}),
        json.dumps({"id": "typo", "prompt": "hi", "max_token": 3}),
        json.dumps(["a list"]),
        json.dumps({"id": "ok2", "prompt": "hello", "max_tokens": 4}),
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    r, out = _batch(smollm2, str(path), "--ctx", "128", check=False)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("flashcli: error: 6 of 8 prompts failed")
    assert [o["id"] for o in out] == ["ok1", 2, "empty", "typed", "long", "typo", 7, "ok2"]
    errors = {o["id"]: o["error"] for o in out if "error" in o}
    assert "malformed JSON" in errors[2] and "empty prompt" in errors["empty"]
    assert "max_tokens" in errors["typed"] and "context" in errors["long"]
    assert "unknown field 'max_token'" in errors["typo"] and "not a JSON object" in errors[7]
    assert out[0]["generated_tokens"] > 0 and out[-1]["generated_tokens"] <= 4


def test_plain_lines_from_stdin(smollm2):
    r, out = _batch(smollm2, "-", "--chat", "-q", stdin="hi\n\nWhat is 2+2?\r\n", check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1  # -q: only the failure line
    assert [o["id"] for o in out] == [1, 2, 3]
    assert out[1]["error"] == "line 2: empty prompt"
    assert out[2]["prompt_tokens"] > 0 and "error" not in out[2]


def test_parse_edge_cases():
    lines = parse(b'{"prompt": "a"}\n\n{"prompt": "b", "id": null}\n\xff\n')
    assert [x.error is None for x in lines] == [True, False, True, False]
    assert lines[0].id == 1 and lines[2].id is None and "UTF-8" in lines[3].error
    assert parse(b"one\ntwo") == parse(b"one\ntwo\n")
    assert all("malformed JSON" in x.error for x in parse(b"{x} makes it JSON Lines\nsecond\n"))


def test_parallel_beyond_the_budget_says_what_fits(smollm2_flash, tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "hi"}] * 4)
    r, out = _batch(smollm2_flash, path, "--dram-budget", "100M", "--parallel", "64", "--ctx", "1024", check=False)
    assert r.returncode == 1 and out == []
    (line,) = r.stderr.strip().splitlines()
    assert "--parallel 64 does not fit" in line
    most = int(line.split("at most ")[1].split()[0])
    assert 1 <= most < 64
    r, out = _batch(smollm2_flash, path, "--dram-budget", "100M", "--parallel", str(most), "--ctx", "1024", "-n", "2")
    assert len(out) == 4


def test_unordered_writes_every_line_once(smollm2, tmp_path):
    objects = [{"id": i, "prompt": "Count to ten.", "max_tokens": 2 + 6 * (i % 2)} for i in range(6)]
    _, out = _batch(smollm2, _jsonl(tmp_path, objects), "--unordered", "--parallel", "2")
    assert sorted(o["id"] for o in out) == list(range(6))


def test_broken_pipe_ends_quietly(smollm2, tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "Tell me a story."}] * 6)
    shell = f"{' '.join(FLASHCLI)} generate {smollm2} --batch {path} --chat -n 8 --parallel 1 -q | head -1"
    r = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=300)
    assert len(r.stdout.splitlines()) == 1 and json.loads(r.stdout)["text"]
    assert r.stderr == ""


def test_ctrl_c_writes_what_finished(smollm2, tmp_path):
    path = _jsonl(tmp_path, [{"id": i, "prompt": "Tell me a long story."} for i in range(40)])
    proc = subprocess.Popen(
        FLASHCLI + ["generate", str(smollm2), "--batch", path, "--chat", "-n", "64", "--parallel", "2", "--unordered"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as at a terminal
    )
    first = proc.stdout.readline()  # one prompt finished
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    out = [json.loads(line) for line in (first + rest).splitlines()]
    assert 1 <= len(out) < 40 and all("text" in o for o in out)
    assert err.strip().splitlines()[-1] == "flashcli: interrupted"


def _stderr_of(model, path, terminal: bool) -> str:
    """stderr of a --batch run, through a pseudo-terminal or a pipe."""
    cmd = FLASHCLI + ["generate", str(model), "--batch", path, "-n", "4", "--parallel", "2"]
    if not terminal:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    leader, follower = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the pty closed with the process
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=300)
    os.close(leader)
    return b"".join(chunks).decode()


def test_progress_only_on_a_terminal(smollm2, tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "hi"}] * 3)
    assert "3/3 prompts" in _stderr_of(smollm2, path, terminal=True)
    piped = _stderr_of(smollm2, path, terminal=False)
    assert "prompts," not in piped.split("flashcli: 3 prompts")[0] and "\r" not in piped


def test_convert_progress_bar_only_on_a_terminal(smollm2, tmp_path):
    r = subprocess.run(
        FLASHCLI + ["convert", str(smollm2), "-o", str(tmp_path / "o.flash.gguf")], capture_output=True, text=True
    )
    assert r.returncode == 0 and "\r" not in r.stderr and "writing" not in r.stderr


@pytest.mark.slow
def test_half_the_1_5b_batched_is_each_prompt_alone(qwen):
    """The issue's model and budget, through the library: 5 prompts, 3 sequences a pass, greedy
    (drafting by n-gram lookup) and seeded, the batch's caches of 128 positions; every token
    sequence equals a run of its own (its cache of 256, as llama.cpp's)."""
    from flashcli.decoding.batch_drafting import BatchDrafts
    from flashcli.decoding.batching import BatchStats, Request, run_batch
    from flashcli.decoding.generate import generate_step
    from flashcli.decoding.loader import LoadOptions, load
    from flashcli.decoding.sampling import make_sampler
    from flashcli.engine.tokenizer import Tokenizer

    tok = Tokenizer(qwen)
    prompts = ["Write a Python function that reverses a string.", "What is a closure?", "Explain HTTP caching."]
    prompts += ["Sort a list in Go.", "Repeat this sentence twice: the quick brown fox jumps over the lazy dog."]
    budget = os.path.getsize(qwen) // 2
    tokens = [tok.encode(tok.apply_chat_template(p), special=True) for p in prompts]

    def sampler(i):
        return make_sampler(0.0 if i % 2 == 0 else 0.9, seed=i)

    batched = load(qwen, LoadOptions(dram_budget=budget, n_ctx=128, sequences=3)).model  # caches of 128
    requests = [Request(i, i, t, 16, sampler(i)) for i, t in enumerate(tokens)]
    stats = BatchStats()
    results = {r.index: r for r in run_batch(batched, tok, requests, 3, stats, drafts=BatchDrafts(4))}
    assert stats.drafted > stats.accepted > 0
    assert batched.stream is not None and batched.bytes_read > 0 and batched.states[0].n_ctx == 128
    batched.close()
    alone = load(qwen, LoadOptions(dram_budget=budget, n_ctx=256)).model
    for i, t in enumerate(tokens):
        ids = []
        for token in generate_step(alone, t, sampler(i), 16):
            if tok.is_end_of_generation(token):
                break
            ids.append(token)
        assert results[i].text == tok.decode(np.array(ids)), prompts[i]
    alone.close()


def _batch_at_budget(path, budget, tmp_path, runner=None):
    """A --batch run of 6 prompts, 4 sequences a pass, contexts of 256: (run, stats)."""
    objects = [{"id": i, "prompt": TEXT[: 40 + 60 * i]} for i in range(6)]
    stats = tmp_path / "stats.json"
    cmd = FLASHCLI + ["generate", str(path), "--batch", _jsonl(tmp_path, objects), "--parallel", "4", "--ctx", "256"]
    cmd += ["-n", "8", "-q", "--dram-budget", str(budget), "--stats-json", str(stats)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    if runner:
        run = runner(cmd, **pipes)
        assert run["returncode"] == 0, run["stderr"]
    else:
        run = subprocess.run(cmd, timeout=300, **pipes)
        assert run.returncode == 0, run.stderr
    return run, json.loads(stats.read_text())


@pytest.mark.parametrize("model", ["smollm2_flash", "relu_flash"])
def test_peak_rss_of_a_batch_stays_within_the_budget(model, request, tmp_path):
    """4 KV caches, a pass of 4 tokens beside prompt batches, at the smallest budget that holds
    them (rows: streamed matrices; bundles: neuron caches): peak RSS beyond the baseline."""
    from test_budget import budget_of

    path = request.getfixturevalue(model)
    budget = budget_of(path, "tight", sequences=4)
    _, s = _batch_at_budget(path, budget, tmp_path)
    assert s["parallel"] == 4 and s["dram_budget_bytes"] == budget and s["bytes_read"] > 0
    assert s["peak_rss_bytes"] - s["baseline_rss_bytes"] <= budget, s


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.isdir("/sys/fs/cgroup/memory"),
    reason="needs root and cgroup v1 to set a memory limit",
)
def test_a_batch_runs_under_a_cgroup_limit_of_its_budget(smollm2_flash, tmp_path):
    """cgroup limit = the budget + the baseline the same run measured without a limit: the run
    finishes, no OOM kill."""
    from test_budget import budget_of

    from bench.cgroup import run_limited

    budget = budget_of(smollm2_flash, "tight", sequences=4)
    _, free = _batch_at_budget(smollm2_flash, budget, tmp_path, lambda cmd, **kw: run_limited(cmd, 64 << 30, **kw))
    limit = budget + free["baseline_rss_bytes"]
    run, s = _batch_at_budget(smollm2_flash, budget, tmp_path, lambda cmd, **kw: run_limited(cmd, limit, **kw))
    assert run["oom_kills"] == 0 and s["generated_tokens"] > 0
    assert run["max_usage_bytes"] <= limit


def _decode_passes(model, prompts, feed: np.ndarray, batched: bool) -> list[np.ndarray]:
    """Logits [sequences, vocab] of decode passes after each prompt's prefill, pass t feeding
    token feed[t, i] to sequence i."""
    from flashcli.engine.decode_state import Part

    model.batched_products = batched
    for s in model.states:
        s.n_past = 0
    model.eval_parts([Part(s, np.array(p)) for s, p in zip(model.states, prompts)])
    out = []
    for tokens in feed:
        z = model.eval_parts([Part(s, np.array([t])) for s, t in zip(model.states, tokens)])
        out.append(np.stack([zi[0] for zi in z]))
    return out


@pytest.mark.parametrize("where", ["dense", "streamed"])
def test_batched_products_give_each_sequence_its_own_logits(where, smollm2, smollm2_flash):
    """--batched-products: 9 sequences a pass (past the 8 columns where plain K-quants' batched
    kernels start) multiplied as one batch. Each sequence's logits are its own (close to the
    exact mode's, the columns not mixed up: a token from another sequence would be far off),
    and the exact mode still gives every sequence the logits of a run of its own (caches of 64
    positions against its 256), bit for bit."""
    from flashcli.decoding.loader import LoadOptions, load

    budget = 64 << 20 if where == "streamed" else None
    path = smollm2_flash if where == "streamed" else smollm2
    loaded = load(path, LoadOptions(dram_budget=budget, n_ctx=64, sequences=9))  # caches of 64 positions
    prompts = [[1, 504 + 37 * i, 2000 + i, 77] for i in range(9)]
    feed = np.arange(9)[None, :] * 11 + np.array([[300], [4000], [150]])  # the same tokens in both modes
    exact = _decode_passes(loaded.model, prompts, feed, batched=False)
    batched = _decode_passes(loaded.model, prompts, feed, batched=True)
    loaded.close()
    loaded = load(path, LoadOptions(dram_budget=budget, n_ctx=256))
    alone = loaded.model
    for i, p in enumerate(prompts):
        alone.reset()
        alone.eval(p)
        for step in range(3):
            assert np.array_equal(alone.eval([int(feed[step, i])]), exact[step][i]), (i, step)
    loaded.close()
    for e, b in zip(exact, batched):
        assert np.abs(e - b).max() < 0.05 * np.abs(e).max()
        assert (e.argmax(1) == b.argmax(1)).mean() >= 0.8
        others = np.roll(e, 1, axis=0)  # each row against another sequence's logits
        assert np.abs(others - b).max() > 10 * np.abs(e - b).max()


def test_batched_products_through_the_cli(smollm2, tmp_path):
    """Every prompt gets an answer, and the stats say which mode ran; the option alone is refused."""
    objects = [{"id": i, "prompt": o["prompt"]} for i, (o, _) in enumerate(PROMPTS)]
    stats = tmp_path / "s.json"
    _, out = _batch(smollm2, _jsonl(tmp_path, objects), "--chat", "--batched-products", "--stats-json", str(stats))
    assert [o["id"] for o in out] == list(range(len(PROMPTS))) and all(o["generated_tokens"] > 0 for o in out)
    assert json.loads(stats.read_text())["batched_products"] is True
    r = subprocess.run(
        FLASHCLI + ["generate", str(smollm2), "-p", "hi", "--batched-products"], capture_output=True, text=True
    )
    assert r.returncode != 0 and "go with --batch" in r.stderr.strip().splitlines()[-1]
