"""Mixtures of experts under a budget (issue 35): the model maker's olmoe-1b-7b and
qwen3-30b-a3b at Q4_K_M, made into DIR outside git (a shape skipped with one line where the disk
lacks the room), with even routing (random routers: experts picked about evenly, which trained
routers do not do) and skewed routing (--router-skew trained: hot experts per layer, modelled on
measured routing, converters/model_maker/router_skew.py).

Per shape, cold cache, one stream, greedy, N tokens, --draft off: `flashcli generate` on the
GGUF itself at --dram-budget 50% and 25% under a cgroup limit of budget + flashcli's measured
baseline (tok/s, expert hit rate, experts and bytes read per token, io wait, first token);
llama.cpp in the same limit (memory-mapped: use_extra_bufts = False; and its default, repacked
into anonymous memory), each with a time cap; llama.cpp warm with no limit; greedy tokens at
each budget against llama.cpp unconstrained's.

    python -m scripts.bench --section moe            (the record: root, a quiet machine)
    python -m scripts.bench.moe [--shape S ...] [--skew even|trained|hot ...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import runner, scale
from .cells import number

SHAPES = {"olmoe-1b-7b": 4.2e9, "qwen3-30b-a3b": 18.6e9}  # bytes of the Q4_K_M files, about
SHARES = (0.5, 0.25)
SKEWS = ("even", "trained")  # routing variants run by default: random routers, and skewed ones
PROMPT = "The history of the printing press begins"
N = 32
LLAMA_CAP_S = 300


def run(
    quick: bool = False,
    shapes=None,
    directory: Path = scale.DIR,
    skews=SKEWS,
    converted: bool = False,
    shares=SHARES,
    llama_limited: bool = True,
    batch: int = 0,
) -> dict:
    """batch > 0: also `--batch` with that many sequences at the first share (one wave).
    converted: flashcli runs the file `flashcli convert` makes of the GGUF (experts stored
    repacked), as a user does, beside the GGUF itself (bench-out/moe-converted.json)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = {"machine": runner.env_note(), "threads": scale.THREADS, "quick": quick, "n": 8 if quick else N, "sizes": {}}
    for shape in shapes or list(SHAPES):
        for skew in skews:
            name = f"{shape}.{scale.TYPE}" if skew == "even" else f"{shape}.{skew}.{scale.TYPE}"
            path = directory / f"{name}.gguf"
            need = 0 if path.exists() else int(1.1 * SHAPES[shape])
            free = shutil.disk_usage(directory).free
            if need > free:
                print(f"bench moe: {name}: skipped, needs {need / 2**30:.1f} GiB free in {directory}", flush=True)
                continue
            one = one_shape(shape, path, out["n"], quick, skew, converted, shares, llama_limited, batch)
            out["sizes"][f"{shape} {skew}"] = one
            runner.save("moe" if llama_limited and not (converted or batch) else "moe-converted", out)
    return out


def make(shape: str, path: Path, skew: str) -> float | None:
    """scale.make with the routers' skew: the shape's GGUF unless it is there; its seconds."""
    if path.exists():
        return None
    t0 = time.perf_counter()
    cmd = [sys.executable, "scripts/make_model.py", shape, "-o", str(path), "--type", scale.TYPE]
    subprocess.run(cmd + ["--router-skew", skew], cwd=scale.ROOT, check=True)
    return time.perf_counter() - t0


def one_shape(
    shape: str,
    path: Path,
    n: int,
    quick: bool,
    skew: str = "even",
    converted: bool = False,
    shares=SHARES,
    llama_limited: bool = True,
    batch: int = 0,
) -> dict:
    made_s = make(shape, path, skew)
    size = os.path.getsize(path)
    baseline = runner.flashcli_baseline(path)
    tokens = scale._tokens(path, PROMPT)
    out = {"model": path.name, "skew": skew, "file_bytes": size, "made_s": made_s, "baseline_bytes": baseline}
    out["llama_unlimited"] = scale.llama_unlimited(path, [PROMPT], n)
    out["shares"] = {}
    flash = path.with_name(path.name[: -len(".gguf")] + ".flash.gguf")
    if converted:
        out["convert"] = scale.convert(path, flash)
    for share in shares[:1] if quick else shares:
        budget = int(size * share)
        limit = budget + baseline
        row = {"budget_bytes": budget, "limit_bytes": limit}
        row["flashcli"] = scale.generate(flash if converted else path, PROMPT, n, budget, limit)
        row["same_as_llama"] = scale._same([row["flashcli"]], out["llama_unlimited"].get("runs", []))
        if converted:  # the GGUF itself beside it: what storing the experts repacked changes
            row["flashcli_source"] = scale.generate(path, PROMPT, n, budget, limit)
        if batch and share == shares[0]:
            model = flash if converted else path
            row["batch"] = scale.batched(path, model, budget, limit, False, 16, one_wave=True, parallels=(batch,))
        if not llama_limited:
            out["shares"][str(share)] = row
            continue
        row["llama_mmap"] = runner.engine_run("llama", path, tokens, n, limit, timeout=LLAMA_CAP_S, no_repack=True)
        row["llama_default"] = runner.engine_run("llama", path, tokens, n, limit, timeout=LLAMA_CAP_S)
        out["shares"][str(share)] = row
    return out


def moe_section() -> str:
    d = runner.load("moe")
    if not d:
        return ""
    lines = [
        "## Mixtures of experts under a budget\n",
        "`python -m scripts.bench --section moe`: the model maker's shapes at Q4_K_M, random weights; "
        "routing even (random routers pick experts about evenly) or skewed (`--router-skew trained`: a "
        "long tail of hot experts per layer modelled on measured routing, converters/model_maker/"
        f"router_skew.py); one prompt, {d['n']} greedy tokens, --draft off, cold cache, cgroup "
        f"limit = budget + flashcli's baseline; {d['machine']}.\n",
        "| shape | routing | budget | flashcli tok/s | expert hit rate | repeats | experts read/token | MB read/token "
        "| io wait ms/token "
        "| llama.cpp mmap in the limit | llama.cpp default in the limit | llama.cpp no limit | x mmap | x no limit "
        "| same tokens as llama.cpp |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, s in d["sizes"].items():
        shape, _, skew = key.partition(" ")
        free = (s["llama_unlimited"].get("runs") or [{}])[0].get("decode_tok_s")
        for share, row in s["shares"].items():
            f, st = row["flashcli"], row["flashcli"].get("stats", {})
            tok_s = st.get("tokens_per_s") if f.get("status") == "ok" else None
            mm, df = row["llama_mmap"], row["llama_default"]
            mm_s = mm.get("decode_tok_s") if mm.get("status") == "ok" else None
            lines.append(
                f"| {shape} | {skew or 'even'} | {float(share):.0%} ({row['budget_bytes'] / 2**30:.2f} GiB) "
                f"| {number(tok_s)} | {number(st.get('expert_hit_rate'))} | {number(st.get('expert_repeat_rate'))} "
                f"| {number(st.get('experts_read_per_token'))} "
                f"| {number((st.get('bytes_read_per_token') or 0) / 1e6)} | {number(st.get('io_wait_ms'))} "
                f"| {_llama(mm)} | {_llama(df)} | {number(free)} "
                f"| {number(tok_s / mm_s if tok_s and mm_s else None)} | {number(tok_s / free if tok_s and free else None)} "
                f"| {row.get('same_as_llama')}/1 |"
            )
    return "\n".join(lines) + "\n"


def _llama(run: dict) -> str:
    if run.get("status") == "ok":
        return number(run.get("decode_tok_s"))
    if run.get("oom_kills"):
        return "killed (OOM)"
    return "timed out" if run.get("timed_out") else str(run.get("status", "failed"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", action="append", help=f"repeatable; default: {', '.join(SHAPES)}")
    ap.add_argument("--skew", action="append", help=f"repeatable routing variants; default: {', '.join(SKEWS)}")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--converted", action="store_true", help="flashcli on the converted file too (moe-converted.json)")
    ap.add_argument("--share", action="append", type=float, help=f"repeatable budgets; default: {SHARES}")
    ap.add_argument("--batch", type=int, default=0, help="also --batch with this many sequences at the first share")
    ap.add_argument("--no-llama-limit", action="store_true", help="skip llama.cpp in the limit (no limit only)")
    args = ap.parse_args()
    shares = tuple(args.share or SHARES)
    out = run(
        args.quick,
        args.shape,
        skews=tuple(args.skew or SKEWS),
        converted=args.converted,
        shares=shares,
        llama_limited=not args.no_llama_limit,
        batch=args.batch,
    )
    if args.converted or args.no_llama_limit or args.batch:
        print(json.dumps(out, indent=1, default=str))
    else:
        print(moe_section())


if __name__ == "__main__":
    main()
