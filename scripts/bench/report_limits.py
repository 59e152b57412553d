"""BENCHMARKS.md's section on the 1.5B under a memory limit, and its chart of tokens/s against the limit."""

from __future__ import annotations

from .cells import number, speed
from .runner import ROOT, load, mib

CHARTS = ROOT / "docs" / "bench"


def limits():
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
        f"{mib(d['limit_bytes']):.0f} MiB | {speed(f)} | {number(f.get('prompt_tok_s'), '.1f')} | "
        f"{mib(f.get('peak_rss_bytes') or 0):.0f} / {mib(f.get('max_usage_bytes') or 0):.0f} MiB |",
        f"| llama.cpp, repacking on (default) | {mib(d['limit_bytes']):.0f} MiB | {speed(ll)} | "
        f"{number(ll.get('prompt_tok_s'), '.1f')} | - / {mib(ll.get('max_usage_bytes') or 0):.0f} MiB |",
        f"| llama.cpp, repacking off | {mib(d['limit_bytes']):.0f} MiB | {speed(lnr)} | "
        f"{number(lnr.get('prompt_tok_s'), '.1f')} | - / {mib(lnr.get('max_usage_bytes') or 0):.0f} MiB |",
        f"| llama.cpp | none | {speed(lu)} | {number(lu.get('prompt_tok_s'), '.1f')} | "
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
        f"- flashcli per token: {number(ft.get('ms_per_token'), '.0f')} ms, of which "
        f"{number(ft.get('io_wait_ms'), '.0f')} ms waiting for streamed FFN weights; "
        f"{mib(ft.get('bytes_read_per_token', 0)):.0f} MiB read per token.",
    ]
    out += _physical_limit(d, ft)
    pf, pl = d.get("prefill_flashcli"), d.get("prefill_llama_unlimited")
    if pf and pl:
        out.append(
            f"- Prefill, a 512-token prompt: flashcli at the 50% budget {number(pf.get('prompt_tok_s'), '.1f')} tok/s, "
            f"llama.cpp with no limit {number(pl.get('prompt_tok_s'), '.1f')} tok/s: "
            f"{(pf.get('prompt_tok_s') or 0) / max(pl.get('prompt_tok_s') or 1e-9, 1e-9):.2f}x (target >= 0.5x)."
        )
    for key in [k for k in d if k.startswith("whole_")]:
        w = d[key]
        out.append(
            f"- A budget holding the whole converted file ({key[6:]}): flash "
            f"{number(w['flash']['decode_tok_s'], '.1f')} tok/s against flashcli's dense engine on the source "
            f"{number(w['dense']['decode_tok_s'], '.1f')} tok/s: "
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
                f"| {r['share']:.0%} | {mib(r['limit_bytes']):.0f} MiB | {speed(r['flashcli'])} | {speed(r['llama'])} |"
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
