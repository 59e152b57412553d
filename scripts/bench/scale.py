"""The paper's scale (issue 34): 8B and 14B models at half and a quarter of their size.

Per shape (scripts/make_model.py's llama-3.1-8b and qwen3-14b at Q4_K_M, random weights, made
into DIR, outside git; a shape is skipped with one line where DIR's disk lacks the room):
- the disk's sequential rate on the made file (O_DIRECT, 1 MiB reads, 4 threads, cold), in
  the same run as everything it is compared with;
- `flashcli convert`: wall time from a cold cache, and the process's peak RSS (its own VmHWM);
- `flashcli generate` through the CLI at --dram-budget 50% and 25% of the GGUF, one stream,
  greedy, N tokens, --draft off, cold cache, cgroup limit = budget + flashcli's measured
  baseline: tok/s, bytes read per token against the plan's streamed bytes and against the
  non-resident bytes, io wait, the share of the disk's rate it reads at, the first token's
  latency (process start to first token); the disk-bound limit at that budget (non-resident
  bytes at the measured rate, plus the compute of a resident run); 3 prompts, whose texts are
  compared with flashcli resident (a budget twice the file) and llama.cpp unconstrained (warm,
  scripts/bench/llama_warm.py);
- llama.cpp in the same cgroup limit on the same file, as a user runs it: its default (weights
  repacked into anonymous memory: the OOM killer is expected and recorded) and with repacking off
  (use_extra_bufts = False: memory-mapped), each with a time cap;
- `--batch` at 50% with 16, 32 and 64 sequences (64 prompts, BATCH_N tokens each), the default
  mode and --batched-products, against llama.cpp's batched decoding with no limit.

    python -m scripts.bench --section scale                  (the record: root, a quiet machine)
    python -m scripts.bench.scale [--shape S ...] [--source GGUF] [--dir DIR] [--quick] [--no-batch]

--source runs the same measures on a GGUF already made (a smoke run on a 1B); --quick: one
prompt, fewer tokens and sequences.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import batch, disk, runner
from .cgroup import drop_caches
from .runner import ROOT

DIR = Path(os.environ.get("FLASHCLI_BIG_MODELS", "/work/bigmodels"))
TYPE = "Q4_K_M"
SIZES = {"llama-3.1-8b": 4.92e9, "qwen3-14b": 9.00e9}  # bytes of the real models' Q4_K_M files
SHARES = (0.5, 0.25)
PROMPTS = (
    "The history of the printing press begins",
    "def merge_sorted(a, b):",
    "Once upon a time, in a small village by the sea,",
)
N = 64
BATCH_PARALLEL = (16, 32, 64)
BATCH_N = 32
THREADS = 2
LLAMA_CAP_S = 300  # llama.cpp under the limit: a thrashing run is cut here (its rate so far is kept)
RUN_CAP_S = 3600
REPORTS_PEAK = """
import sys
from flashcli.cli import cli
try:
    cli(sys.argv[1:], standalone_mode=False)
finally:
    print([line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0], file=sys.stderr)
"""


def run(
    quick: bool = False,
    shapes=None,
    directory: Path = DIR,
    source=None,
    with_batch: bool = True,
    batch_only: bool = False,
    batch_n: int = BATCH_N,
) -> dict:
    if batch_only:
        return run_batch_only(shapes or list(SIZES), Path(directory), batch_n)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = {"machine": runner.env_note(), "threads": THREADS, "quick": quick, "sizes": {}}
    if source:
        source = Path(source)
        out["sizes"][source.stem] = one_size(source, directory, quick, with_batch)
    for shape in [] if source else shapes or list(SIZES):
        path = directory / f"{shape}.{TYPE}.gguf"
        need = room_needed(shape, path)
        free = shutil.disk_usage(directory).free
        if need > free:
            line = f"skipped: needs {need / 2**30:.1f} GiB free in {directory}, {free / 2**30:.1f} GiB there"
            print(f"bench scale: {shape} {line}", file=sys.stderr)
            out["sizes"][shape] = {"skipped": line}
            continue
        made = make(shape, path)
        out["sizes"][shape] = {"make_s": made} | one_size(path, directory, quick, with_batch)
    runner.save("scale", out)
    return out


def run_batch_only(shapes, directory: Path, n: int) -> dict:
    """Item 4 alone, on shapes made and converted before: --batch at 50%, each sequence count
    one wave of as many prompts (bench-out/scale-batch.json)."""
    out = {"machine": runner.env_note(), "threads": THREADS, "sizes": {}}
    for shape in shapes:
        source = directory / f"{shape}.{TYPE}.gguf"
        flash = directory / (source.name[: -len(".gguf")] + ".flash.gguf")
        if not flash.exists() or flash.stat().st_mtime < source.stat().st_mtime:
            convert(source, flash)
        size, baseline = os.path.getsize(source), runner.flashcli_baseline(flash)
        out["sizes"][shape] = batched(source, flash, size // 2, size // 2 + baseline, False, n, one_wave=True)
        runner.save("scale-batch", out)
    return out


def room_needed(shape: str, path: Path) -> int:
    """Bytes DIR needs for a shape: its GGUF (unless made already) and the converted file, with 5%."""
    size = os.path.getsize(path) if path.exists() else SIZES.get(shape, 0)
    converted = path.with_name(path.name[: -len(".gguf")] + ".flash.gguf")
    return int(1.05 * (size * (not path.exists()) + size * (not converted.exists())))


def make(shape: str, path: Path) -> float | None:
    """Makes the shape's GGUF with scripts/make_model.py unless it is there; its seconds (None: was there)."""
    if path.exists():
        return None
    t0 = time.perf_counter()
    cmd = [sys.executable, "scripts/make_model.py", shape, "-o", str(path), "--type", TYPE]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - t0


def one_size(source: Path, directory: Path, quick: bool, with_batch: bool) -> dict:
    flash = directory / (source.name[: -len(".gguf")] + ".flash.gguf")
    size = os.path.getsize(source)
    out = {"model": source.name, "file_bytes": size, "disk": disk_rate(source), "convert": convert(source, flash)}
    if "error" in out["convert"]:  # an architecture flashcli does not run (yet): the line says which
        print(f"bench scale: {source.name}: {out['convert']['error']}", file=sys.stderr)
        return out
    out["baseline_bytes"] = baseline = runner.flashcli_baseline(flash)
    prompts = PROMPTS[:1] if quick else PROMPTS
    n = 16 if quick else N
    out["n"], out["prompts"] = n, list(prompts)
    out["llama_unlimited"] = llama_unlimited(source, prompts, n)
    out["resident"] = [generate(flash, p, n, 2 * size, 2 * size + 2 * baseline) for p in prompts]
    compute_s = _per_token_s(out["resident"][0])
    out["shares"] = {}
    for share in SHARES:
        budget = int(size * share)
        limit = budget + baseline
        runs = [generate(flash, p, n, budget, limit) for p in prompts]
        first = runs[0]
        row = {"budget_bytes": budget, "limit_bytes": limit, "runs": runs}
        plan = first.get("stats", {}).get("budget_plan", {})
        non_resident = _non_resident_bytes(flash, plan)
        rate = out["disk"]["mb_s"] * 1e6
        row["plan_streamed_bytes"] = plan.get("streamed_bytes")
        row["non_resident_bytes"] = non_resident
        if compute_s is not None and non_resident is not None:
            row["disk_bound_tok_s"] = 1 / (non_resident / rate + compute_s)
        tok_s = first.get("stats", {}).get("tokens_per_s")
        read = first.get("stats", {}).get("bytes_read_per_token")
        if tok_s and read:
            row["disk_share"] = read * tok_s / rate
        if tok_s and row.get("disk_bound_tok_s"):
            row["over_disk_bound"] = tok_s / row["disk_bound_tok_s"]
        row["same_as_resident"] = _same(runs, out["resident"])
        row["same_as_llama"] = _same(runs, out["llama_unlimited"].get("runs", []))
        tokens = _tokens(source, prompts[0])
        cap = 120 if quick else LLAMA_CAP_S
        row["llama_default"] = runner.engine_run("llama", source, tokens, n, limit, timeout=cap)
        row["llama_mmap"] = runner.engine_run("llama", source, tokens, n, limit, timeout=cap, no_repack=True)
        if tok_s and row["llama_mmap"].get("decode_tok_s"):
            row["over_llama_mmap"] = tok_s / row["llama_mmap"]["decode_tok_s"]
        out["shares"][str(share)] = row
    if with_batch:
        out["batch"] = batched(source, flash, size // 2, size // 2 + baseline, quick)
    return out


def disk_rate(source: Path) -> dict:
    """The disk's sequential O_DIRECT rate on this file (1 MiB reads from 4 threads, cold)."""
    size = os.path.getsize(source)
    start = min(1 << 28, size // 4) >> 20 << 20  # O_DIRECT: aligned
    return disk.measure(source, 1 << 20, 4, min(512 << 20, size - start - (1 << 20)), "sequential", start=start)


def convert(source: Path, flash: Path) -> dict:
    """`flashcli convert` from a cold cache: wall seconds, peak RSS (the process's VmHWM), rate."""
    drop_caches()
    idle = runner.quiet_cpu()
    t0 = time.perf_counter()
    cmd = [sys.executable, "-c", REPORTS_PEAK, "convert", str(source), "-o", str(flash), "--force", "-q"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        lines = p.stderr.strip().splitlines() or ["failed"]
        return {"error": next((x for x in reversed(lines) if "error" in x.lower()), lines[-1])[-300:]}
    size = os.path.getsize(source)
    return {"wall_s": wall, "peak_rss_bytes": int(p.stderr.split()[-1]) * 1024, "mb_s": size / wall / 1e6} | {
        "cpu_idle_before": idle
    }


def generate(flash: Path, prompt: str, n: int, budget: int, limit: int) -> dict:
    """One cold `flashcli generate` under the limit: its text, stats, memory and first token latency."""
    args = [str(flash), "-p", prompt, "-n", str(n), "--dram-budget", str(budget), "--draft", "off", "--json"]
    run, stats, idle = runner.limited_generate(args, limit, RUN_CAP_S, THREADS)
    out = {
        "prompt": prompt,
        "cpu_idle_before": idle,
        "wall_s": run["wall_s"],
        "max_usage_bytes": run["max_usage_bytes"],
        "oom_kills": run["oom_kills"],
        "stats": stats,
    }
    if run["returncode"] != 0:
        return out | runner.failure(run)
    lines = [json.loads(line) for line in run["stdout"].decode("utf-8", "replace").splitlines() if line.strip()]
    out["token_ids"] = [r["token"] for r in lines if "token" in r]
    out["text"] = "".join(r["text"] for r in lines if "token" in r)
    if stats.get("tokens_per_s"):  # process start to the first token: all but the decode steps
        out["first_token_s"] = run["wall_s"] - (stats["generated_tokens"] - 1) / stats["tokens_per_s"]
    return out | {"status": "ok"}


def llama_unlimited(source: Path, prompts, n: int) -> dict:
    """llama.cpp warm with no limit (scripts/bench/llama_warm.py): per prompt its text and tok/s."""
    from flashcli.engine.tokenizer import StreamDecoder, Tokenizer

    tok = Tokenizer(source)
    with tempfile.TemporaryDirectory() as tmp:
        ids = Path(tmp) / "prompts.json"
        ids.write_text(json.dumps([tok.encode(p) for p in prompts]))
        cmd = [sys.executable, "-m", "scripts.bench.llama_warm", str(source), str(ids), str(n)]
        cmd += ["--threads", str(THREADS)]
        idle = runner.quiet_cpu()
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=RUN_CAP_S)
    if p.returncode != 0:
        return {"status": "failed", "error": p.stderr[-500:], "cpu_idle_before": idle}
    d = json.loads(p.stdout)
    for r in d["runs"]:
        decoder = StreamDecoder(tok)
        r["text"] = "".join(decoder.add(t) for t in r["token_ids"]) + decoder.flush()
    return d | {"status": "ok", "cpu_idle_before": idle}


def batched(
    source: Path,
    flash: Path,
    budget: int,
    limit: int,
    quick: bool,
    n: int | None = None,
    one_wave: bool = False,
    parallels=BATCH_PARALLEL,
) -> dict:
    """--batch at 50%: the default mode and --batched-products at each of BATCH_PARALLEL, and
    llama.cpp's batched decoding with no limit at the same counts (scripts/bench/batch.py).
    one_wave: each count runs as many prompts as sequences (else every count runs them all)."""
    from flashcli.engine.tokenizer import Tokenizer

    parallels = (4, 8) if quick else parallels
    n = n or (8 if quick else BATCH_N)
    prompts = _batch_prompts(max(parallels))
    tok = Tokenizer(source)
    tokens = {p["id"]: tok.encode(p["prompt"]) for p in prompts}
    out = {"prompt_count": len(prompts), "n": n, "one_wave": one_wave, "budget_bytes": budget, "limit_bytes": limit}

    def wave(p):
        return prompts[:p] if one_wave else prompts

    out["exact"] = [batch.flashcli_batch(flash, wave(p), n, p, budget, limit, RUN_CAP_S, chat=False) for p in parallels]
    out["batched"] = [
        batch.flashcli_batch(flash, wave(p), n, p, budget, limit, RUN_CAP_S, True, chat=False) for p in parallels
    ]
    if one_wave:  # llama.cpp: one process per count, on that count's prompts
        runs = [
            batch.llama_reference(source, {q["id"]: tokens[q["id"]] for q in wave(p)}, n, [p], RUN_CAP_S)
            for p in parallels
        ]
        out["llama"] = {"runs": [r for x in runs for r in x["runs"]], "status": [x.get("status") for x in runs]}
    else:
        out["llama"] = batch.llama_reference(source, tokens, n, list(parallels), RUN_CAP_S)
    best = max((r["aggregate_tok_s"] for r in out["llama"]["runs"]), default=None)
    exact_texts = {}
    for r in out["exact"]:
        for i, res in r.get("results", {}).items():
            exact_texts.setdefault(i, set()).add(res.get("text"))
    # the default mode gives each prompt its single run's text whatever the count: the same across
    # counts, for the prompts that ran at more than one
    counts = {}
    for r in out["exact"]:
        for i in r.get("results", {}):
            counts[i] = counts.get(i, 0) + 1
    several = [i for i, c in counts.items() if c > 1]
    out["exact_same_across_counts"] = f"{sum(len(exact_texts[i]) == 1 for i in several)}/{len(several)}"
    for r in out["exact"] + out["batched"]:
        r["over_llama_best"] = r["aggregate_tok_s"] / best if best else None
        # from the first pass to the last (load outside the timing, prompts inside: llama.cpp's protocol)
        total = (r.get("stats") or {}).get("total_s")
        r["generation_tok_s"] = r["generated_tokens"] / total if total else None
        r["generation_over_llama_best"] = r["generation_tok_s"] / best if best and r.get("generation_tok_s") else None
        r.pop("results", None)  # texts: compared in the single-stream runs; kept out of the JSON
    return out


def _batch_prompts(count: int) -> list[dict]:
    """`count` plain prompts: the batch section's questions, each opened a few ways."""
    questions = [json.loads(line)["prompt"] for line in batch.PROMPTS.read_text().splitlines() if line.strip()]
    openings = ("", "Answer briefly. ", "Explain step by step. ", "In one paragraph: ")
    texts = [o + q for o in openings for q in questions]
    return [{"id": f"s{i:02d}", "prompt": t} for i, t in enumerate(texts[:count])]


def _tokens(source: Path, prompt: str) -> list[int]:
    from flashcli.engine.tokenizer import Tokenizer

    return Tokenizer(source).encode(prompt)


def _per_token_s(run: dict) -> float | None:
    tok_s = run.get("stats", {}).get("tokens_per_s")
    return 1 / tok_s if tok_s else None


def _non_resident_bytes(flash: Path, plan: dict) -> int | None:
    """The bytes of the matrices a pass multiplies by that the plan does not keep resident: every
    tensor but the token embeddings (a row per token is read) less the plan's resident weights."""
    from flashcli.engine.gguf_file import GGUFFile

    parts = plan.get("parts")
    if not parts:
        return None
    gf = GGUFFile(flash)
    weights = sum(t.nbytes for name, t in gf.tensors.items() if name != "token_embd.weight")
    return weights - parts.get("resident weights", 0) - parts.get("resident matrices", 0)


def _same(runs: list[dict], reference: list[dict]) -> int | None:
    """How many prompts got the reference's greedy tokens (None where the reference did not run).
    A run that stopped at an end-of-generation token matches the reference's tokens before it
    (llama_warm decodes on through it)."""
    if not reference:
        return None

    def same(a, b):
        ids, ref = a.get("token_ids"), b.get("token_ids")
        if ids is None or ref is None:
            return False
        stopped = a.get("stats", {}).get("finish_reason") == "stop"
        return ids == ref[: len(ids)] if stopped else ids == ref

    return sum(1 for a, b in zip(runs, reference) if a.get("status") == "ok" and same(a, b))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", action="append", help=f"repeatable; default: {', '.join(SIZES)}")
    ap.add_argument("--source", default=None, help="measure this GGUF instead of making shapes")
    ap.add_argument("--dir", default=str(DIR), help=f"where made and converted files go (default {DIR})")
    ap.add_argument("--quick", action="store_true", help="a smoke run: one prompt, fewer tokens")
    ap.add_argument("--no-batch", action="store_true", help="skip the --batch runs")
    ap.add_argument("--batch-only", action="store_true", help="only the --batch runs, one wave per count")
    ap.add_argument("--batch-n", type=int, default=BATCH_N, help=f"tokens per sequence there (default {BATCH_N})")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench scale: needs root (dropping the page cache, cgroup memory limits)")
    run(args.quick, args.shape, Path(args.dir), args.source, not args.no_batch, args.batch_only, args.batch_n)


if __name__ == "__main__":
    main()
