"""BENCHMARKS.md's sections on several tokens per pass (speculative) and many prompts at once (batch)."""

from __future__ import annotations

from . import batch_report
from .cells import number, speed, target
from .runner import load, mib


def speculative():
    d = load("speculative")
    if not d or "budgets" not in d:
        return ""

    def cell(r):  # tok/s (tokens per pass)
        return f"{speed(r)} ({number(r.get('tokens_per_pass'))})" if r.get("status") == "ok" else speed(r)

    def same(t):  # whether the text is the same across off, ngram and auto; '-' where a run failed
        if any(r.get("status") != "ok" for r in t["runs"].values()):
            return "-"
        return "yes" if t["identical"] else "**no**"

    llama = d["llama"]
    per_task = ", ".join(f"{k} {number(v.get('decode_tok_s'))}" for k, v in llama.get("tasks", {}).items())
    out = [
        "## Several tokens per pass: speculative decoding under a budget\n",
        f"`python -m scripts.bench --section speculative`: {d['model']} converted, `flashcli generate "
        f"--dram-budget B --chat -n {d['n']} --draft off|ngram|auto` through the CLI, auto drafting with "
        f"{d['draft_model']} (`flashcli convert --layout draft`: a head of the 32768 most frequent tokens, "
        f"matrices without repacked kernels re-encoded to Q4_0); cgroup limit = budget + flashcli's measured "
        f"baseline ({mib(d['baseline_bytes']):.0f} MiB); cold cache; greedy; {d['threads']} threads; one run "
        f"per task and option; {d['machine']}. Each cell: decode tok/s (tokens per pass). Same text: stdout "
        "identical across off, ngram and auto.\n",
        f"Reference, same run: llama.cpp warm, no memory limit, its decode loop in C calls (llama_decode and "
        f"its greedy sampler chain), prompt outside the timing (`scripts/bench/llama_warm.py`): median "
        f"**{number(llama.get('median_tok_s'))} tok/s** over the tasks "
        f"({per_task}).",
        "",
    ]
    for share, b in d["budgets"].items():
        med = b["medians"]
        out += [
            f"### {share} of the file (budget {mib(b['budget_bytes']):.0f} MiB, limit {mib(b['limit_bytes']):.0f} MiB)\n",
            "| task | off | ngram | auto | auto / off | acceptance | per pass: draft / target compute / "
            "waiting, ms | MiB read/token (off, auto) | same text |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, t in b["tasks"].items():
            r = t["runs"]
            ratio = (r["auto"].get("decode_tok_s") or 0) / max(r["off"].get("decode_tok_s") or 0, 1e-9)
            a = r["auto"]
            out.append(
                f"| {name} | {cell(r['off'])} | {cell(r['ngram'])} | {cell(a)} | {ratio:.2f}x | "
                f"{number(a.get('acceptance_rate'), '.0%')} | {number(a.get('pass_draft_ms'), '.0f')} / "
                f"{number(a.get('pass_target_compute_ms'), '.0f')} / {number(a.get('pass_io_wait_ms'), '.0f')} | "
                f"{mib(r['off'].get('bytes_read_per_token') or 0):.0f}, {mib(a.get('bytes_read_per_token') or 0):.0f} "
                f"| {same(t)} |"
            )
        out += [
            f"| median | {number(med['off']['decode_tok_s'])} | {number(med['ngram']['decode_tok_s'])} "
            f"({number(med['ngram']['tokens_per_pass'])}) | {number(med['auto']['decode_tok_s'])} "
            f"({number(med['auto']['tokens_per_pass'])}) | {number(b.get('auto_over_off'))}x | "
            f"{number(med['auto']['acceptance_rate'], '.0%')} | | | "
            f"{'yes' if b['identical_every_task'] else '**no**'} |",
            "",
            f"auto against llama.cpp warm: {number(b.get('auto_over_llama'))}x; cgroup peak (median, MiB): "
            + ", ".join(f"{k} {mib(med[k]['max_usage_bytes'] or 0):.0f}" for k in ("off", "ngram", "auto"))
            + f" (limit {mib(b['limit_bytes']):.0f}).",
            "",
        ]
    half = d["budgets"].get("50%", {})
    w = d["whole"]["medians"]
    out += [
        f"Whole model in budget ({mib(d['whole']['budget_bytes']):.0f} MiB): off {number(w['off']['decode_tok_s'])}, "
        f"auto {number(w['auto']['decode_tok_s'])} tok/s ({number(d.get('whole_auto_over_off'))}x).",
        "",
        "Targets (issue 23, at 50%):",
        target(
            half.get("auto_over_off") and half["auto_over_off"] >= 2.5,
            f"auto >= 2.5x --draft off ({number(half.get('auto_over_off'))}x)",
        ),
        target(
            half.get("auto_over_llama") and half["auto_over_llama"] >= 0.5,
            f"auto >= 0.5x llama.cpp warm unlimited ({number(half.get('auto_over_llama'))}x)",
        ),
        target(half.get("identical_every_task"), "identical greedy text with and without the draft on every task"),
    ]
    return "\n".join(out) + "\n"


def batch():
    return batch_report.section(load("batch"))
