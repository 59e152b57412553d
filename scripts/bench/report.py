"""BENCHMARKS.md and docs/bench/*.png from the section results in bench-out/."""

from __future__ import annotations

import datetime

from . import columns, moe, report_decoding, report_limits, scale_report
from .cells import number, speed
from .runner import ROOT, load, mib

DOC = ROOT / "BENCHMARKS.md"


def write(doc=DOC):
    parts = [
        f"# flashcli benchmarks\n\nMade by `python -m scripts.bench` (`make bench`) on "
        f"{datetime.date.today().isoformat()}. Every figure below comes from the results in bench-out/ "
        "of that run; the command of each section is given with it. Speed runs start from a cold page "
        "cache (dropped before each run), wait for quiet CPUs, and run in a cgroup v1 memory group where "
        "a limit is given (scripts/bench/cgroup.py). Two threads for both engines throughout. The disk "
        "is a virtual disk whose host may cache: cold in the guest is not cold on the host, and "
        "throughput varies from run to run.\n"
    ]
    missing = []
    sections = (
        _disk,
        _dense,
        report_limits.limits,
        _ablation,
        _quality,
        report_decoding.speculative,
        report_decoding.batch,
        columns.columns_section,
        scale_report.scale,
        moe.moe_section,
    )
    for section in sections:
        text = section()
        if text:
            parts.append(text)
        else:
            missing.append(section.__name__.strip("_"))
    if missing:
        parts.append(
            f"## Not in this run\n\nSections {', '.join(missing)} were not run this time (no results in "
            "bench-out/); the last run that made them is in the history: `git log -p BENCHMARKS.md`.\n"
        )
    doc.parent.mkdir(exist_ok=True)
    doc.write_text("\n".join(parts))
    return doc


def _disk():
    rows = load("disk")
    if not rows:
        return ""
    out = [
        "## The disk's cost model\n",
        "`python -m scripts.bench --section disk`: O_DIRECT reads of one size at "
        "random 4 KiB-aligned offsets of the 1.5B's file, from N threads.\n",
        "| read size | threads | offsets | MB/s | reads/s |",
        "|---|---|---|---|---|",
    ]
    out += [
        f"| {r['size'] // 1024} KiB | {r['threads']} | {r.get('pattern', 'random')} | {r['mb_s']:.0f} | "
        f"{r['iops']:.0f} |"
        for r in rows
    ]
    return "\n".join(out) + "\n"


def _dense():
    rows = load("dense")
    if not rows:
        return ""
    out = [
        "## Dense decode against llama.cpp\n",
        "`python -m scripts.bench --section dense`: warm cache, 2 threads, "
        "a 16-token prompt then single tokens; the median per-token time, median of three rounds with the "
        "engines alternating. Target: >= 0.9x on the 1.5B and the 1.1B synthetic Q4_0.\n",
        "| model | llama.cpp tok/s | flashcli tok/s | ratio |",
        "|---|---|---|---|",
    ]
    out += [f"| {r['model']} | {r['llama_tok_s']:.1f} | {r['flashcli_tok_s']:.1f} | {r['ratio']:.2f}x |" for r in rows]
    return "\n".join(out) + "\n"


def _ablation():
    d = load("ablation")
    if not d:
        return ""
    out = [
        "## The paper's ablation table\n",
        "`python -m scripts.bench --section ablation`: the same binary, "
        "`--ablation NAME`; cold cache; cgroup limit = budget + baseline; median of three runs of 32 tokens "
        "after a chat prompt. I/O wait = time the computation waited for reads (reads overlap compute "
        "in 'all').\n",
    ]
    for name, m in d.items():
        out += [
            f"### {name} at {m['share']:.0%} of its file ({mib(m['budget_bytes']):.0f} MiB)\n",
            "| configuration | ms/token | tok/s | MiB read/token | I/O wait ms | FFN used |",
            "|---|---|---|---|---|---|",
        ]
        for row, r in m["rows"].items():
            t = r.get("telemetry") or {}
            used = t.get("ffn_fraction_used_per_token")
            out.append(
                f"| {row} | {number(r.get('median_token_ms'), '.0f')} | {speed(r)} | "
                f"{mib(t.get('bytes_read_per_token', 0)):.1f} | {number(t.get('io_wait_ms'), '.0f')} | "
                f"{'-' if used is None else format(used, '.0%')} |"
            )
        if (m["rows"]["all"].get("telemetry") or {}).get("ffn_layout") == "rows":
            out.append(
                "\nA rows file has no predictor, window or bundling: naive streams every FFN tensor at every "
                "token, hybrid holds half the layers' FFN resident, predictor/window/bundling are the same "
                "configuration (the budget's full resident share, no read-ahead; their spread is the "
                "disk's run-to-run noise), all adds the read-ahead ring."
            )
        naive, best = m["rows"]["naive"].get("median_token_ms"), m["rows"]["all"].get("median_token_ms")
        if naive and best:
            out.append(f"\nall against naive: {naive / best:.2f}x.\n")
    return "\n".join(out) + "\n"


def _quality():
    d = load("quality")
    if not d:
        return ""
    out = [
        "## Quality and size\n",
        "`python -m scripts.bench --section quality`: perplexity on 1024 tokens of "
        "tests/data/heldout.txt (text not used for calibration), windows of 512 tokens, every token after a "
        "window's first scored; llama.cpp's number from llama-cpp-python's logits under the same protocol.\n",
        "| model | source MiB | converted MiB | ratio | llama.cpp | flashcli dense | flash (no budget) | "
        "flash at 50% | ",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in d["models"]:
        out.append(
            f"| {r['model']} | {mib(r['source_bytes']):.1f} | {mib(r['flash_bytes']):.1f} | "
            f"{r['flash_bytes'] / r['source_bytes']:.3f}x | {number(r.get('ppl_llama'), '.3f')} | "
            f"{number(r.get('ppl_flashcli_dense'), '.3f')} | {number(r.get('ppl_flash'), '.3f')} | "
            f"{number(r.get('ppl_flash_half_budget'), '.3f')} |"
        )
    for r in d["models"]:
        if r.get("half_budget_refused"):
            out.append(f"\n{r['model']} at 50%: refused, {r['half_budget_refused'].split(': ', 1)[-1]}")
    relu = [r for r in d["models"] if r["model"] == "relu-fixture"]
    if relu:
        r = relu[0]
        out.append(
            f"\nReLU fixture (bundles): every neuron {r['ppl_flash_all_neurons']:.3f}, the predicted ones "
            f"(default) {r['ppl_flash']:.3f} using {r['used']:.1%} of the FFN per token, against "
            f"{r['ppl_flashcli_dense']:.3f} dense."
        )
    if d["sparsity"]:
        out += [
            "",
            "`--sparsity S` (the share of neurons skipped per token, by predicted score), ReLU fixture:",
            "",
            "| sparsity | FFN used per token | perplexity | change |",
            "|---|---|---|---|",
        ]
        for r in d["sparsity"]:
            out.append(
                f"| {r['sparsity']} | {r['used']:.1%} | {r['ppl']:.3f} | {100 * (r['ppl'] / r['dense'] - 1):+.1f}% |"
            )
    if d["down_types"]:
        out += [
            "",
            "Bundles' down columns by type (every neuron used, against the dense source):",
            "",
            "| model | down columns | file | size | perplexity | change |",
            "|---|---|---|---|---|---|",
        ]
        for r in d["down_types"]:
            out.append(
                f"| {r['model']} | {r['down_type']} | {mib(r['bytes']):.1f} MiB | "
                f"{r['bytes'] / r['source_bytes']:.3f}x | {r['ppl_all_neurons']:.3f} | "
                f"{100 * (r['ppl_all_neurons'] / r['dense'] - 1):+.1f}% |"
            )
    return "\n".join(out) + "\n"
