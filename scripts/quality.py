"""Perplexity of dense generation on a source GGUF against flash generation of its converted file,
on held-out text (tests/data/heldout.txt, not the calibration text).

    python scripts/quality.py SOURCE.gguf CONVERTED.flash.gguf [--budget 93M] [--tokens 1024]
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flashcli.budget import parse_size  # noqa: E402
from flashcli.engine import load  # noqa: E402
from flashcli.perplexity import perplexity  # noqa: E402
from flashcli.tokenizer import Tokenizer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("converted")
    ap.add_argument("--budget", default=None)
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()
    tokens = Tokenizer(args.source).encode((ROOT / "tests" / "data" / "heldout.txt").read_text())[: args.tokens]
    dense = perplexity(load(args.source, n_threads=2, n_ctx=512), tokens)["perplexity"]
    engine = load(args.converted, parse_size(args.budget) if args.budget else None, 2, 512, all_logits=True)
    flash = perplexity(engine, tokens)["perplexity"]
    print(json.dumps({"tokens": len(tokens), "dense": dense, "flash": flash, "change": flash / dense - 1,
                      **engine.telemetry()}, indent=1))


if __name__ == "__main__":
    main()
