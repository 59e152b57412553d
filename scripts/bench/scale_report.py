"""The scale section of BENCHMARKS.md, from bench-out/scale.json (scripts/bench/scale.py)."""

from __future__ import annotations

from .cells import number, speed, target
from .runner import load, mib


def scale() -> str:
    d = load("scale")
    if not d or not d.get("sizes"):
        return ""
    out = [
        "## The paper's scale: 8B and 14B models at half and a quarter of their size\n",
        "`python -m scripts.bench --section scale` (scripts/bench/scale.py): llama-3.1-8b and qwen3-14b "
        "shapes at Q4_K_M made by scripts/make_model.py (random weights: speed, memory and exactness, not "
        "quality), converted, then `flashcli generate --dram-budget B -n N --draft off` through the CLI, one "
        "stream, greedy, cold cache, cgroup limit = budget + flashcli's measured baseline; llama.cpp in the "
        "same limit on the same file (its default, and memory-mapped with repacking off), capped in time. "
        "The disk's rate: sequential O_DIRECT 1 MiB reads from 4 threads on the same file, in the same run. "
        "Disk-bound limit: the non-resident bytes per token at that rate plus a resident run's time per "
        f"token. {d['threads']} threads; {d['machine']}"
        + (" (a --quick smoke run, not for the record)." if d.get("quick") else ".")
        + "\n",
    ]
    for name, s in d["sizes"].items():
        out += _size(name, s)
    return "\n".join(out) + "\n"


def _size(name: str, s: dict) -> list[str]:
    if "skipped" in s:
        return [f"### {name}\n", f"Skipped: {s['skipped']}.\n"]
    disk, conv = s["disk"], s["convert"]
    made = f", made in {s['make_s']:.0f} s" if s.get("make_s") else ""
    if "error" in conv:
        return [
            f"### {name} ({s['model']}, {s['file_bytes'] / 1e9:.2f} GB{made})\n",
            f"Not converted: {conv['error']}\n",
        ]
    rate_share = conv["mb_s"] / disk["mb_s"]
    out = [
        f"### {name} ({s['model']}, {s['file_bytes'] / 1e9:.2f} GB{made})\n",
        f"Disk: {disk['mb_s']:.0f} MB/s sequential. `flashcli convert`: {conv['wall_s']:.1f} s "
        f"({conv['mb_s']:.0f} MB/s of source, {rate_share:.2f}x the disk's rate), peak RSS "
        f"{mib(conv['peak_rss_bytes']):.0f} MiB. Baseline {mib(s['baseline_bytes']):.0f} MiB. "
        f"{len(s['prompts'])} prompts, {s['n']} tokens.\n",
        target(conv["peak_rss_bytes"] < 2**30, "convert's peak RSS under 1 GiB"),
        target(rate_share >= 0.5, "convert at least half the disk's sequential rate"),
        "",
    ]
    llama = s.get("llama_unlimited", {})
    resident = s["resident"][0] if s.get("resident") else {}
    out.append(
        f"Unconstrained: flashcli resident {number(resident.get('stats', {}).get('tokens_per_s'))} tok/s, "
        f"llama.cpp warm {number(_mean(r.get('decode_tok_s') for r in llama.get('runs', [])))} tok/s.\n"
    )
    out += [
        "| budget | flashcli tok/s | first token s | read MB/token (plan, non-resident) | io wait ms/token | "
        "disk share | disk-bound tok/s | x disk bound | llama.cpp default | llama.cpp mmap | x mmap | "
        "same tokens as resident | as llama.cpp |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    shares = s.get("shares", {})
    for share, row in shares.items():
        first = row["runs"][0]
        st = first.get("stats", {})
        read = st.get("bytes_read_per_token")
        plan, nonres = row.get("plan_streamed_bytes"), row.get("non_resident_bytes")
        tok_s = number(st.get("tokens_per_s")) if first.get("status") == "ok" else first.get("status")
        n_prompts = len(row["runs"])
        out.append(
            f"| {float(share):.0%} ({mib(row['budget_bytes']):.0f} MiB) | {tok_s} | "
            f"{number(first.get('first_token_s'), '.1f')} | {number(None if read is None else read / 1e6, '.0f')} "
            f"({number(None if plan is None else plan / 1e6, '.0f')}, {number(None if nonres is None else nonres / 1e6, '.0f')}) | "
            f"{number(st.get('io_wait_ms'), '.0f')} | {number(row.get('disk_share'))} | "
            f"{number(row.get('disk_bound_tok_s'))} | {number(row.get('over_disk_bound'))} | "
            f"{speed(row['llama_default'])} | {speed(row['llama_mmap'])} | {number(row.get('over_llama_mmap'), '.1f')} | "
            f"{_count(row.get('same_as_resident'), n_prompts)} | {_count(row.get('same_as_llama'), n_prompts)} |"
        )
    half = shares.get("0.5", {})
    out += [
        "",
        target(_at_least(half.get("over_disk_bound"), 0.8), "at 50%, at least 0.8x the disk-bound limit"),
        target(_at_least(half.get("over_llama_mmap"), 5.0), "at 50%, at least 5x llama.cpp memory-mapped"),
        target(
            None
            if not shares
            else all(_all(r, "same_as_resident") and _all(r, "same_as_llama") for r in shares.values()),
            "at 50% and 25%, greedy tokens identical to flashcli resident and llama.cpp unconstrained",
        ),
        "",
    ]
    if s.get("batch"):
        out += _batch(s["batch"])
    return out


def _batch(b: dict) -> list[str]:
    llama = {r["parallel"]: r for r in b["llama"]["runs"]}
    batched = {r["parallel"]: r for r in b["batched"]}
    out = [
        f"`--batch` at 50% ({mib(b['budget_bytes']):.0f} MiB), {b['prompt_count']} prompts of {b['n']} tokens; "
        "aggregate tok/s (every generated token over the process's wall time) against llama.cpp's batched "
        "decoding warm with no limit; in brackets, over flashcli's generation alone (first pass to last: its "
        "load outside the timing and the prompts inside, as llama.cpp's are timed):\n",
        "| sequences | default | --batched-products | llama.cpp batched | best / llama.cpp's best | "
        "default / llama.cpp's best, load outside |",
        "|---|---|---|---|---|---|",
    ]
    best_ratio = None
    for r in b["exact"]:
        p = r["parallel"]
        other = batched.get(p, {})
        ratios = [x for x in (r.get("over_llama_best"), other.get("over_llama_best")) if x]
        ratio = max(ratios) if ratios else None
        # the target is the default mode's: the one whose texts are each prompt's own
        best_ratio = max(best_ratio or 0, r.get("over_llama_best") or 0) or best_ratio
        out.append(
            f"| {p} | {_agg(r)} ({number(r.get('generation_tok_s'))}) | {_agg(other)} "
            f"({number(other.get('generation_tok_s'))}) | {number(llama.get(p, {}).get('aggregate_tok_s'))} | "
            f"{number(ratio)} | {number(r.get('generation_over_llama_best'))} |"
        )
    return out + [
        "",
        target(_at_least(best_ratio, 1.0), "the default mode's best at least 1.0x llama.cpp's batched decoding"),
        "",
    ]


def _agg(r: dict) -> str:
    if not r:
        return "-"
    return number(r.get("aggregate_tok_s")) if r.get("status") == "ok" else f"{r.get('status')}"


def _count(x, n) -> str:
    return "-" if x is None else f"{x}/{n}"


def _all(row: dict, key: str) -> bool:
    return row.get(key) is not None and row[key] == len(row["runs"])


def _at_least(x, bound):
    return None if x is None else x >= bound


def _mean(values):
    values = [v for v in values if v]
    return sum(values) / len(values) if values else None
