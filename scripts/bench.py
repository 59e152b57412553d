"""The benchmark suite: measures flashcli against the paper's tables and against llama.cpp, and
writes BENCHMARKS.md (tables) and docs/bench/*.png (charts).

    .venv/bin/python scripts/bench.py            # everything, ~20 minutes (as root)
    .venv/bin/python scripts/bench.py --quick    # fewer tokens and grid points, ~5 minutes
    .venv/bin/python scripts/bench.py --section ablation --quick   # one section

Sections (each table in BENCHMARKS.md names the command that reproduces it):
  io        the flash cost model of this disk: read throughput against chunk size and reader
            threads, O_DIRECT and mmap (the paper's Figure 2b)
  ablation  naive, hybrid, predictor, + windowing, + bundling, all (the paper's Tables 2-3)
  llama     tokens/s against llama.cpp under the same memory limit, and a sweep over limits

Every measured run starts from a cold page cache (drop_caches) inside a memory cgroup
(scripts/cgroup_run.py), so this needs root and cgroup v1. Rows that need the ReLU fixture
(/work/shared/models) are skipped with a message when it is absent. Converted files are cached
in models/ and rebuilt when older than their source (or with --reconvert). Raw results
go to bench-out/ (scratch); charts need matplotlib (`pip install -e .[bench]`) and are skipped
without it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
MODELS = ROOT / "models"
OUT_DIR = ROOT / "bench-out"
CHART_DIR = ROOT / "docs" / "bench"
SHARED_MODELS = Path("/work/shared/models")

PY = sys.executable
FLASHCLI = str(Path(sys.executable).parent / "flashcli")
KiB, MiB = 1 << 10, 1 << 20
UNLIMITED = 1 << 40  # "1T": a cgroup limit far above this machine's RAM (cold cache, no limit)
PROMPT = "The three primary colors are"
THREADS = 2  # compute threads for both engines: the cores of the development machine
SECTIONS = ("io", "ablation", "llama")
ABLATIONS = ("naive", "hybrid", "predictor", "window", "bundling", "all")
ABLATION_TITLES = {"naive": "naive (whole FFN read per token)", "hybrid": "hybrid (half resident)",
                   "predictor": "+ predictor (window 1)", "window": "+ windowing (4 tokens, unbundled)",
                   "bundling": "+ bundling (window 4)", "all": "all (+ LRU cache to the budget)"}

# llama.cpp on SmolLM2 Q4_1, 2 threads, cold cache, cgroup on the whole process, measured before
# flashcli existed: the cliff flashcli exists to remove. MiB -> tokens/s; None = unconstrained.
EARLIER_LLAMA_CPP = {None: 62.0, 155: 45.0, 136: 6.7, 120: 2.6}


@dataclass(frozen=True)
class Settings:
    quick: bool
    tokens: int  # generated per run
    repeats: int  # runs per measured point; the median run is reported
    io_chunks: tuple  # bytes
    io_threads: tuple
    io_bytes_per_point: int
    io_seconds_per_point: float  # a point stops at whichever comes first
    io_file_bytes: int
    limits_mib: tuple  # memory limits of the llama.cpp sweep
    heavy_tokens: int  # the 1B model: fewer tokens, runs and rows, to keep the suite's time
    heavy_repeats: int
    heavy_ablations: tuple
    reconvert: bool = False  # convert the models again even when the cached files look current
    models: tuple = ()  # ablation rows for these model keys only (empty: all)


def make_settings(args) -> Settings:
    common = {"reconvert": args.reconvert, "models": tuple(args.models.split(",")) if args.models else ()}
    if args.quick:
        return Settings(quick=True, tokens=args.tokens or 8, repeats=args.repeats or 1,
                        io_chunks=(4 * KiB, 32 * KiB, 256 * KiB, MiB), io_threads=(1, 8, 32),
                        io_bytes_per_point=64 * MiB, io_seconds_per_point=1.5, io_file_bytes=512 * MiB,
                        limits_mib=(120, 155, 200), heavy_tokens=4, heavy_repeats=1, heavy_ablations=("naive", "all"),
                        **common)
    return Settings(quick=False, tokens=args.tokens or 32, repeats=args.repeats or 3,
                    io_chunks=tuple(KiB << k for k in range(2, 11)), io_threads=(1, 2, 4, 8, 16, 32),
                    io_bytes_per_point=256 * MiB, io_seconds_per_point=4.0, io_file_bytes=1 << 30,
                    limits_mib=(120, 136, 144, 155, 170, 200), heavy_tokens=16, heavy_repeats=1,
                    heavy_ablations=ABLATIONS, **common)


@dataclass(frozen=True)
class BenchModel:
    key: str
    title: str
    source: Path  # the original .gguf: budgets are fractions of its size
    budget_fraction: float
    calibration_tokens: int | None  # None: the converter's default
    note: str
    heavy: bool = False  # slow to run: Settings.heavy_* apply

    @property
    def flash(self) -> Path:
        return MODELS / (self.source.name.removesuffix(".gguf") + ".flash.gguf")


def bench_models() -> list[BenchModel]:
    return [
        BenchModel("relu", "SmolLM2-135M ReLU fixture (Q8_0 FFN)", SHARED_MODELS / "smollm2-135m-relu.gguf", 0.7, None,
                   "real ReLU sparsity (86.7% of neurons inactive per token)"),
        BenchModel("smollm2", "SmolLM2-135M-Instruct Q4_1 (SwiGLU)", MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf", 0.7,
                   None, "dense SwiGLU activations: the predictor keeps the neurons that matter most"),
        BenchModel("synth1b", "synthetic llama 1.1B Q4_0", MODELS / "synthetic-1b-q4_0.gguf", 0.5, 512,
                   "random weights: no real activation pattern; shows I/O volume and budgets at 1B scale", heavy=True),
    ]


# --- running things cold -----------------------------------------------------------------------

def cold_run(cmd: list[str], limit: int = UNLIMITED) -> dict:
    """Runs cmd in a memory cgroup of `limit` bytes after dropping the page cache, on a quiet
    machine; adds `foreign_cpu`: the share of the CPUs that other processes used meanwhile."""
    from cgroup_run import run_limited

    wait_for_quiet_cpu()
    busy0, children0 = cpu_busy_seconds(), children_cpu_seconds()
    res = run_limited(cmd, limit, drop=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ours = children_cpu_seconds() - children0
    res["foreign_cpu"] = max(0.0, cpu_busy_seconds() - busy0 - ours) / (res["wall_s"] * os.cpu_count())
    return res


# Two cores: a test suite running beside a measurement slows ggml's spinning thread pool many
# times over, so every measurement waits for the machine to be quiet and records what it shared.
QUIET_CPU = 0.15  # share of all CPUs that other processes may use before we wait
QUIET_WAIT_S = 60


def cpu_busy_seconds() -> float:
    """CPU time (all CPUs, seconds) spent not idle since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def children_cpu_seconds() -> float:
    """CPU time of this process and its finished children (drop_caches runs in this one)."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def wait_for_quiet_cpu(sample_s: float = 0.3) -> None:
    t0 = time.monotonic()
    while True:
        b0 = cpu_busy_seconds()
        time.sleep(sample_s)
        busy = (cpu_busy_seconds() - b0) / (sample_s * os.cpu_count())
        if busy <= QUIET_CPU:
            return
        if time.monotonic() - t0 > QUIET_WAIT_S:
            log(f"the machine is still busy ({busy:.0%} of the CPUs): measuring anyway")
            return
        if time.monotonic() - t0 < sample_s * 2:
            log(f"other processes use {busy:.0%} of the CPUs: waiting for quiet")
        time.sleep(2.0)


def shown(cmd: list[str], limit: int = UNLIMITED) -> str:
    """The command line a reader can paste to reproduce one run (from the repository root)."""
    words = [w.replace(str(ROOT) + "/", "") for w in cmd]
    words = [".venv/bin/flashcli" if w == FLASHCLI else ".venv/bin/python" if w == PY else w for w in words]
    limit_text = "1T" if limit == UNLIMITED else f"{limit // MiB}M"
    return f".venv/bin/python scripts/cgroup_run.py --limit {limit_text} -- {shlex.join(words)}"


def last_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def flashcli_generate_cmd(model: Path, budget: int | None, ablation: str | None, tokens: int,
                          stats_json: Path | None = None) -> list[str]:
    cmd = [FLASHCLI, "generate", str(model)]
    if budget is not None:
        cmd += ["--dram-budget", f"{budget // MiB}M"]
    if ablation:
        cmd += ["--ablation", ablation]
    cmd += ["-n", str(tokens), "-p", PROMPT, "-q", "--threads", str(THREADS)]
    if stats_json:
        cmd += ["--stats-json", str(stats_json)]
    return cmd


def run_flashcli(model: Path, budget: int | None, ablation: str | None, tokens: int, limit: int = UNLIMITED) -> dict:
    """One cold `flashcli generate`; its stats JSON plus the cgroup's view, or the error."""
    stats_path = OUT_DIR / "stats.json"
    stats_path.unlink(missing_ok=True)
    cmd = flashcli_generate_cmd(model, budget, ablation, tokens, stats_path)
    res = cold_run(cmd, limit)
    out = {"command": shown(flashcli_generate_cmd(model, budget, ablation, tokens, Path("stats.json")), limit),
           "returncode": res["returncode"], "limit_bytes": limit, "cgroup_peak_bytes": res["max_usage_bytes"],
           "oom_kills": res["oom_kills"], "wall_s": res["wall_s"], "foreign_cpu": res["foreign_cpu"]}
    if res["returncode"] != 0 or not stats_path.exists():
        why = "killed by the OOM killer" if res["oom_kills"] else last_line(res["stderr"]) or f"exit {res['returncode']}"
        return out | {"ok": False, "error": why}
    stats = json.loads(stats_path.read_text())
    return out | stats | {"ok": True, "output": res["stdout"].strip()}


def llama_worker_cmd(model: Path, tokens: int) -> list[str]:
    return [PY, str(SCRIPTS / "bench.py"), "_llama_worker", str(model), "-n", str(tokens), "-p", PROMPT,
            "--threads", str(THREADS)]


def run_llama(model: Path, tokens: int, limit: int = UNLIMITED) -> dict:
    """One cold llama.cpp run (the worker below, in its own process and cgroup)."""
    res = cold_run(llama_worker_cmd(model, tokens), limit)
    out = {"command": shown(llama_worker_cmd(model, tokens), limit), "returncode": res["returncode"],
           "limit_bytes": limit, "cgroup_peak_bytes": res["max_usage_bytes"], "oom_kills": res["oom_kills"],
           "wall_s": res["wall_s"], "foreign_cpu": res["foreign_cpu"]}
    if res["returncode"] != 0:
        why = "killed by the OOM killer" if res["oom_kills"] else last_line(res["stderr"]) or f"exit {res['returncode']}"
        return out | {"ok": False, "error": why}
    return out | json.loads(last_line(res["stdout"])) | {"ok": True}


def median_run(runs: list[dict], key) -> dict:
    """The run with the median `key` (a real run, so its fields stay consistent); the first
    failure if any run failed. `repeats` records every run's value."""
    failed = [r for r in runs if not r["ok"]]
    if failed:
        return failed[0] | {"repeats": len(runs)}
    ordered = sorted(runs, key=key)
    return ordered[(len(ordered) - 1) // 2] | {"repeats": len(runs), "all_values": [key(r) for r in runs]}


def repeat(n: int, fn, key) -> dict:
    return median_run([measure(fn) for _ in range(n)], key)


FOREIGN_MAX = 0.10  # a run that shared more of the CPUs than this with other processes is retried
MAX_ATTEMPTS = 3


def measure(fn) -> dict:
    """fn() (a cold run); again, up to MAX_ATTEMPTS times, while other processes took more than
    FOREIGN_MAX of the CPUs during it. Returns the least disturbed attempt."""
    best = None
    for _ in range(MAX_ATTEMPTS):
        run = fn()
        if best is None or run["foreign_cpu"] < best["foreign_cpu"]:
            best = run
        if run["foreign_cpu"] <= FOREIGN_MAX:
            break
        log(f"  other processes took {run['foreign_cpu']:.0%} of the CPUs during that run: again")
    return best


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# --- converted files ---------------------------------------------------------------------------

def ensure_converted(model: BenchModel, reconvert: bool = False) -> Path:
    """The model's .flash.gguf in models/, converted again when older than its source (or when
    asked: a converter change does not show in the file's date)."""
    if not reconvert and model.flash.exists() and model.flash.stat().st_mtime > model.source.stat().st_mtime:
        return model.flash
    cmd = [FLASHCLI, "convert", str(model.source), "-o", str(model.flash), "--force", "-q"]
    if model.calibration_tokens:
        cmd += ["--calibration-tokens", str(model.calibration_tokens)]
    log(f"converting {model.source.name} -> {model.flash.name}")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    log(f"  converted in {time.perf_counter() - t0:.0f} s")
    return model.flash


def ensure_synthetic_source(model: BenchModel) -> None:
    if not model.source.exists():
        from flashcli.synthetic import LLAMA_1B, write_llama_gguf

        log(f"writing {model.source} (once)")
        write_llama_gguf(model.source, LLAMA_1B, weight_type=2, seed=0, embd_type=2)


def minimum_budget(flash: Path) -> int:
    """The smallest --dram-budget flashcli accepts for this file, rounded up to a whole MiB
    (parsed from its error message for a budget that is far too small)."""
    res = subprocess.run(flashcli_generate_cmd(flash, MiB, None, 1), capture_output=True, text=True)
    m = re.search(r"minimum of ([0-9.]+) (KiB|MiB|GiB)", res.stderr)
    if not m:
        raise RuntimeError(f"cannot find the minimum budget of {flash} in: {last_line(res.stderr)}")
    scale = {"KiB": KiB, "MiB": MiB, "GiB": 1 << 30}[m.group(2)]
    # the message has one decimal: add half a step before rounding up, to be on the safe side
    return math.ceil((float(m.group(1)) + 0.05) * scale / MiB) * MiB


def budget_plan(flash: Path, budget: int) -> list[str]:
    """flashcli's own account of how it splits `budget` (its -v lines)."""
    res = subprocess.run(flashcli_generate_cmd(flash, budget, None, 1) + ["-v"], capture_output=True, text=True)
    lines = [line.removeprefix("flashcli: ") for line in res.stderr.splitlines()]
    return [line for line in lines if line.startswith(("budget ", "  "))]


# --- section 1: the flash cost model of this disk ----------------------------------------------

def write_scratch_file(path: Path, size: int) -> None:
    block = os.urandom(16 * MiB)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)  # repeated content is fine: nothing here compresses or deduplicates
        f.flush()
        os.fsync(f.fileno())


def read_throughput(path: Path, backend: str, chunk: int, threads: int, settings: Settings, seed: int) -> dict:
    """GB/s reading distinct random chunks of `path`, cold. Reads go in rounds of at least
    16 MiB (and one chunk per thread); the median round is reported."""
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor

    from cgroup_run import drop_caches
    from flashcli.io_backends import DirectReader, MmapReader

    count = path.stat().st_size // chunk
    per_round = max(threads, 16 * MiB // chunk)
    order = np.random.default_rng(seed).permutation(count)  # no chunk is read twice
    if backend == "direct":
        # max_gap_bytes=-1: never merge neighbouring chunks, so that every read is one chunk
        readers = [DirectReader(path, 0, chunk, count, threads=threads, max_gap_bytes=-1)]
        pool = None
    else:  # one mapping per thread: MmapReader reads on the calling thread
        readers = [MmapReader(path, 0, chunk, count, drop_cache=True) for _ in range(threads)]
        pool = ThreadPoolExecutor(threads)
    out = np.empty((per_round, chunk), np.uint8)
    wait_for_quiet_cpu()
    drop_caches()
    rounds, done, start, t_begin = [], 0, 0, time.perf_counter()
    try:
        while (done < settings.io_bytes_per_point and time.perf_counter() - t_begin < settings.io_seconds_per_point
               and start + per_round <= count):
            ids = np.sort(order[start : start + per_round])
            start += per_round
            t0 = time.perf_counter()
            if pool is None:
                readers[0].read(ids, out)
            else:
                parts = np.array_split(np.arange(per_round), threads)
                futures = [pool.submit(r.read, ids[p], out[p[0] : p[-1] + 1]) for r, p in zip(readers, parts)]
                for f in futures:
                    f.result()
            rounds.append(per_round * chunk / (time.perf_counter() - t0))
            done += per_round * chunk
    finally:
        for r in readers:
            r.close()
        if pool is not None:
            pool.shutdown()
    return {"backend": backend, "chunk": chunk, "threads": threads, "gbps": statistics.median(rounds) / 1e9,
            "mean_gbps": done / sum(per_round * chunk / x for x in rounds) / 1e9, "bytes": done, "rounds": len(rounds)}


def io_section(settings: Settings) -> dict:
    OUT_DIR.mkdir(exist_ok=True)
    path = OUT_DIR / "scratch-io.bin"
    log(f"io: writing a {settings.io_file_bytes / 2**30:.1f} GiB scratch file")
    write_scratch_file(path, settings.io_file_bytes)
    rows = []
    try:
        for backend in ("direct", "mmap"):
            for chunk in settings.io_chunks:
                for threads in settings.io_threads:
                    row = read_throughput(path, backend, chunk, threads, settings, seed=len(rows))
                    log(f"io: {backend:6s} chunk {chunk // KiB:5d} KiB threads {threads:2d}: {row['gbps']:.3f} GB/s")
                    rows.append(row)
    finally:
        path.unlink(missing_ok=True)
    return {"rows": rows, "file_bytes": settings.io_file_bytes, "bytes_per_point": settings.io_bytes_per_point,
            "seconds_per_point": settings.io_seconds_per_point}


def disk_throughput_at(io: dict, read_size: float, backend: str = "direct") -> tuple[float, float]:
    """The best measured throughput (over thread counts) at `read_size` bytes per read, log-linearly
    interpolated between the measured chunk sizes (clamped to the ends); and the thread count."""
    best = {}
    for r in io["rows"]:
        if r["backend"] == backend and r["gbps"] > best.get(r["chunk"], (0, 0))[0]:
            best[r["chunk"]] = (r["gbps"], r["threads"])
    chunks = sorted(best)
    x = min(max(read_size, chunks[0]), chunks[-1])
    for lo, hi in zip(chunks, chunks[1:]):
        if lo <= x <= hi:
            w = math.log(x / lo) / math.log(hi / lo)
            return best[lo][0] * (1 - w) + best[hi][0] * w, best[lo if w < 0.5 else hi][1]
    return best[chunks[-1]]


# --- section 2: the ablation -------------------------------------------------------------------

def per_token(stats: dict) -> dict:
    """ms per token over every token that went through the model (prompt and generated: the
    telemetry's io/mem/compute cover the same tokens); 'other' is attention, head and Python."""
    n = stats["ffn_tokens"]
    total = 1e3 * stats["total_s"] / n
    other = total - stats["io_ms"] - stats["mem_ms"] - stats["compute_ms"]
    return {"io": stats["io_ms"], "mem": stats["mem_ms"], "compute": stats["compute_ms"], "other": other, "total": total}


def read_sizes_worker(argv: list[str]) -> None:
    """`bench.py _read_sizes FLASH BUDGET ABLATION N`: runs one generation through the library
    (warm, not timed) and prints the mean size of the reads flashcli issued. The CLI's stats
    have bytes read but not the number of reads."""
    sys.path.insert(0, str(ROOT))
    from flashcli.engine import ABLATIONS as OPTIONS, load
    from flashcli.generate import stream_generate
    from flashcli.sampling import make_sampler
    from flashcli.tokenizer import Tokenizer

    path, budget, ablation, n = argv[0], int(argv[1]), argv[2], int(argv[3])
    tokenizer = Tokenizer(path)
    n_ctx = len(tokenizer.encode(PROMPT)) + n + 64  # as `flashcli generate` sizes it: the same plan
    engine = load(path, budget, THREADS, n_ctx, OPTIONS[ablation])
    for _ in stream_generate(engine, tokenizer, PROMPT, make_sampler(0.0, 0, 1.0, None), n):
        pass
    readers = [r for rs in engine.ffn.readers for r in (rs if isinstance(rs, list) else [rs])]
    nbytes, reads = sum(r.bytes_read for r in readers), sum(r.n_reads for r in readers)
    print(json.dumps({"bytes_read": nbytes, "reads": reads, "mean_read_bytes": nbytes / max(reads, 1)}))


def mean_read_size(flash: Path, budget: int, ablation: str, tokens: int) -> float | None:
    res = subprocess.run([PY, str(SCRIPTS / "bench.py"), "_read_sizes", str(flash), str(budget), ablation, str(tokens)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        log(f"  read sizes unavailable: {last_line(res.stderr)}")
        return None
    return json.loads(last_line(res.stdout))["mean_read_bytes"]


def ablation_for_model(model: BenchModel, settings: Settings) -> dict:
    if model.key == "synth1b":
        ensure_synthetic_source(model)
    flash = ensure_converted(model, settings.reconvert)
    source_bytes = model.source.stat().st_size
    budget = int(model.budget_fraction * source_bytes) // MiB * MiB
    minimum = minimum_budget(flash)
    result = {"key": model.key, "title": model.title, "note": model.note, "source": str(model.source),
              "source_bytes": source_bytes, "flash_bytes": flash.stat().st_size,
              "budget_fraction": model.budget_fraction, "minimum_budget": minimum, "rows": []}
    if budget < minimum:
        log(f"ablation {model.key}: {budget // MiB} MiB is below the minimum {minimum / MiB:.0f} MiB: infeasible")
        result["infeasible_budget"] = budget
        budget = minimum
    result["budget"] = budget
    result["plan"] = budget_plan(flash, budget)
    tokens, repeats = (settings.heavy_tokens, settings.heavy_repeats) if model.heavy else (settings.tokens, settings.repeats)
    ablations = settings.heavy_ablations if model.heavy else ABLATIONS
    result |= {"tokens": tokens, "repeats": repeats, "skipped_ablations": [a for a in ABLATIONS if a not in ablations]}
    for ablation in ablations:
        row = repeat(repeats, lambda: run_flashcli(flash, budget, ablation, tokens),
                     key=lambda r: per_token(r)["total"] if r["ok"] else 0)
        row["ablation"] = ablation
        if row["ok"]:
            row["per_token"] = per_token(row)
            log(f"ablation {model.key} {ablation:9s}: {row['per_token']['total']:7.1f} ms/token, "
                f"{row['bytes_read_per_token'] / 1e6:6.2f} MB read/token, {row['tokens_per_s']:.1f} tok/s")
        else:
            log(f"ablation {model.key} {ablation:9s}: failed: {row['error']}")
        result["rows"].append(row)
    if model.key == "relu":  # the I/O target is judged on this model: how large are our reads?
        for row in result["rows"]:
            if row["ok"]:
                row["mean_read_bytes"] = mean_read_size(flash, budget, row["ablation"], settings.tokens)
    return result


def ablation_section(settings: Settings) -> dict:
    out = {"models": [], "skipped": []}
    for model in bench_models():
        if settings.models and model.key not in settings.models:
            continue
        if not model.source.exists() and model.key != "synth1b":
            msg = f"{model.title}: {model.source} is absent, rows skipped"
            log(f"ablation: {msg}")
            out["skipped"].append(msg)
            continue
        out["models"].append(ablation_for_model(model, settings))
    return out


# --- section 3: against llama.cpp --------------------------------------------------------------

def llama_worker(argv: list[str]) -> None:
    """`bench.py _llama_worker MODEL -n N -p PROMPT --threads T`: llama.cpp (llama-cpp-python)
    with default settings (mmap), the prompt evaluated, then N tokens decoded greedily, each
    `eval` timed. Prints one JSON line. Imports only llama_cpp and numpy: its memory is
    llama.cpp's, not ours."""
    ap = argparse.ArgumentParser(prog="bench.py _llama_worker")
    ap.add_argument("model")
    ap.add_argument("-n", type=int, required=True)
    ap.add_argument("-p", required=True)
    ap.add_argument("--threads", type=int, default=THREADS)
    args = ap.parse_args(argv)

    import resource

    import numpy as np
    from llama_cpp import Llama

    t0 = time.perf_counter()
    with quiet_stderr():
        llm = Llama(args.model, n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    load_s = time.perf_counter() - t0
    baseline_rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    n_vocab = llm.n_vocab()

    def greedy() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    prompt = llm.tokenize(args.p.encode("utf-8"), add_bos=True, special=False)  # BOS if the model wants one
    t0 = time.perf_counter()
    llm.eval(prompt)
    token = greedy()
    prompt_s = time.perf_counter() - t0
    tokens, times = [token], []
    for _ in range(args.n - 1):  # the first token came from the prompt's logits
        t = time.perf_counter()
        llm.eval([token])
        token = greedy()
        times.append(time.perf_counter() - t)
        tokens.append(token)
    print(json.dumps({
        "prompt_tokens": len(prompt), "generated_tokens": len(tokens), "load_s": load_s, "prompt_s": prompt_s,
        "tokens_per_s": len(times) / sum(times) if times else 0.0,
        "median_token_ms": 1e3 * statistics.median(times) if times else 0.0,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_load_bytes": baseline_rss,
        "text": llm.detokenize(tokens).decode("utf-8", errors="replace"),
    }))


class quiet_stderr:
    """llama.cpp logs to fd 2 while loading, whatever `verbose` says."""

    def __enter__(self):
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


def tokens_per_s(run: dict) -> float:
    return run["tokens_per_s"] if run["ok"] else 0.0


def llama_section(settings: Settings) -> dict:
    smollm2 = next(m for m in bench_models() if m.key == "smollm2")
    flash = ensure_converted(smollm2, settings.reconvert)
    n, reps = settings.tokens, settings.repeats
    budget = minimum_budget(flash)

    def both(limit: int, flash_budget: int | None) -> dict:
        ours = repeat(reps, lambda: run_flashcli(flash, flash_budget, None, n, limit), key=tokens_per_s)
        theirs = repeat(reps, lambda: run_llama(smollm2.source, n, limit), key=tokens_per_s)
        return {"limit_bytes": limit, "flash_budget": flash_budget, "flashcli": ours, "llama_cpp": theirs}

    log("llama: unconstrained")
    unconstrained = both(UNLIMITED, None)
    # flashcli first, at its smallest budget, to learn its baseline; the limit is budget + baseline
    log(f"llama: flashcli at its minimum budget {budget // MiB} MiB, no limit (for its baseline RSS)")
    probe = repeat(reps, lambda: run_flashcli(flash, budget, None, n), key=tokens_per_s)
    baseline = probe["baseline_rss_bytes"] if probe["ok"] else 64 * MiB
    limit = math.ceil((budget + baseline) / MiB) * MiB
    log(f"llama: both under a {limit // MiB} MiB limit")
    headline = both(limit, budget)
    headline["flashcli_unlimited"] = probe

    sweep = []
    for limit_mib in settings.limits_mib:
        limit = limit_mib * MiB
        flash_budget = (limit - baseline) // MiB * MiB
        log(f"llama: sweep at {limit_mib} MiB (flashcli budget {flash_budget // MiB} MiB)")
        if flash_budget < budget:
            ours = {"ok": False, "error": f"budget {flash_budget // MiB} MiB below the minimum {budget // MiB} MiB",
                    "infeasible": True}
            theirs = repeat(reps, lambda: run_llama(smollm2.source, n, limit), key=tokens_per_s)
            sweep.append({"limit_bytes": limit, "flash_budget": flash_budget, "flashcli": ours, "llama_cpp": theirs})
        else:
            sweep.append(both(limit, flash_budget))
    return {"model": str(smollm2.source), "flash": str(flash), "minimum_budget": budget, "baseline_rss_bytes": baseline,
            "unconstrained": unconstrained, "headline": headline, "sweep": sweep}


# --- targets -----------------------------------------------------------------------------------

def find_row(ablation: dict | None, model_key: str, name: str) -> dict | None:
    for model in (ablation or {}).get("models", []):
        if model["key"] == model_key:
            return next((r for r in model["rows"] if r["ablation"] == name and r["ok"]), None)
    return None


def io_check(row: dict, io: dict) -> dict | None:
    """What the disk allows for this row's bytes at this row's read size, against its I/O time."""
    if not row.get("mean_read_bytes") or not io:
        return None
    gbps, threads = disk_throughput_at(io, row["mean_read_bytes"])
    expected_ms = row["bytes_read_per_token"] / (gbps * 1e9) * 1e3
    return {"read_bytes": row["mean_read_bytes"], "disk_gbps": gbps, "disk_threads": threads,
            "expected_ms": expected_ms, "io_ms": row["io_ms"], "ratio": row["io_ms"] / expected_ms}


def targets(results: dict) -> list[dict]:
    """Each target with its measured figure (None: not measured in this run)."""
    ablation, io, llama = results.get("ablation"), results.get("io"), results.get("llama")
    no_relu = "the ReLU fixture is absent" if ablation and not any(
        m["key"] == "relu" for m in ablation["models"]) else ""
    out = []
    naive, best = find_row(ablation, "relu", "naive"), find_row(ablation, "relu", "all")
    speedup = naive["per_token"]["total"] / best["per_token"]["total"] if naive and best else None
    out.append({"target": "all techniques >= 4x naive (ReLU model, 70% budget, ms/token)", "goal": 4.0,
                "measured": speedup, "unit": "x",
                "detail": (f"{naive['per_token']['total']:.1f} -> {best['per_token']['total']:.1f} ms/token; decode "
                           f"{naive['tokens_per_s']:.1f} -> {best['tokens_per_s']:.1f} tok/s "
                           f"({best['tokens_per_s'] / naive['tokens_per_s']:.2f}x)") if speedup else no_relu})
    ratio = detail = None
    if llama:
        h = llama["headline"]
        if h["flashcli"]["ok"] and h["llama_cpp"]["ok"]:
            ratio = h["flashcli"]["tokens_per_s"] / h["llama_cpp"]["tokens_per_s"]
            detail = (f"{h['flashcli']['tokens_per_s']:.1f} vs {h['llama_cpp']['tokens_per_s']:.1f} tok/s "
                      f"under {h['limit_bytes'] // MiB} MiB (SmolLM2 Q4_1)")
    out.append({"target": ">= 3x llama.cpp tokens/s under the same memory limit", "goal": 3.0, "measured": ratio,
                "unit": "x", "detail": detail or ""})
    check = io_check(best, io) if best else None
    out.append({"target": "I/O within 2x of what the disk allows for the bytes read (ReLU, all)", "goal": 2.0,
                "measured": check["ratio"] if check else None, "unit": "x of the disk's time", "lower_is_better": True,
                "detail": (f"{best['bytes_read_per_token'] / 1e6:.1f} MB/token in reads of {check['read_bytes'] / KiB:.0f} "
                           f"KiB on average; the disk gives {check['disk_gbps']:.2f} GB/s at that size "
                           f"-> {check['expected_ms']:.1f} ms; measured {check['io_ms']:.1f} ms") if check else no_relu})
    for t in out:
        m = t["measured"]
        t["met"] = None if m is None else (m <= t["goal"] if t.get("lower_is_better") else m >= t["goal"])
    return out


# --- charts ------------------------------------------------------------------------------------

def make_charts(results: dict, chart_dir: Path) -> dict:
    """PNG charts in chart_dir; returns name -> path, or {"skipped": reason}."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"skipped": "matplotlib is not installed (`pip install -e .[bench]`): charts skipped"}
    chart_dir.mkdir(parents=True, exist_ok=True)
    charts = {}
    if results.get("io"):
        charts["io"] = save(plt, chart_io(plt, results["io"]), chart_dir / "io_throughput.png")
    if results.get("ablation", {}).get("models"):
        charts["ablation"] = save(plt, chart_ablation(plt, results["ablation"]), chart_dir / "ablation_ms_per_token.png",
                                  tight=False)
    if results.get("llama"):
        charts["llama"] = save(plt, chart_llama(plt, results["llama"]), chart_dir / "tokens_vs_limit.png")
    return charts


def save(plt, fig, path: Path, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def chart_io(plt, io: dict):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, backend in zip(axes, ("direct", "mmap")):
        rows = [r for r in io["rows"] if r["backend"] == backend]
        for threads in sorted({r["threads"] for r in rows}):
            pts = sorted((r["chunk"], r["gbps"]) for r in rows if r["threads"] == threads)
            ax.plot([c / KiB for c, _ in pts], [g for _, g in pts], marker="o", ms=3, label=f"{threads} thread{'s' if threads > 1 else ''}")
        ax.set_xscale("log", base=2)
        ax.set_xticks([c / KiB for c in sorted({r["chunk"] for r in rows})])
        ax.set_xticklabels([f"{c // KiB}K" if c < MiB else f"{c // MiB}M" for c in sorted({r["chunk"] for r in rows})])
        ax.set_title("O_DIRECT (DirectReader)" if backend == "direct" else "mmap (MmapReader, MADV_RANDOM)")
        ax.set_xlabel("chunk size (one read)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GB/s, cold cache (median round)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Random-read throughput of this disk (flash cost model, cf. paper Fig. 2b)")
    return fig


def chart_ablation(plt, ablation: dict):
    models = ablation["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4.2), squeeze=False)
    parts = (("io", "I/O", "#d62728"), ("mem", "memory mgmt", "#ff7f0e"), ("compute", "compute (FFN)", "#1f77b4"),
             ("other", "other (attention, head, Python)", "#7f7f7f"))
    for ax, model in zip(axes[0], models):
        rows = [r for r in model["rows"] if r["ok"]]
        bottom = [0.0] * len(rows)
        for key, label, color in parts:
            values = [max(r["per_token"][key], 0.0) for r in rows]
            ax.bar(range(len(rows)), values, bottom=bottom, color=color, label=label)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["ablation"] for r in rows], rotation=30)
        ax.set_title(f"{model['title']}\nbudget {model['budget'] // MiB} MiB", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("ms per token")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle("Where a token's time goes, per configuration (cold cache)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def chart_llama(plt, llama: dict):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    sweep = sorted(llama["sweep"] + [llama["headline"]], key=lambda p: p["limit_bytes"])
    limits = [p["limit_bytes"] / MiB for p in sweep]
    ax.plot(limits, [tokens_per_s(p["llama_cpp"]) for p in sweep], marker="o", label="llama.cpp (mmap)")
    ours = [(p["limit_bytes"] / MiB, p["flashcli"]["tokens_per_s"]) for p in sweep if p["flashcli"]["ok"]]
    ax.plot([x for x, _ in ours], [y for _, y in ours], marker="s", label="flashcli (budget = limit - baseline)")
    earlier = sorted((k, v) for k, v in EARLIER_LLAMA_CPP.items() if k is not None)
    ax.plot([k for k, _ in earlier], [v for _, v in earlier], ls=":", marker="x", color="gray",
            label="llama.cpp, earlier measurement")
    minimum = (llama["minimum_budget"] + llama["baseline_rss_bytes"]) / MiB
    ax.axvline(minimum, color="gray", lw=0.8, ls="--")
    ax.text(minimum, ax.get_ylim()[1] * 0.95, " flashcli's smallest limit", fontsize=8, va="top")
    ax.set_xlabel("memory limit of the whole process (cgroup, MiB)")
    ax.set_ylabel("decode tokens/s (SmolLM2-135M Q4_1, 2 threads)")
    ax.set_title("Tokens/s against the memory limit, cold cache")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# --- the report --------------------------------------------------------------------------------

def fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def disturbed(run: dict) -> str:
    """A mark for a run that other processes shared the CPUs with, even after retries."""
    share = run.get("foreign_cpu", 0.0)
    return f" (†{share:.0%})" if share > FOREIGN_MAX else ""


def section_command(section: str, quick: bool) -> str:
    return f".venv/bin/python scripts/bench.py --section {section}" + (" --quick" if quick else "")


def machine_lines() -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(Path("/proc/meminfo").read_text().split()[1]) * KiB
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "flashcli"], cwd=ROOT, capture_output=True, text=True).stdout
    try:
        from importlib.metadata import version

        llama_version = version("llama-cpp-python")
    except Exception:
        llama_version = "?"
    return [f"- machine: {os.cpu_count()} × {cpu}, {mem / 2**30:.0f} GiB RAM, no GPU; kernel {platform.release()}; "
            f"disk under `{ROOT}`: {disk_name()}",
            f"- flashcli {commit}{' (with uncommitted changes under flashcli/)' if dirty.strip() else ''}, "
            f"llama-cpp-python {llama_version}, Python {platform.python_version()}; compute threads {THREADS} for both engines"]


def disk_name() -> str:
    dev = os.stat(ROOT).st_dev
    name = f"device {os.major(dev)}:{os.minor(dev)}"
    try:
        block = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve().name
        rotational = Path(f"/sys/block/{block}/queue/rotational").read_text().strip()
        name = f"/dev/{block} (a virtual disk{'; the kernel marks it rotational' if rotational == '1' else ''})"
    except OSError:
        pass
    return name


def render(results: dict, charts: dict) -> str:
    s = results["settings"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{results['command']}` (as root) on {results['finished']} in {results['runtime_s'] / 60:.1f} "
        "minutes. "
        "Do not edit by hand: `make bench` rewrites this file and the charts in `docs/bench/`.",
        "",
        *results["machine"],
        f"- every measured run starts from a cold page cache (`sync; echo 3 > /proc/sys/vm/drop_caches`) inside a "
        f"memory cgroup (`scripts/cgroup_run.py`; `--limit 1T` = no limit); each point is the median of "
        f"{s['repeats']} run(s); prompt \"{PROMPT}\" (no chat template), greedy, {s['tokens']} generated tokens (the 1B model: fewer, see its table)",
        "- the disk is virtual: the host may cache or throttle it, which nothing here can control",
        f"- the machine is shared: each run waits for the CPUs to be quiet and is retried (up to {MAX_ATTEMPTS} times) "
        f"when other processes took more than {FOREIGN_MAX:.0%} of the CPUs during it; a row marked (†N%) still shared "
        "N% of the CPUs",
        "",
    ]
    if "skipped" in charts:
        lines += [f"> {charts['skipped']}", ""]
    lines += render_targets(results)
    if results.get("io"):
        lines += render_io(results["io"], results["quick"], charts)
    if results.get("ablation"):
        lines += render_ablation(results["ablation"], results.get("io"), results["quick"], charts)
    if results.get("llama"):
        lines += render_llama(results["llama"], results["quick"], charts)
    return "\n".join(lines) + "\n"


def render_targets(results: dict) -> list[str]:
    lines = ["## Targets", "", "| target | measured | met | how |", "|---|---|---|---|"]
    for t in targets(results):
        met = {None: "not measured in this run", True: "yes", False: "**no**"}[t["met"]]
        lines.append(f"| {t['target']} | {fmt(t['measured'], 2)}{t['unit'] if t['measured'] else ''} | {met} | "
                     f"{t['detail']} |")
    return lines + [""]


def render_io(io: dict, quick: bool, charts: dict) -> list[str]:
    rows = io["rows"]
    chunks = sorted({r["chunk"] for r in rows})
    threads = sorted({r["threads"] for r in rows})
    lines = ["## 1. The flash cost model of this disk (paper Figure 2b)", "",
             f"Reproduce: `{section_command('io', quick)}`", "",
             f"Random, distinct chunks of a {io['file_bytes'] / 2**30:.1f} GiB scratch file on the same disk as "
             f"`models/` (written, then read cold, then deleted). Each point reads up to "
             f"{io['bytes_per_point'] // MiB} MiB (or for {io['seconds_per_point']:g} s) in rounds of at least 16 MiB (and one chunk per thread) and "
             "reports the median round, in GB/s (10^9 bytes/s). `direct`: flashcli's `DirectReader` (O_DIRECT, "
             "a pool of threads, chunks never merged); `mmap`: one `MmapReader` per thread (MADV_RANDOM, pages "
             "dropped after each read, as flashcli's mmap reader does).", ""]
    for backend in ("direct", "mmap"):
        lines += [f"**{backend}** (GB/s; rows: chunk size, columns: reader threads)", "",
                  "| chunk | " + " | ".join(str(t) for t in threads) + " |",
                  "|---|" + "---|" * len(threads)]
        for c in chunks:
            cells = []
            for t in threads:
                r = next((r for r in rows if r["backend"] == backend and r["chunk"] == c and r["threads"] == t), None)
                cells.append(fmt(r["gbps"], 3) if r else "–")
            lines.append(f"| {c // KiB} KiB | " + " | ".join(cells) + " |")
        lines.append("")
    best = max((r for r in rows if r["backend"] == "direct"), key=lambda r: r["gbps"])
    best_mmap = max((r for r in rows if r["backend"] == "mmap"), key=lambda r: r["gbps"])
    small = max((r for r in rows if r["backend"] == "direct" and r["chunk"] == chunks[0]), key=lambda r: r["gbps"])
    lines += [f"Best: direct {best['gbps']:.2f} GB/s ({best['chunk'] // KiB} KiB chunks, {best['threads']} threads); "
              f"mmap {best_mmap['gbps']:.2f} GB/s ({best_mmap['chunk'] // KiB} KiB, {best_mmap['threads']} threads); {chunks[0] // KiB} KiB direct reads reach {small['gbps']:.2f} GB/s "
              f"at best ({small['threads']} threads).", ""]
    if "io" in charts:
        lines += [f"![read throughput against chunk size]({charts['io']})", ""]
    return lines


def render_ablation(ablation: dict, io: dict | None, quick: bool, charts: dict) -> list[str]:
    lines = ["## 2. Ablation (paper Tables 2-3)", "",
             f"Reproduce: `{section_command('ablation', quick)}`", "",
             "Each row adds one technique (`flashcli generate --ablation NAME`, same binary): naive = no predictor, "
             "no cache, the whole FFN read every token; hybrid = half of each layer's neurons pinned in DRAM, the "
             "other half read every token; predictor = only predicted neurons, cache keeps just the current "
             "token's; + windowing = neurons of the last 4 tokens kept, but gate/up/down read as 3 separate "
             "requests; + bundling = the same with one read per neuron; all = the cache keeps neurons while the "
             "budget has room (LRU).", "",
             "Columns: *DRAM used* = peak RSS minus the baseline RSS (interpreter, libraries, tokenizer) measured "
             "before the model loads; *cgroup peak* = the whole process's peak charge, page cache of the model "
             "file included; ms/token cover every token that went through the model (prompt and generated, the "
             "same tokens the I/O / memory / compute telemetry covers; model loading is not included, so the "
             "hybrid ablation's initial read of its resident half is not either); *other* = total − I/O − memory "
             "− compute: attention, output head, Python; *speedup* = naive ms/token ÷ this row's; *tok/s* = "
             "decode only (the prompt excluded), as flashcli reports it.", ""]
    for msg in ablation["skipped"]:
        lines += [f"> skipped: {msg}", ""]
    for model in ablation["models"]:
        lines += render_ablation_model(model, io)
    if "ablation" in charts:
        lines += [f"![ms per token by configuration]({charts['ablation']})", ""]
    return lines


def render_ablation_model(model: dict, io: dict | None) -> list[str]:
    pct = f"{model['budget_fraction']:.0%}"
    lines = [f"### {model['title']} at {pct} of its file", "",
             f"Source {Path(model['source']).name} ({model['source_bytes'] / MiB:.0f} MiB; converted file "
             f"{model['flash_bytes'] / MiB:.0f} MiB). {model['note'][0].upper() + model['note'][1:]}.", ""]
    if "infeasible_budget" in model:
        lines += [f"**{pct} of the file = {model['infeasible_budget'] // MiB} MiB is infeasible**: flashcli's minimum "
                  f"for this model is {model['minimum_budget'] / MiB:.0f} MiB (resident attention and embeddings, "
                  "KV cache, buffers and the smallest neuron caches; `flashcli generate -v` prints the split). "
                  f"Measured at that minimum instead:", ""]
    lines += [f"Budget `--dram-budget {model['budget'] // MiB}M`; one row: `{model['rows'][0]['command']}` "
              "(with the row's `--ablation`).", "",
              "| configuration | budget MiB | DRAM used MiB | cgroup peak MiB | FFN loaded/token | MB read/token | I/O ms | "
              "memory ms | compute ms | other ms | total ms/token | speedup | tok/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    naive = next((r for r in model["rows"] if r["ablation"] == "naive" and r["ok"]), None)
    for r in model["rows"]:
        name = ABLATION_TITLES[r["ablation"]]
        if not r["ok"]:
            lines.append(f"| {name} | {model['budget'] // MiB} | failed: {r['error']} |" + " |" * 10)
            continue
        p = r["per_token"]
        speedup = naive["per_token"]["total"] / p["total"] if naive else None
        lines.append(f"| {name}{disturbed(r)} | {r['dram_budget_bytes'] / MiB:.0f} | "
                     f"{(r['peak_rss_bytes'] - r['baseline_rss_bytes']) / MiB:.0f} | {r['cgroup_peak_bytes'] / MiB:.0f} | "
                     f"{r['ffn_fraction_loaded_per_token']:.1%} | {r['bytes_read_per_token'] / 1e6:.2f} | {p['io']:.1f} | "
                     f"{p['mem']:.1f} | {p['compute']:.1f} | {p['other']:.1f} | {p['total']:.1f} | {fmt(speedup, 2)}x | "
                     f"{r['tokens_per_s']:.1f} |")
    lines.append("")
    if model.get("skipped_ablations"):
        lines += [f"Rows not run in this mode: {', '.join(model['skipped_ablations'])}.", ""]
    first = model["rows"][0]
    if first["ok"]:
        lines += [f"Baseline RSS {first['baseline_rss_bytes'] / MiB:.0f} MiB; {first['prompt_tokens']} prompt + "
                  f"{first['generated_tokens']} generated tokens per run; median of {model['repeats']} run(s) per row.", ""]
    if model.get("plan"):
        lines += ["<details><summary>How flashcli splits this budget (<code>flashcli generate -v</code>, all "
                  "techniques)</summary>", "", "```", *model["plan"], "```", "", "</details>", ""]
    checks = [(r, io_check(r, io)) for r in model["rows"] if r["ok"] and io]
    checks = [(r, c) for r, c in checks if c]
    if checks:
        lines += ["I/O against the disk's cost model: the mean size of flashcli's reads (counted by its readers "
                  "in a separate, untimed run of the library), the best direct-I/O throughput section 1 measured at "
                  "that size, and the I/O time those bytes would take at that throughput.", "",
                  "| configuration | fraction of FFN loaded/token | MB read/token | mean read KiB | disk GB/s at that size | "
                  "disk-bound I/O ms | measured I/O ms | measured ÷ disk-bound |",
                  "|---|---|---|---|---|---|---|---|"]
        for r, c in checks:
            lines.append(f"| {r['ablation']} | {r['ffn_fraction_loaded_per_token']:.1%} | "
                         f"{r['bytes_read_per_token'] / 1e6:.2f} | {c['read_bytes'] / KiB:.0f} | {c['disk_gbps']:.2f} "
                         f"({c['disk_threads']} threads) | {c['expected_ms']:.1f} | {c['io_ms']:.1f} | {c['ratio']:.2f} |")
        lines.append("")
    return lines


def render_llama(llama: dict, quick: bool, charts: dict) -> list[str]:
    h, u = llama["headline"], llama["unconstrained"]
    lines = ["## 3. Against llama.cpp", "",
             f"Reproduce: `{section_command('llama', quick)}`", "",
             f"llama.cpp = llama-cpp-python on the original `{Path(llama['model']).name}` with default settings "
             "(mmap), `n_ctx=512`, 2 threads, the same prompt tokens, greedy decoding with each `eval` timed "
             f"(one run: `{h['llama_cpp']['command']}`). flashcli = `flashcli generate` on the converted file with "
             f"all techniques (one run: `{h['flashcli']['command']}`). Both from a cold cache, each in its own "
             "memory cgroup that covers the whole process (page cache of the model file included). tok/s = "
             "decode tokens per second (generated tokens after the first ÷ their time) for both.", "",
             f"flashcli's smallest budget for this model is {llama['minimum_budget'] / MiB:.0f} MiB and its baseline "
             f"RSS (Python, numpy, llama.cpp's tokenizer) {llama['baseline_rss_bytes'] / MiB:.0f} MiB, so the "
             f"shared limit is {h['limit_bytes'] // MiB} MiB.{footprint_note(llama)}", "",
             "| setting | flashcli tok/s | llama.cpp tok/s | flashcli ÷ llama.cpp | flashcli peak (cgroup) MiB | "
             "llama.cpp peak (cgroup) MiB |", "|---|---|---|---|---|---|"]
    lines.append(llama_row("unconstrained (flashcli: no budget)", u))
    lines.append(llama_row(f"same limit {h['limit_bytes'] // MiB} MiB (flashcli budget {h['flash_budget'] // MiB} MiB)", h))
    lines += ["", "### Tokens/s against the memory limit", "",
              "Each limit is a cgroup on the whole process; flashcli runs with `--dram-budget` = limit − its "
              f"baseline RSS ({llama['baseline_rss_bytes'] / MiB:.0f} MiB). Earlier llama.cpp figures (same model, "
              "2 threads, cold cache, before flashcli existed) are shown for comparison.", "",
              "| limit MiB | flashcli budget MiB | flashcli tok/s | llama.cpp tok/s | ratio | llama.cpp earlier |",
              "|---|---|---|---|---|---|"]
    for p in llama["sweep"]:
        limit_mib = p["limit_bytes"] // MiB
        ours, theirs = p["flashcli"], p["llama_cpp"]
        ours_text = f"{ours['tokens_per_s']:.1f}{disturbed(ours)}" if ours["ok"] else f"infeasible ({ours['error']})" if ours.get(
            "infeasible") else f"failed: {ours['error']}"
        theirs_text = f"{theirs['tokens_per_s']:.1f}{disturbed(theirs)}" if theirs["ok"] else f"failed: {theirs['error']}"
        ratio = ours["tokens_per_s"] / theirs["tokens_per_s"] if ours["ok"] and theirs["ok"] else None
        earlier = EARLIER_LLAMA_CPP.get(limit_mib)
        lines.append(f"| {limit_mib} | {max(p['flash_budget'], 0) // MiB} | {ours_text} | {theirs_text} | "
                     f"{fmt(ratio, 2)} | {fmt(earlier)} |")
    lines.append("")
    if "llama" in charts:
        lines += [f"![tokens/s against the memory limit]({charts['llama']})", ""]
    return lines


def footprint_note(llama: dict) -> str:
    """What flashcli's whole process really took at its smallest budget, with no limit."""
    probe, h = llama["headline"]["flashcli_unlimited"], llama["headline"]
    if not probe["ok"]:
        return ""
    extra = probe["cgroup_peak_bytes"] - h["flash_budget"] - llama["baseline_rss_bytes"]
    llama_run = h["llama_cpp"]
    tokens = (f" Prompt tokens: flashcli {probe['prompt_tokens']}, llama.cpp {llama_run['prompt_tokens']}."
              if llama_run["ok"] else "")
    return (f" Without a limit, flashcli's process at that budget peaked at {probe['cgroup_peak_bytes'] / MiB:.0f} MiB "
            f"in its cgroup (page cache included), {extra / MiB:+.0f} MiB beyond budget + baseline "
            f"({probe['tokens_per_s']:.1f} tok/s).{tokens}")


def llama_row(name: str, point: dict) -> str:
    ours, theirs = point["flashcli"], point["llama_cpp"]

    def cell(run):
        return f"{run['tokens_per_s']:.1f}{disturbed(run)}" if run["ok"] else f"failed: {run['error']}"

    ratio = ours["tokens_per_s"] / theirs["tokens_per_s"] if ours["ok"] and theirs["ok"] else None
    return (f"| {name} | {cell(ours)} | {cell(theirs)} | {fmt(ratio, 2)} | {ours['cgroup_peak_bytes'] / MiB:.0f} | "
            f"{theirs['cgroup_peak_bytes'] / MiB:.0f} |")


# --- main --------------------------------------------------------------------------------------

def check_environment() -> None:
    if os.geteuid() != 0:
        sys.exit("bench: needs root (drop_caches, memory cgroups)")
    if not Path("/sys/fs/cgroup/memory").is_dir():
        sys.exit("bench: needs cgroup v1 at /sys/fs/cgroup/memory")
    smollm2 = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not smollm2.exists():
        sys.exit(f"bench: {smollm2} is missing: run `make model`")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    workers = {"_llama_worker": llama_worker, "_read_sizes": read_sizes_worker}
    if argv and argv[0] in workers:
        return workers[argv[0]](argv[1:])

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tokens, repeats and grid points (~5 minutes)")
    ap.add_argument("--section", action="append", choices=SECTIONS,
                    help="run only this section (repeatable; default: all)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens generated per run (default 32, quick 8)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per point, median reported (default 3, quick 1)")
    ap.add_argument("--out", type=Path, default=None,
                    help="markdown output (default BENCHMARKS.md; bench-out/BENCHMARKS-partial.md with --section)")
    ap.add_argument("--reconvert", action="store_true",
                    help="convert the models again (after a converter change; the 1B model takes ~30 minutes)")
    ap.add_argument("--render-only", action="store_true",
                    help="measure nothing: write the markdown and charts again from bench-out/results.json")
    ap.add_argument("--models", default=None,
                    help="ablation rows for these models only, comma-separated: relu,smollm2,synth1b")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(SCRIPTS))
    OUT_DIR.mkdir(exist_ok=True)
    results_path = OUT_DIR / "results.json"
    if args.render_only:
        results = json.loads(results_path.read_text())
    else:
        check_environment()
        results = run_sections(args)
        results_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    partial = len(results["sections"]) < len(SECTIONS)
    out = (args.out or (OUT_DIR / "BENCHMARKS-partial.md" if partial else ROOT / "BENCHMARKS.md")).resolve()
    # the committed charts belong with the committed BENCHMARKS.md; other outputs get their own
    chart_dir = CHART_DIR if out == ROOT / "BENCHMARKS.md" else OUT_DIR / "charts"
    charts = make_charts(results, chart_dir)
    if "skipped" in charts:
        log(charts["skipped"])
    else:  # links relative to the markdown file
        charts = {name: os.path.relpath(path, out.parent) for name, path in charts.items()}
    out.write_text(render(results, charts))
    log(f"wrote {out} (measured in {results['runtime_s'] / 60:.1f} minutes)")
    for t in targets(results):
        log(f"target: {t['target']}: {fmt(t['measured'], 2)} (goal {t['goal']}) -> "
            f"{ {None: 'not measured', True: 'met', False: 'NOT met'}[t['met']] }")


def run_sections(args) -> dict:
    settings = make_settings(args)
    sections = args.section or list(SECTIONS)
    command = ".venv/bin/python scripts/bench.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:])
    results = {"command": command, "quick": settings.quick, "sections": sections, "machine": machine_lines(),
               "settings": {"tokens": settings.tokens, "repeats": settings.repeats}}
    t0 = time.perf_counter()
    for name, fn in (("io", io_section), ("ablation", ablation_section), ("llama", llama_section)):
        if name in sections:
            log(f"--- section {name}")
            t = time.perf_counter()
            results[name] = fn(settings)
            log(f"--- section {name} took {time.perf_counter() - t:.0f} s")
    results["runtime_s"] = time.perf_counter() - t0
    results["finished"] = time.strftime("%Y-%m-%d %H:%M")
    return results


if __name__ == "__main__":
    main()
