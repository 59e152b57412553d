"""The whole path per family at a real shape (issue 33, section 4), with random weights from the
model maker: make the file (Q4_K_M), `flashcli info`, `flashcli convert` (rows), then
`generate --dram-budget 50%` and `perplexity --dram-budget 50%` on the converted file inside a
cgroup limit of the budget plus flashcli's baseline (measured by a first, unlimited run), and
the generated tokens against llama.cpp's greedy tokens on the source.

    sudo .venv/bin/python -m scripts.bench.families [qwen3-0.6b llama-3.2-1b phi-4-mini]

Saves bench-out/families.json. Random weights: the perplexity says the path runs, not quality.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from .cgroup import run_limited
from .runner import OUT, ROOT

SHAPES = ("qwen3-0.6b", "llama-3.2-1b", "phi-4-mini")
PROMPT = "The three primary colors are"
TOKENS = 16
FLASHCLI = [sys.executable, "-m", "flashcli.cli"]


def _run(cmd: list, **kw) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, **kw)
    return {"returncode": r.returncode, "wall_s": time.perf_counter() - t0, "stdout": r.stdout, "stderr": r.stderr}


def _tokens(stdout: str) -> list:
    """Token ids of `generate --json` (one object per token, then the stats)."""
    lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    return [o["token"] for o in lines if "token" in o]


def llama_cpp_greedy(path, prompt: str, n: int) -> list:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import llama_cpp
    from conftest import llama_cpp_greedy as greedy

    llm = llama_cpp(path, n_ctx=256)
    return greedy(llm, llm.tokenize(prompt.encode(), add_bos=True, special=False), n)


def family_path(shape: str) -> dict:
    OUT.mkdir(parents=True, exist_ok=True)
    source = OUT / f"{shape}.Q4_K_M.gguf"
    out = {"shape": shape}
    if not source.exists():
        r = _run([sys.executable, "scripts/make_model.py", shape, "-o", str(source), "--type", "Q4_K_M"])
        out["make"] = {"returncode": r["returncode"], "wall_s": r["wall_s"], "stderr": r["stderr"][-400:]}
    out["file_bytes"] = source.stat().st_size
    info = _run(FLASHCLI + ["info", str(source)])
    out["info"] = {"returncode": info["returncode"], "head": info["stdout"][:600]}
    flash = OUT / f"{shape}.Q4_K_M.flash.gguf"
    conv = _run(FLASHCLI + ["convert", str(source), "-o", str(flash), "--force"])
    out["convert"] = {"returncode": conv["returncode"], "wall_s": conv["wall_s"], "stderr": conv["stderr"][-300:]}
    stats = OUT / f"{shape}.stats.json"
    generate = FLASHCLI + ["generate", str(flash), "-p", PROMPT, "-n", str(TOKENS), "--dram-budget", "50%"]
    generate += ["--draft", "off", "--json", "--stats-json", str(stats)]
    first = _run(generate)
    baseline = json.loads(stats.read_text())["baseline_rss_bytes"] if first["returncode"] == 0 else 0
    limit = out["file_bytes"] // 2 + baseline
    limited = run_limited(generate, limit, drop=False, timeout=900, capture_output=True, text=True, cwd=ROOT)
    s = json.loads(stats.read_text()) if limited["returncode"] == 0 else {}
    out["generate_50pct"] = {
        "returncode": limited["returncode"],
        "limit_bytes": limit,
        "baseline_rss_bytes": baseline,
        "max_usage_bytes": limited["max_usage_bytes"],
        "oom_kills": limited["oom_kills"],
        "peak_rss_bytes": s.get("peak_rss_bytes"),
        "tokens_per_s": s.get("tokens_per_s"),
        "stderr": limited["stderr"][-300:],
    }
    ours = _tokens(limited["stdout"])
    want = llama_cpp_greedy(source, PROMPT, TOKENS)
    out["tokens"] = {"flashcli_50pct": ours, "llama_cpp": want, "identical": ours == want}
    text = ROOT / "tests" / "data" / "heldout.txt"
    ppl_cmd = FLASHCLI + ["perplexity", str(flash), "-f", str(text), "--max-tokens", "256", "--window-tokens", "128"]
    ppl = run_limited(
        ppl_cmd + ["--dram-budget", "50%", "--json"], limit, drop=False, timeout=900, capture_output=True, text=True
    )
    out["perplexity_50pct"] = {k: ppl[k] for k in ("returncode", "max_usage_bytes", "oom_kills", "wall_s")}
    out["perplexity_50pct"]["result"] = ppl["stdout"].strip()[-300:] or ppl["stderr"][-300:]
    return out


def main():
    shapes = sys.argv[1:] or SHAPES
    results = []
    for shape in shapes:
        results.append(family_path(shape))
        print(json.dumps(results[-1])[:2000], flush=True)
    (OUT / "families.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
