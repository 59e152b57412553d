"""What `flashcli generate` reports of a run: the stats line on stderr, the --stats-json file."""

from __future__ import annotations

import json
import os


def write_json(path: str, obj: dict):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def format_stats(stats: dict) -> str:
    parts = [
        f"prompt {stats['prompt_tokens']} tokens ({stats['prompt_tokens_per_s']:.1f} tok/s)",
        f"generated {stats['generated_tokens']} tokens ({stats['tokens_per_s']:.1f} tok/s)",
        f"peak RSS {stats['peak_rss_bytes'] / 2**20:.0f} MiB (baseline {stats['baseline_rss_bytes'] / 2**20:.0f} MiB)",
    ]
    line = "flashcli: " + ", ".join(parts)
    if stats.get("ffn_layout") == "rows":
        line += (
            "\nflashcli: per token: {ms_per_token:.0f} ms, of which {io_wait_ms:.0f} ms waiting for streamed "
            "weights; read {mb:.1f} MB"
        ).format(mb=stats.get("bytes_read_per_token", 0) / 1e6, **stats)
    elif "io_ms" in stats:
        line += (
            "\nflashcli: per token: I/O {io_ms:.1f} ms ({io_wait_ms:.1f} ms not hidden), cache management "
            "{mem_ms:.1f} ms, FFN {ffn_compute_ms:.1f} ms; read {mb:.2f} MB in {reads_per_token:.0f} requests "
            "({ffn_fraction_loaded_per_token:.1%} of the FFN), used {ffn_fraction_used_per_token:.1%} of the "
            "FFN, cache hit rate {cache_hit_rate:.1%}"
        ).format(mb=stats["bytes_read_per_token"] / 1e6, **stats)
    elif stats.get("ffn_layout") == "experts":
        line += (
            "\nflashcli: per token: read {experts_read_per_token:.1f} experts ({mb:.2f} MB), {io_wait_ms:.1f} ms "
            "waiting for reads; expert hit rate {expert_hit_rate:.1%}, {expert_repeat_rate:.0%} of a token's "
            "experts its predecessor's, the hottest tenth of experts {expert_top_decile_share:.0%} of picks"
        ).format(mb=stats["bytes_read_per_token"] / 1e6, **stats)
        if stats.get("experts_warmed"):
            line += "; {experts_warmed} experts hot in calibration read at load in {warm_s:.1f} s".format(**stats)
        if stats.get("experts_prefetched_per_token"):
            line += "; prefetch: {experts_prefetched_per_token:.1f} experts a token, {prefetch_guessed_right:.0%} of guesses used".format(
                **stats
            )
    if stats.get("tokens_per_pass"):
        line += (
            "\nflashcli: speculative ({draft}): {tokens_per_pass:.1f} tokens per pass, {acceptance_rate:.0%} of "
            "drafted tokens accepted, {draft_ms_per_token:.1f} ms per drafted token"
        ).format(**stats)
        line += (
            "\nflashcli: per pass: drafting {pass_draft_ms:.0f} ms, the target's compute {pass_target_compute_ms:.0f} "
            "ms, waiting for reads {pass_io_wait_ms:.0f} ms"
        ).format(**stats)
    return line
