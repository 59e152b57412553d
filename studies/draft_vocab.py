"""How much of real text a lean draft's head covers: the share of a text's tokens among the K
ids `flashcli convert --layout draft` keeps (the most frequent in the calibration text), for
several K, on texts other than the calibration text.

    python studies/draft_vocab.py MODEL.gguf [TEXT ...]   (default: README.md, tests/data/heldout.txt)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from converters.lean_draft import draft_vocabulary  # noqa: E402
from flashcli.engine.tokenizer import Tokenizer  # noqa: E402

from _results import default_out, save  # noqa: E402

SIZES = (4096, 8192, 16384, 32768, 65536)


def main():
    model = sys.argv[1]
    texts = sys.argv[2:] or [str(ROOT / "README.md"), str(ROOT / "tests/data/heldout.txt")]
    tok = Tokenizer(model)
    out = {}
    for path in texts:
        ids = np.asarray(tok.encode(Path(path).read_text()), np.int64)
        cover = {k: float(np.isin(ids, draft_vocabulary(model, tok.n_vocab, k)).mean()) for k in SIZES}
        out[Path(path).name] = {"tokens": len(ids), "covered": cover}
        print(Path(path).name, len(ids), " ".join(f"{k}: {v:.1%}" for k, v in cover.items()))
    save(default_out("draft_vocab", model), out)


if __name__ == "__main__":
    main()
