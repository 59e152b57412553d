"""Quality and size: perplexity of flash generation against llama.cpp's dense perplexity on the
same GGUF (held-out text: tests/data/heldout.txt, windows of 512, every token after a window's
first scored), file sizes, bytes per neuron, and the bundles' down-column types."""

from __future__ import annotations

import os
import subprocess
import sys

from . import runner
from .limits import flash_file
from .runner import ROOT

N_TOKENS = 1024


def ppl_flashcli(path, budget=None, **options) -> dict:
    from dataclasses import replace

    from flashcli.decoding.loader import LoadOptions, load
    from flashcli.decoding.perplexity import perplexity
    from flashcli.flash.flash_model import FlashOptions

    flash = replace(FlashOptions(), **options)
    model = load(path, LoadOptions(dram_budget=budget, threads=2, n_ctx=512, flash=flash, all_logits=True)).model
    tokens = runner.text_tokens(path, N_TOKENS)
    result = perplexity(model, tokens, window=512)
    result.update(getattr(model, "telemetry", lambda: {})())
    return result


def half_budget(flash) -> dict:
    """Perplexity at a budget of 50% of the file, or why that budget is refused."""
    from flashcli.errors import BudgetTooSmall

    try:
        return {"ppl_flash_half_budget": ppl_flashcli(flash, os.path.getsize(flash) // 2)["perplexity"]}
    except BudgetTooSmall as e:
        return {"ppl_flash_half_budget": None, "half_budget_refused": str(e)}


def ppl_llama(path) -> float:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import llama_cpp, llama_cpp_perplexity

    return llama_cpp_perplexity(llama_cpp(path, n_ctx=512), runner.text_tokens(path, N_TOKENS), window=512)


def converted(source, suffix: str, *args) -> str:
    out = str(ROOT / "bench-out" / f"{os.path.basename(str(source))[: -len('.gguf')]}.{suffix}.gguf")
    if not os.path.exists(out):
        subprocess.run(
            [sys.executable, "-m", "flashcli.cli", "convert", str(source), "-o", out, "-q", *args],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    return out


def run(quick: bool = False) -> dict:
    from flashcli.decoding.perplexity import perplexity
    from flashcli.engine.model import Model
    from scripts.fetch_model import model_path, relu_fixture_path

    (ROOT / "bench-out").mkdir(exist_ok=True)
    out = {"models": [], "down_types": [], "sparsity": []}
    names = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-1.5b"]
    for name in names:
        src = model_path(name)
        flash = flash_file(src)
        row = {
            "model": name,
            "source_bytes": os.path.getsize(src),
            "flash_bytes": os.path.getsize(flash),
            "ppl_llama": ppl_llama(src),
            "ppl_flashcli_dense": perplexity(Model(src, n_ctx=512), runner.text_tokens(src, N_TOKENS))["perplexity"],
            "ppl_flash": ppl_flashcli(flash)["perplexity"],
            **half_budget(flash),
        }
        out["models"].append(row)
    relu = relu_fixture_path()
    if relu is not None:
        flash = flash_file(relu)
        dense = perplexity(Model(relu, n_ctx=512), runner.text_tokens(relu, N_TOKENS))["perplexity"]
        default = ppl_flashcli(flash)
        out["models"].append(
            {
                "model": "relu-fixture",
                "source_bytes": os.path.getsize(relu),
                "flash_bytes": os.path.getsize(flash),
                "ppl_flashcli_dense": dense,
                "ppl_flash_all_neurons": ppl_flashcli(flash, predictor=False)["perplexity"],
                "ppl_flash": default["perplexity"],
                "used": default["ffn_fraction_used_per_token"],
            }
        )
        for skip in (0.7, 0.8) if quick else (0.6, 0.7, 0.8, 0.9):
            r = ppl_flashcli(flash, sparsity=skip)
            out["sparsity"].append(
                {
                    "model": "relu-fixture",
                    "sparsity": skip,
                    "ppl": r["perplexity"],
                    "used": r["ffn_fraction_used_per_token"],
                    "dense": dense,
                }
            )
        for down in ("q8_0", "f16"):
            f = converted(relu, f"down-{down}", "--down-type", down)
            out["down_types"].append(
                {
                    "model": "relu-fixture",
                    "down_type": down,
                    "bytes": os.path.getsize(f),
                    "source_bytes": os.path.getsize(relu),
                    "dense": dense,
                    "ppl_all_neurons": ppl_flashcli(f, predictor=False)["perplexity"],
                }
            )
    smol = model_path("smollm2-135m")
    dense = out["models"][0]["ppl_llama"]
    for down in ("q8_0",) if quick else ("source", "q5_1", "q8_0", "f16"):
        f = converted(
            smol, f"bundles-{down}", "--layout", "bundles", "--down-type", down, "--calibration-tokens", "1024"
        )
        out["down_types"].append(
            {
                "model": "smollm2-135m (bundles)",
                "down_type": down,
                "bytes": os.path.getsize(f),
                "source_bytes": os.path.getsize(smol),
                "dense": dense,
                "ppl_all_neurons": ppl_flashcli(f, predictor=False)["perplexity"],
            }
        )
    runner.save("quality", out)
    return out
