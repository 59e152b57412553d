"""Running a timed engine process: cold page cache, quiet CPUs, optionally a memory limit, a
timeout, and the result read back from its progress file (partial when it was cut short)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .cgroup import drop_caches, run_limited

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench-out"


def cpu_idle(seconds: float = 1.0) -> float:
    def sample():
        fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(total1 - total0, 1)


def quiet_cpu(max_wait: float = 120.0) -> float:
    """Waits (up to max_wait seconds) until the CPUs are at least 90% idle; returns the idle share."""
    deadline = time.time() + max_wait
    idle = cpu_idle()
    while idle < 0.9 and time.time() < deadline:
        idle = cpu_idle()
    return idle


def engine_run(
    engine: str, model, tokens: list[int], n: int, limit: int | None = None, timeout: float = 600, **options
) -> dict:
    """One cold run of scripts.bench.engines; options become its flags (budget=..., ablation=...)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokens_file, progress = Path(tmp) / "tokens.json", Path(tmp) / "progress.jsonl"
        tokens_file.write_text(json.dumps(list(tokens)))
        cmd = [
            sys.executable,
            "-m",
            "scripts.bench.engines",
            engine,
            str(model),
            "--tokens",
            str(tokens_file),
            "-n",
            str(n),
            "--progress",
            str(progress),
        ]
        for key, value in options.items():
            if value is True:
                cmd.append("--" + key.replace("_", "-"))
            elif value not in (None, False):
                cmd += ["--" + key.replace("_", "-"), str(value)]
        idle = quiet_cpu()
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "cwd": ROOT}
        if limit is not None:
            run = run_limited(cmd, limit, timeout=timeout, **pipes)
        else:
            drop_caches()
            t0 = time.perf_counter()
            try:
                p = subprocess.run(cmd, timeout=timeout, **pipes)
                run = {"returncode": p.returncode, "timed_out": False, "stderr": p.stderr}
            except subprocess.TimeoutExpired as e:
                run = {"returncode": -9, "timed_out": True, "stderr": str(e.stderr or "")}
            run["wall_s"] = time.perf_counter() - t0
        events = [json.loads(line) for line in progress.read_text().splitlines()] if progress.exists() else []
    return _result(events, run, limit, idle)


def _result(events: list, run: dict, limit, idle: float) -> dict:
    done = [e for e in events if e["event"] == "done"]
    out = {
        "limit_bytes": limit,
        "cpu_idle_before": idle,
        "wall_s": run.get("wall_s"),
        "oom_kills": run.get("oom_kills", 0),
        "max_usage_bytes": run.get("max_usage_bytes"),
    }
    if done:
        return out | {"status": "ok"} | {k: v for k, v in done[0].items() if k not in ("event", "t")}
    # cut short: what it got through
    tokens = [e for e in events if e["event"] == "token"]
    prompt = [e for e in events if e["event"] == "prompt"]
    status = "timeout" if run.get("timed_out") else ("killed (out of memory)" if run.get("oom_kills") else "failed")
    out |= {"status": status, "tokens": len(tokens) + (1 if prompt else 0), "error": (run.get("stderr") or "")[-500:]}
    if tokens:
        out["decode_tok_s"] = len(tokens) / sum(e["seconds"] for e in tokens)
    else:
        out["decode_tok_s"] = 0.0
    if prompt:
        out["prompt_s"] = prompt[0]["seconds"]
    return out


def limited_generate(args: list[str], limit: int, timeout: float, threads: int = 2) -> tuple[dict, dict, float]:
    """One cold `flashcli generate MODEL ... -q` inside a cgroup of `limit` bytes, after the CPU
    went quiet: (cgroup_run's record, the --stats-json object or {}, CPU idle share before)."""
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "stats.json"
        cmd = [sys.executable, "-m", "flashcli.cli", "generate", *args, "-t", str(threads)]
        cmd += ["--stats-json", str(stats), "-q"]
        idle = quiet_cpu()
        run = run_limited(cmd, limit, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        return run, (json.loads(stats.read_text()) if stats.exists() else {}), idle


def failure(run: dict) -> dict:
    """status and the end of stderr of a run that did not exit 0."""
    status = "timeout" if run["timed_out"] else ("killed (out of memory)" if run["oom_kills"] else "failed")
    return {"status": status, "error": run["stderr"].decode("utf-8", "replace")[-500:]}


def median_run(runs: list[dict], key: str = "decode_tok_s") -> dict:
    """The run whose `key` is the median of the runs (all kept under 'runs')."""
    ordered = sorted(runs, key=lambda r: r.get(key) or 0.0)
    chosen = dict(ordered[len(ordered) // 2])
    chosen["runs"] = [r.get(key) for r in runs]
    chosen["median_of"] = len(runs)
    return chosen


def save(section: str, data) -> Path:
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{section}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def load(section: str):
    path = OUT / f"{section}.json"
    return json.loads(path.read_text()) if path.exists() else None


def flashcli_baseline(model) -> int:
    """flashcli's measured baseline (interpreter, libraries, tokenizer) for this model: the cgroup
    limit of a run at budget B is B + this, for flashcli and llama.cpp alike."""
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "s.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "flashcli.cli",
                "generate",
                str(model),
                "-p",
                "hi",
                "-n",
                "1",
                "-q",
                "--stats-json",
                str(stats),
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        return json.loads(stats.read_text())["baseline_rss_bytes"]


def mib(n) -> float:
    return n / 2**20


def median(values):
    return statistics.median(values) if values else None


def chat_tokens(model, text: str) -> list[int]:
    from flashcli.engine.tokenizer import Tokenizer

    tok = Tokenizer(model)
    return tok.encode(tok.apply_chat_template(text), special=True)


def text_tokens(model, n: int) -> list[int]:
    from flashcli.engine.tokenizer import Tokenizer

    return Tokenizer(model).encode((ROOT / "tests" / "data" / "heldout.txt").read_text())[:n]


def env_note() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return f"{os.cpu_count()} cores ({cpu}), {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
