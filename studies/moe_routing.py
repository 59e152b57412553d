"""How made mixtures of experts route through flashcli's pass, by router skew (issue 35): small
models with OLMoE's and Qwen3-30B-A3B's routing geometry (experts, experts a token, layers; narrow
widths so they are quick to make) are made with each skew of converters/model_maker/router_skew.py,
a text is evaluated, and each layer's FFN input (flashcli's real pass: attention, norms, experts;
bit for bit llama.cpp's) is tapped. From it, with the file's routers:

- per layer: the hottest expert's share of the picks, the hottest tenth's, the experts that take
  90% of them (router_skew.py's docstring cites what trained models give);
- repeats: the share of a token's experts that the previous token picked in the same layer, and
  how often its first choice is the previous token's first choice;
- pre-gating: layer L+1's router on layer L's FFN input (what expert_ffn.py's prefetch guesses
  from) against layer L+1's true picks: the share of the guessed k that are picked;
- the carrier's offset: the mean router logit of each layer's hottest tenth minus the rest's;
- prefetch: greedy generation under a budget (caches of about half the experts) without and with expert_ffn.py's
  pre-gating prefetch (FlashOptions.expert_prefetch): experts read, io wait, guesses used.

Random weights have no real routing: the even files show what chance gives, the skewed ones what
the maker's skew gives, and neither is a trained model. Results: studies/results/moe_routing.json.

    python studies/moe_routing.py [--skew even trained hot] [--geometry olmoe qwen3moe] [--tokens N]
        [--prefetch N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from _results import default_out, save  # noqa: E402

GEOMETRIES = {  # (tiny shape, experts, used, layers, d_model) of the real models' routing
    "olmoe": ("tiny-olmoe", 64, 8, 16, 256),
    "qwen3moe": ("tiny-qwen3moe", 128, 8, 16, 256),
    # OLMoE's width (the carrier's value scales with it) over a few layers
    "olmoe-wide": ("tiny-olmoe", 64, 8, 4, 2048),
}
TEXT = (ROOT / "README.md").read_text()


def geometry_shape(name: str):
    from converters.model_maker import SHAPES

    tiny, n_expert, used, layers, d = GEOMETRIES[name]
    heads = d // 128 if d > 256 else SHAPES[tiny].n_heads
    head_dim = d // heads
    # narrow experts: routing depends on the routers and the residual stream, not on widths
    return replace(
        SHAPES[tiny],
        n_expert=n_expert,
        n_expert_used=used,
        n_layers=layers,
        n_ff_exp=64,
        n_ff=64,
        d_model=d,
        n_heads=heads,
        n_kv_heads=heads if d > 256 else SHAPES[tiny].n_kv_heads,
        head_dim=head_dim,
    )


def tapped_inputs(path: Path, tokens: list) -> list:
    """Each layer's FFN input [n, d] over the tokens, from flashcli's resident pass."""
    from flashcli.engine.model import Model

    model = Model(str(path), n_ctx=len(tokens) + 8)
    inputs: list = [[] for _ in range(model.cfg.n_layers)]
    model.on_ffn_input = lambda layer, h: inputs[layer].append(np.array(h, np.float32))
    model.eval(tokens, hidden=True)  # every token through the last layer too
    return [np.concatenate(x) for x in inputs], model


def routing(path: Path, tokens: list) -> dict:
    """The routing figures of one file over the tokens (the module's docstring says which)."""
    from flashcli.engine.gguf_file import GGUFFile

    inputs, model = tapped_inputs(path, tokens)
    cfg, gf = model.cfg, GGUFFile(path)
    E, k = cfg.n_expert, cfg.n_expert_used
    routers = [
        gf.tensor(f"blk.{i}.ffn_gate_inp.weight").raw.view(np.float32).reshape(E, -1) for i in range(cfg.n_layers)
    ]
    picks = [np.argsort(-(x @ r.T), axis=1, kind="stable")[:, :k] for x, r in zip(inputs, routers)]
    layers = []
    for i, (x, r, ids) in enumerate(zip(inputs, routers, picks)):
        counts = np.bincount(ids.ravel(), minlength=E)
        ranked = np.sort(counts)[::-1] / counts.sum()
        logits = x @ r.T
        hot = np.argsort(-counts)[: max(1, E // 10)]
        cold = np.setdiff1d(np.arange(E), hot)
        row = {
            "top_expert_share": float(ranked[0]),
            "top_decile_share": float(ranked[: max(1, E // 10)].sum()),
            "experts_for_90pct": int(np.searchsorted(np.cumsum(ranked), 0.9) + 1),
            "repeat_rate": float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ids[1:], ids[:-1])])),
            "first_choice_repeat": float(np.mean(ids[1:, 0] == ids[:-1, 0])),
            "hot_logit_offset": float(logits[:, hot].mean() - logits[:, cold].mean()),
        }
        if i + 1 < cfg.n_layers:  # layer i+1's router on layer i's input
            guess = np.argsort(-(x @ routers[i + 1].T), axis=1, kind="stable")[:, :k]
            row["pregating_right"] = float(
                np.mean([len(np.intersect1d(g, t)) / k for g, t in zip(guess, picks[i + 1])])
            )
        layers.append(row)
    summary = {key: float(np.mean([row[key] for row in layers if key in row])) for key in layers[0] | layers[-2]}
    summary["even_repeat_rate"] = k / E
    return {"experts": E, "used": k, "tokens": len(tokens), "mean": summary, "layers": layers}


def prefetch_effect(path: Path, tokens: list, n: int, share: float = 0.5) -> dict:
    """Greedy generation under a budget, without and with pre-gating
    prefetch: the tokens (which prefetch must not change), what was read and waited for, how
    often the guesses were used. Timings are wall-clock on this machine (shared or not)."""
    import os
    import time

    from flashcli.decoding.generate import generate_step
    from flashcli.decoding.loader import LoadOptions, check, load
    from flashcli.decoding.sampling import make_sampler
    from flashcli.flash.flash_model import FlashOptions, plan_for

    gf, cfg = check(path)
    # these narrow experts are a small part of the file: the budget is the plan's minimum (a
    # token's experts and a spare per layer) and `share` of the rest, so that the caches hold
    # about that share of the experts (room for guesses beside a token's own)
    minimum = plan_for(gf, cfg, None, 512).minimum
    budget = minimum + int(share * (os.path.getsize(path) - minimum))
    out = {"budget_bytes": budget}
    for prefetch in (False, True):
        loaded = load(path, LoadOptions(dram_budget=budget, n_ctx=512, flash=FlashOptions(expert_prefetch=prefetch)))
        model = loaded.model
        t0 = time.perf_counter()
        generated = list(generate_step(model, tokens, make_sampler(0.0), n))
        seconds = time.perf_counter() - t0
        t = model.telemetry()
        keys = ("expert_slots", "expert_hit_rate", "experts_read_per_token", "bytes_read_per_token", "io_wait_ms")
        row = {key: t[key] for key in keys}
        row |= {key: t[key] for key in ("experts_prefetched_per_token", "prefetch_guessed_right")}
        row |= {"tokens": generated, "ms_per_token": 1e3 * seconds / (len(tokens) + n)}
        out["prefetch" if prefetch else "plain"] = row
        loaded.close()
    out["same_tokens"] = out["plain"]["tokens"] == out["prefetch"]["tokens"]
    return out


def main(argv=None) -> int:
    from converters.model_maker import SKEWS, make_model
    from flashcli.engine.tokenizer import Tokenizer

    from fetch_model import fetch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skew", nargs="+", default=list(SKEWS), choices=list(SKEWS))
    ap.add_argument("--geometry", nargs="+", default=["olmoe", "qwen3moe"], choices=list(GEOMETRIES))
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--prefetch", type=int, default=32, help="tokens generated with and without prefetch (0: none)")
    ap.add_argument("--share", type=float, default=0.5, help="of the experts above the plan's minimum (prefetch)")
    ap.add_argument("--out", default=str(default_out("moe_routing")))
    args = ap.parse_args(argv)
    out = {"text": "README.md", "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for geometry in args.geometry:
            shape = geometry_shape(geometry)
            vocab = fetch(shape.vocab, quiet=True, with_draft=False)
            for skew in args.skew:
                path = make_model(shape, Path(tmp) / f"{geometry}-{skew}.gguf", vocab, "Q8_0", 1, skew=skew)
                tokens = Tokenizer(path).encode(TEXT)[: args.tokens]
                result = routing(path, tokens)
                if args.prefetch:
                    result["prefetch"] = prefetch_effect(path, tokens[:32], args.prefetch, args.share)
                out["results"][f"{geometry}/{skew}"] = result
                m = result["mean"]
                print(
                    f"{geometry:>8} {skew:>7}: top expert {m['top_expert_share']:.1%}, top tenth "
                    f"{m['top_decile_share']:.0%}, 90% of picks in {m['experts_for_90pct']:.0f} of {result['experts']}, "
                    f"repeats {m['repeat_rate']:.0%} (even {m['even_repeat_rate']:.0%}), first choice "
                    f"{m['first_choice_repeat']:.0%}, pre-gating right {m['pregating_right']:.0%}, "
                    f"hot offset {m['hot_logit_offset']:.2f}",
                    flush=True,
                )
                if args.prefetch:
                    f = result["prefetch"]
                    a, b = f["plain"], f["prefetch"]
                    print(
                        f"{'':>17} prefetch: guesses used {b['prefetch_guessed_right']:.0%}, experts read a token "
                        f"{a['experts_read_per_token']:.1f} -> {b['experts_read_per_token']:.1f} (+ "
                        f"{b['experts_prefetched_per_token']:.1f} prefetched), io wait ms {a['io_wait_ms']:.2f} -> "
                        f"{b['io_wait_ms']:.2f}, ms a token {a['ms_per_token']:.1f} -> {b['ms_per_token']:.1f}, "
                        f"same tokens {f['same_tokens']}",
                        flush=True,
                    )
                path.unlink()
    save(Path(args.out), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
