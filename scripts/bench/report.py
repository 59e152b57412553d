"""BENCHMARKS.md and docs/bench/*.png from the section results in bench-out/."""

from __future__ import annotations

import datetime

from .runner import ROOT, load, mib

DOC = ROOT / "BENCHMARKS.md"
CHARTS = ROOT / "docs" / "bench"


def _f(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def _target(ok, text) -> str:
    """A target line; ok None where the run that would tell was not made."""
    return f"- {'NOT RUN' if ok is None else 'PASS' if ok else 'FAIL'}: {text}"


def _status(run: dict) -> str:
    if run.get("status") == "ok":
        return _f(run.get("decode_tok_s"))
    return f"{_f(run.get('decode_tok_s'), '.3f')} ({run.get('status')}, {run.get('tokens', 0)} tokens)"


def write():
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
    for section in (_disk, _dense, _limits, _ablation, _quality, _speculative, _batch):
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
    DOC.write_text("\n".join(parts))
    return DOC


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


def _limits():
    d = load("limits")
    if not d:
        return ""
    f, lu, ll, lnr = d["flashcli"], d["llama_unlimited"], d["llama_limited"], d["llama_limited_no_repack"]
    ft = f.get("telemetry") or {}
    ratio_limited = f["decode_tok_s"] / max(max(ll.get("decode_tok_s") or 0, lnr.get("decode_tok_s") or 0), 1e-9)
    out = [
        "## Under a memory limit: the 1.5B at half its size\n",
        f"`python -m scripts.bench --section limits`: {d['model']} ({mib(d['file_bytes']):.0f} MiB), "
        f"--dram-budget {mib(d['budget_bytes']):.0f} MiB (50% of the file); cgroup limit = budget + flashcli's "
        f"measured baseline ({mib(d['baseline_bytes']):.0f} MiB) = {mib(d['limit_bytes']):.0f} MiB for both "
        f"engines; {d['n']} tokens after a {d['prompt_tokens']}-token chat prompt, greedy; cold cache; "
        f"{d['machine']}. flashcli: median of {f.get('median_of', 1)} runs.\n",
        "| engine | limit | decode tok/s | prompt tok/s | peak RSS / cgroup peak |",
        "|---|---|---|---|---|",
        f"| flashcli (rows: {f['plan']['streamed_tensors'] if f.get('plan') else '?'} FFN tensors streamed) | "
        f"{mib(d['limit_bytes']):.0f} MiB | {_status(f)} | {_f(f.get('prompt_tok_s'), '.1f')} | "
        f"{mib(f.get('peak_rss_bytes') or 0):.0f} / {mib(f.get('max_usage_bytes') or 0):.0f} MiB |",
        f"| llama.cpp, repacking on (default) | {mib(d['limit_bytes']):.0f} MiB | {_status(ll)} | "
        f"{_f(ll.get('prompt_tok_s'), '.1f')} | - / {mib(ll.get('max_usage_bytes') or 0):.0f} MiB |",
        f"| llama.cpp, repacking off | {mib(d['limit_bytes']):.0f} MiB | {_status(lnr)} | "
        f"{_f(lnr.get('prompt_tok_s'), '.1f')} | - / {mib(lnr.get('max_usage_bytes') or 0):.0f} MiB |",
        f"| llama.cpp | none | {_status(lu)} | {_f(lu.get('prompt_tok_s'), '.1f')} | "
        f"{mib(lu.get('peak_rss_bytes') or 0):.0f} MiB |",
        "",
        (
            "- flashcli against llama.cpp's better run under the same limit: "
            + (
                f"{ratio_limited:.1f}x (target >= 30x)."
                if ratio_limited < 1e6
                else "llama.cpp produced no token under this limit (target >= 30x)."
            )
        ),
        f"- flashcli at half the memory against llama.cpp with no limit: "
        f"{f['decode_tok_s'] / max(lu['decode_tok_s'], 1e-9):.2f}x (target >= 0.25x).",
        f"- flashcli per token: {_f(ft.get('ms_per_token'), '.0f')} ms, of which "
        f"{_f(ft.get('io_wait_ms'), '.0f')} ms waiting for streamed FFN weights; "
        f"{mib(ft.get('bytes_read_per_token', 0)):.0f} MiB read per token.",
    ]
    out += _physical_limit(d, ft)
    pf, pl = d.get("prefill_flashcli"), d.get("prefill_llama_unlimited")
    if pf and pl:
        out.append(
            f"- Prefill, a 512-token prompt: flashcli at the 50% budget {_f(pf.get('prompt_tok_s'), '.1f')} tok/s, "
            f"llama.cpp with no limit {_f(pl.get('prompt_tok_s'), '.1f')} tok/s: "
            f"{(pf.get('prompt_tok_s') or 0) / max(pl.get('prompt_tok_s') or 1e-9, 1e-9):.2f}x (target >= 0.5x)."
        )
    for key in [k for k in d if k.startswith("whole_")]:
        w = d[key]
        out.append(
            f"- A budget holding the whole converted file ({key[6:]}): flash "
            f"{_f(w['flash']['decode_tok_s'], '.1f')} tok/s against flashcli's dense engine on the source "
            f"{_f(w['dense']['decode_tok_s'], '.1f')} tok/s: "
            f"{(w['flash']['decode_tok_s'] or 0) / max(w['dense']['decode_tok_s'] or 0, 1e-9):.2f}x (target >= 0.9x)."
        )
    if d.get("sweep"):
        out += [
            "",
            "Tokens/s against the limit (32 tokens, one cold run each; the limit includes flashcli's baseline; "
            "llama.cpp runs cut at the timeout report the rate of the tokens they finished):",
            "",
            "| budget (share of the file) | cgroup limit | flashcli tok/s | llama.cpp tok/s |",
            "|---|---|---|---|",
        ]
        for r in d["sweep"]:
            out.append(
                f"| {r['share']:.0%} | {mib(r['limit_bytes']):.0f} MiB | {_status(r['flashcli'])} | "
                f"{_status(r['llama'])} |"
            )
        chart = _sweep_chart(d)
        if chart:
            out += ["", f"![tokens/s against the memory limit]({chart})"]
    return "\n".join(out) + "\n"


def _physical_limit(d, ft) -> list:
    """ms/token against the larger of: the bytes read at the disk's measured rate for rows
    streaming, and the compute time (flashcli's dense decode with everything resident)."""
    disk = {r.get("pattern"): r["mb_s"] for r in load("disk") or [] if r.get("pattern", "").startswith("sequential")}
    whole = d.get("whole_qwen2.5-coder-1.5b", {}).get("dense", {})
    if not disk or not ft.get("ms_per_token") or not whole.get("decode_tok_s"):
        return []
    lines = []
    compute_ms = 1e3 / whole["decode_tok_s"]
    for pattern, mb_s in disk.items():
        io_ms = ft.get("bytes_read_per_token", 0) / 1e6 / mb_s * 1e3
        lines.append(
            f"- Against the physical limit ({pattern} 1 MiB reads, {mb_s:.0f} MB/s in the disk section): "
            f"the bytes read take {io_ms:.0f} ms per token, the compute {compute_ms:.0f} ms (dense decode); "
            f"flashcli's {ft['ms_per_token']:.0f} ms is {ft['ms_per_token'] / max(io_ms, compute_ms):.2f}x "
            "the larger (target <= 1.3x)."
        )
    return lines


def _sweep_chart(d):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    CHARTS.mkdir(parents=True, exist_ok=True)
    x = [mib(r["limit_bytes"]) for r in d["sweep"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(x, [r["flashcli"].get("decode_tok_s") or 0 for r in d["sweep"]], "o-", label="flashcli")
    ax.plot(x, [r["llama"].get("decode_tok_s") or 0 for r in d["sweep"]], "s-", label="llama.cpp (mmap)")
    ax.set_xlabel("cgroup memory limit (MiB)")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_title(f"{d['model']}, cold cache")
    ax.legend()
    fig.tight_layout()
    path = CHARTS / "tokens_vs_limit.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path.relative_to(ROOT))


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
                f"| {row} | {_f(r.get('median_token_ms'), '.0f')} | {_status(r)} | "
                f"{mib(t.get('bytes_read_per_token', 0)):.1f} | {_f(t.get('io_wait_ms'), '.0f')} | "
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
            f"{r['flash_bytes'] / r['source_bytes']:.3f}x | {_f(r.get('ppl_llama'), '.3f')} | "
            f"{_f(r.get('ppl_flashcli_dense'), '.3f')} | {_f(r.get('ppl_flash'), '.3f')} | "
            f"{_f(r.get('ppl_flash_half_budget'), '.3f')} |"
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


def _speculative():
    d = load("speculative")
    if not d:
        return ""

    def cell(r):  # tok/s (tokens per pass)
        return f"{_status(r)} ({_f(r.get('tokens_per_pass'))})" if r.get("status") == "ok" else _status(r)

    def same(t):  # whether the text is the same with and without drafting; '-' where a run failed
        if any(r.get("status") != "ok" for r in t["runs"].values()):
            return "-"
        return "yes" if t["identical"] else "**no**"

    tasks, med = d["tasks"], d["medians"]
    out = [
        "## Several tokens per pass: speculative decoding at half the model's size\n",
        f"`python -m scripts.bench --section speculative`: {d['model']}, `flashcli generate --dram-budget "
        f"{d['budget_bytes']}` (50% of the file, {mib(d['budget_bytes']):.0f} MiB) `--chat -n {d['n']} --draft "
        f"off|ngram|auto`, through the CLI; cgroup limit = budget + flashcli's measured baseline "
        f"({mib(d['baseline_bytes']):.0f} MiB) = {mib(d['limit_bytes']):.0f} MiB; cold cache; greedy; "
        f"{d['threads']} threads; one run per task and option; {d['machine']}. The draft auto chose: "
        f"{_drafts(tasks)}. Each cell: decode tok/s (tokens per pass over the weights). Same text: the "
        "generated bytes (stdout) are identical across off, ngram and auto.\n",
        "| task | off | ngram | auto | auto / off | auto: acceptance | auto: draft ms/token | MiB read/token "
        "(off, auto) | same text |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in tasks.items():
        r = t["runs"]
        ratio = (r["auto"].get("decode_tok_s") or 0) / max(r["off"].get("decode_tok_s") or 0, 1e-9)
        out.append(
            f"| {name} | {cell(r['off'])} | {cell(r['ngram'])} | {cell(r['auto'])} | {ratio:.2f}x | "
            f"{_f(r['auto'].get('acceptance_rate'), '.0%')} | {_f(r['auto'].get('draft_ms_per_token'), '.1f')} | "
            f"{mib(r['off'].get('bytes_read_per_token') or 0):.0f}, "
            f"{mib(r['auto'].get('bytes_read_per_token') or 0):.0f} | "
            f"{same(t)} |"
        )
    out.append(
        f"| median | {_f(med['off']['decode_tok_s'])} ({_f(med['off']['tokens_per_pass'])}) | "
        f"{_f(med['ngram']['decode_tok_s'])} ({_f(med['ngram']['tokens_per_pass'])}) | "
        f"{_f(med['auto']['decode_tok_s'])} ({_f(med['auto']['tokens_per_pass'])}) | "
        f"{_f(d.get('auto_over_off'))}x | {_f(med['auto']['acceptance_rate'], '.0%')} | "
        f"{_f(med['auto']['draft_ms_per_token'], '.1f')} | "
        f"{mib(med['off']['bytes_read_per_token'] or 0):.0f}, "
        f"{mib(med['auto']['bytes_read_per_token'] or 0):.0f} | "
        f"{'yes' if d['identical_every_task'] else '**no**'} |"
    )
    for name, t in tasks.items():
        for option, r in t["runs"].items():
            if r.get("status") != "ok":
                out.append(f"\n--draft {option}, {name}: {((r.get('error') or '').strip().splitlines() or ['-'])[-1]}")
    peaks = ", ".join(f"{k} {mib(med[k]['max_usage_bytes'] or 0):.0f}" for k in ("off", "ngram", "auto"))
    out += [
        "",
        f"cgroup peak (median, MiB): {peaks}; the limit is {mib(d['limit_bytes']):.0f} MiB.",
        "",
        "llama.cpp with no memory limit (llama-cpp-python, cold cache, the same prompt tokens, greedy; the "
        "speculative runs go through `Llama.generate` with its `draft_model`: `LlamaPromptLookupDecoding`, "
        "or the 0.5B behind a `LlamaDraftModel` that keeps its own KV cache; exact = plain greedy's tokens "
        "on every task):",
        "",
        "| configuration | median tok/s | per task, in the order above: tok/s (tokens per pass) | exact |",
        "|---|---|---|---|",
    ]
    for config, c in d["llama"].items():
        per_task = ", ".join(
            f"{_status(r)} ({_f((r.get('telemetry') or {}).get('tokens_per_pass', 1.0))})"
            if r.get("status") == "ok"
            else _status(r)
            for r in c["tasks"].values()
        )
        best = " (best)" if config == d.get("llama_best") else ""
        exact = {True: "yes", False: "**no**", None: "-"}[c["exact"]]
        out.append(f"| {config}{best} | {_f(c['median_tok_s'])} | {per_task} | {exact} |")
    if any(c["exact"] is False for c in d["llama"].values()):
        out.append(
            "\nNot exact: llama.cpp verifies drafted tokens as one batch, and its batched matrix products "
            "round differently from one token at a time (and differently by batch size), so where the top "
            "two logits nearly tie, its speculative text leaves its own plain greedy text. flashcli's "
            "verification splits products into batches whose columns round as one token's (flashcli/kernels.py)."
        )
    errors = {
        f"{config}, {task}": r.get("error")
        for config, c in d["llama"].items()
        for task, r in c["tasks"].items()
        if r.get("status") != "ok"
    }
    for where, error in errors.items():
        out.append(f"\n{where}: {((error or '').strip().splitlines() or ['failed, no message'])[-1]}")
    best = d["llama"][d["llama_best"]]["median_tok_s"] if d.get("llama_best") else None
    differ = [name for name, t in tasks.items() if same(t) != "yes"]
    w = d["whole"]
    out += [
        "",
        "Targets:",
        "",
        _target(
            (d.get("auto_over_off") or 0) >= 2.5,
            f"auto at 50%: median {_f(med['auto']['decode_tok_s'])} tok/s against off's "
            f"{_f(med['off']['decode_tok_s'])}: {_f(d.get('auto_over_off'))}x (target >= 2.5x).",
        ),
        _target(
            (d.get("auto_over_llama_best") or 0) >= 0.35,
            f"auto at 50% against llama.cpp's best with no limit ({d.get('llama_best')}, {_f(best)} tok/s): "
            f"{_f(d.get('auto_over_llama_best'))}x (target >= 0.35x).",
        ),
        _target(
            d["identical_every_task"],
            "byte-identical text with and without drafting on every task"
            + ("." if not differ else f": not on {', '.join(differ)} (different text, or a run failed)."),
        ),
        _target(
            (d.get("whole_auto_over_off") or 0) >= 1.0,
            f"whole model in budget ({mib(w['budget_bytes']):.0f} MiB, twice the converted file): auto "
            f"{_f(w['medians']['auto']['decode_tok_s'])} tok/s ({_f(w['medians']['auto']['tokens_per_pass'])} "
            f"tokens per pass) against off {_f(w['medians']['off']['decode_tok_s'])}: "
            f"{_f(d.get('whole_auto_over_off'))}x (target >= 1.0x; auto's draft: {_drafts(w['tasks'])}); "
            "same text on every task: "
            f"{'yes' if all(t['identical'] for t in w['tasks'].values()) else 'no'}.",
        ),
    ]
    return "\n".join(out) + "\n"


def _drafts(tasks: dict) -> str:
    """What --draft auto ran with, by the stats' `draft` (a path, 'ngram', or none)."""
    chosen = {
        str(r["runs"]["auto"].get("draft") or "none").rsplit("/", 1)[-1]
        for r in tasks.values()
        if r["runs"]["auto"].get("status") == "ok"
    }
    return " / ".join(sorted(chosen)) or "-"


def _batch():
    from .batch_report import section  # the section's own module renders it

    return section(load("batch"))
