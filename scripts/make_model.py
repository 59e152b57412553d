"""Makes a GGUF model of a real model's shape, or a tiny one of any family, with random weights.

    python scripts/make_model.py llama-3.1-8b -o /tmp/llama8b.gguf --type Q4_K_M
    python scripts/make_model.py tiny-qwen3 -o /tmp/tiny.gguf --seed 1
    python scripts/make_model.py olmoe-1b-7b -o /tmp/olmoe.gguf --type Q4_K_M --router-skew trained
    python scripts/make_model.py --list

The file has the metadata keys and tensor names llama.cpp's converter writes for the family,
the type mix llama-quantize gives for --type, and the tokenizer of a model scripts/fetch_model.py
fetches (fetched first if it is not here), padded or cut to the shape's vocabulary. Random
weights have no real activation patterns: use made models for shapes, kernels, I/O, memory and
exactness against llama.cpp, not for quality. A mixture of experts' random routers pick experts
evenly; --router-skew gives them trained routers' hot experts (converters/model_maker/router_skew.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from converters.model_maker import (  # noqa: E402
    FILE_TYPES,
    SHAPES,
    SKEWS,
    UnknownShape,
    make_model,
    shape_by_name,
)

from fetch_model import fetch  # noqa: E402


def _list() -> str:
    lines = [
        f"{'shape':<14} {'family':<8} {'layers':>6} {'d_model':>7} {'heads':>7} {'n_ff':>6} {'vocab':>7} {'params':>7}"
    ]
    for name, s in SHAPES.items():
        heads = f"{s.n_heads}/{s.n_kv_heads}"
        params = f"{s.n_params / 1e9:.2f}B" if s.n_params >= 1e8 else f"{s.n_params / 1e6:.1f}M"
        lines.append(
            f"{name:<14} {s.family:<8} {s.n_layers:>6} {s.d_model:>7} {heads:>7} {s.n_ff:>6} {s.n_vocab:>7} {params:>7}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", nargs="?", help="a shape of --list")
    ap.add_argument("-o", "--output", help="the GGUF file to write")
    ap.add_argument("--type", default="F32", help=f"file type: {', '.join(FILE_TYPES)} (default F32)")
    ap.add_argument("--seed", type=int, default=0, help="the weights' seed (default 0)")
    ap.add_argument("--threads", type=int, default=None, help="threads that make weights (default: every core)")
    ap.add_argument(
        "--router-skew",
        default="even",
        help=f"a mixture of experts' routing: {', '.join(SKEWS)} (default even: random routers)",
    )
    ap.add_argument("--list", action="store_true", help="list the known shapes")
    args = ap.parse_args(argv)
    if args.list:
        print(_list())
        return 0
    if not args.shape or not args.output:
        print("make_model: give a SHAPE and -o OUT.gguf (or --list)", file=sys.stderr)
        return 2
    try:
        shape = shape_by_name(args.shape)
    except UnknownShape as e:
        print(f"make_model: {e}", file=sys.stderr)
        return 2
    if args.type not in FILE_TYPES:
        print(f"make_model: unknown type {args.type!r}; known types: {', '.join(FILE_TYPES)}", file=sys.stderr)
        return 2
    if args.router_skew not in SKEWS:
        print(f"make_model: unknown --router-skew {args.router_skew!r}; known: {', '.join(SKEWS)}", file=sys.stderr)
        return 2
    if args.router_skew != "even" and not shape.n_expert:
        print(f"make_model: --router-skew: {args.shape} has no experts to route", file=sys.stderr)
        return 2
    vocab_file = fetch(shape.vocab, quiet=True, with_draft=False)
    start = time.perf_counter()
    out = make_model(args.shape, args.output, vocab_file, args.type, args.seed, args.threads, skew=args.router_skew)
    size = out.stat().st_size
    print(
        f"{out}: {args.shape} {args.type}, {size / 2**20:.1f} MiB in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
