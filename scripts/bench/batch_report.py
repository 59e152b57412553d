"""The batch section of BENCHMARKS.md, from bench-out/batch.json (scripts/bench/batch.py)."""

from __future__ import annotations

from .cells import number as _f
from .cells import target as _target
from .runner import mib


def section(d: dict | None) -> str:
    if not d:
        return ""
    count, llama = d["prompt_count"], d["llama"]
    exact = {r["parallel"]: r for r in d["exact"]}
    undrafted = {r["parallel"]: r for r in d.get("undrafted", [])}
    batched = {r["parallel"]: r for r in d["batched"]}
    lruns = {r["parallel"]: r for r in llama["runs"]}
    best_llama = max(lruns.values(), key=lambda r: r["aggregate_tok_s"], default=None)

    def speed(r):  # aggregate tok/s, and how far a failed run got
        if r.get("status") == "ok":
            return _f(r["aggregate_tok_s"])
        return (
            f"{_f(r.get('aggregate_tok_s'))} ({r.get('status')}, {count - len(r.get('missing', []))}/{count} prompts)"
        )

    def times(x):
        return "-" if x is None else f"{x:.2f}x"

    def row(name, r):
        read = r.get("bytes_read_per_generated_token")
        peak = f"{mib(r['max_usage_bytes']):.0f}" if r.get("max_usage_bytes") else "-"
        stats = r.get("stats") or {}
        drafting = "drafted_tokens" in stats and r.get("draft") != "off" and not r.get("batched_products")
        taken = f"{stats['accepted_tokens']}/{stats['drafted_tokens']}" if drafting else "-"
        return (
            f"| {name} | {speed(r)} | {times(r.get('over_llama_single'))} | {times(r.get('over_llama_best'))} | "
            f"{_f(None if read is None else mib(read), '.1f')} | {peak} | {r['same_as_parallel_1']}/{count} | {taken} |"
        )

    out = [
        "## Many prompts at once: batched decoding at half the model's size\n",
        f"`python -m scripts.bench --section batch`: {d['model']} (run from its converted {d['flash_model']}), "
        f"`flashcli generate --batch PROMPTS --parallel N --dram-budget {d['budget_bytes']}` "
        f"({d['budget_bytes'] / d['file_bytes']:.0%} of the file, {mib(d['budget_bytes']):.0f} MiB) `--chat -n {d['n']}`, through the CLI; {count} short "
        f"coding questions ({d['prompts_file']}); cgroup limit = budget + flashcli's measured baseline "
        f"({mib(d['baseline_bytes']):.0f} MiB) = {mib(d['limit_bytes']):.0f} MiB; cold cache; greedy; "
        f"{d['threads']} threads; one run per row; the most sequences the budget holds here: "
        f"{d['most_sequences']}; {d['machine']}"
        + (" (a --quick run: fewer prompts and tokens, not for the record)" if d.get("quick") else "")
        + ". Aggregate tok/s: every generated token over the wall time of the process, load and prefill "
        "included. MiB read: the run's bytes read over its generated tokens, prefill included. Peak: the "
        "cgroup's (memory.max_usage_in_bytes, page cache included). Same text: prompts whose text is "
        "byte-identical to --parallel 1's (one prompt at a time). `--batched-products` multiplies a pass's "
        "tokens as one batch on ggml's batched kernels (opt-in: a text may then differ from its own run). "
        "The default `--draft auto` drafts tokens by n-gram lookup for a pass that waits for its reads "
        "(verified with the bits each gets alone); `--draft off` rows: without. Drafted tokens taken: of "
        "those drafted, how many the sequences took.\n",
        "llama.cpp: llama-cpp-python's low-level API with no memory limit, warm (loaded once and warmed by a "
        "prompt), the same chat-templated prompt tokens, greedy; its batched decoding as llama-server -np N: "
        "N sequences in one context, one llama_decode a step with every live sequence's next token and the "
        "prompts that join; N = 1 is one prompt at a time. Its tok/s: generated tokens over the time from the "
        f"first prompt to the last token (prefill included, the load of {_f(llama.get('load_s'))} s excluded).\n",
        "| run | aggregate tok/s | x llama.cpp one at a time | x llama.cpp batched, its best | "
        "MiB read per generated token | peak MiB | same text as parallel 1 | drafted tokens taken |",
        "|---|---|---|---|---|---|---|---|",
    ]
    out += [row(f"--parallel {p}", r) for p, r in exact.items()]
    out += [row(f"--parallel {p} --draft off", r) for p, r in undrafted.items()]
    out += [row(f"--parallel {p} --batched-products", r) for p, r in batched.items()]
    out += [row(f"llama.cpp, {p} sequence{'s' * (p > 1)}, no limit, warm", r) for p, r in lruns.items()]
    if llama.get("status") != "ok":
        out.append(f"\nllama.cpp: {llama.get('status')}: {(llama.get('error') or '').strip()[-300:]}")
    for name, r in (
        [(f"--parallel {p}", r) for p, r in exact.items()]
        + [(f"--parallel {p} --draft off", r) for p, r in undrafted.items()]
        + [(f"--parallel {p} --batched-products", r) for p, r in batched.items()]
    ):
        if r.get("status") != "ok":
            out.append(f"\n{name}: {((r.get('error') or '').strip().splitlines() or ['failed, no message'])[-1]}")
        for i, error in (r.get("prompt_errors") or {}).items():
            out.append(f"\n{name}, {i}: {error}")

    out += ["", "`--batched-products` against the default mode (the text each prompt gets alone):", ""]
    for p, r in batched.items():
        div = r.get("divergence") or {}
        differ = sorted(v for v in div.values() if v is not None)
        out.append(
            f"- --parallel {p}: {len(div) - len(differ)}/{len(div)} texts identical; where they differ, the "
            f"first difference after {', '.join(map(str, differ)) or '-'} tokens (texts re-tokenized)."
        )
    ppl = d.get("perplexity")
    if ppl:
        out.append(
            f"- Perplexity of tests/data/heldout.txt decoded through passes of {ppl['sequences']} sequences "
            f"({ppl['prefix']} tokens of prefill each, then {ppl['steps']} passes of one token of each, "
            f"teacher-forced): {ppl['exact']['perplexity']:.4f} in the default mode, "
            f"{ppl['batched_products']['perplexity']:.4f} with batched products; the same top token at "
            f"{ppl['same_argmax_share']:.1%} of positions, log-probabilities at most "
            f"{ppl['max_abs_logprob_diff']:.4f} apart. (`flashcli perplexity` would not tell: it evaluates "
            "windows as prompt batches, multiplied whole in both modes.)"
        )

    def ratio(r, key, target):
        return None if r is None or r.get(key) is None else r[key] >= target

    default = list(exact.values()) + list(undrafted.values())
    best = max(default, key=lambda r: r.get("aggregate_tok_s") or 0)
    differ = [str(r["parallel"]) for r in default if r["status"] != "ok" or r["same_as_parallel_1"] != count]
    within = [
        r.get("status") == "ok" and not r["oom_kills"] and r["max_usage_bytes"] <= r["limit_bytes"]
        for r in default + list(batched.values())
    ]
    lbest = (
        "-" if best_llama is None else f"{best_llama['parallel']} sequences, {_f(best_llama['aggregate_tok_s'])} tok/s"
    )
    out += [
        "",
        "Targets:",
        "",
        _target(
            ratio(exact.get(8), "over_llama_single", 1.0),
            f"--parallel 8 at 50% (the default mode, --draft auto) against llama.cpp one prompt at a time, warm, "
            f"no limit: {times(exact.get(8, {}).get('over_llama_single'))} (target >= 1.0x).",
        ),
        _target(
            ratio(best, "over_llama_best", 0.6),
            f"the best --parallel in the default mode ({best['parallel']}, --draft {best.get('draft', 'off')}) against llama.cpp's batched decoding at "
            f"its best ({lbest}): {times(best.get('over_llama_best'))} (target >= 0.6x).",
        ),
        _target(
            d["identical_every_prompt"],
            "every prompt's text in the default mode identical to --parallel 1's at every --parallel"
            + ("." if not differ else f": not at --parallel {', '.join(differ)} (different text, or a run failed)."),
        ),
        _target(all(within), "every run's peak within its cgroup limit, no OOM kill."),
    ]
    return "\n".join(out) + "\n"
