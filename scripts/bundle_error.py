"""Error of the re-quantized down columns of a converted file against its source.

    python scripts/bundle_error.py SOURCE.gguf CONVERTED.flash.gguf

Prints, over every neuron of every layer, the largest and the mean of
max|column - source column| / max|source column| (gate and up rows are exact copies).
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flashcli import ggml  # noqa: E402
from flashcli.bundles import BundleLayout, bundle_name  # noqa: E402
from flashcli.config import ModelConfig  # noqa: E402
from flashcli.gguf_file import GGUFFile  # noqa: E402


def main(source, converted):
    src, out = GGUFFile(source), GGUFFile(converted)
    cfg = ModelConfig.from_gguf(out)
    layout = BundleLayout.from_metadata(out, cfg.d_model)
    errors = []
    for i in range(cfg.n_layers):
        t = src.tensor(f"blk.{i}.ffn_down.weight")
        want = ggml.dequantize_rows(t.rows(), t.ggml_type, t.row_len).T
        got = layout.decode_down(out.tensor(bundle_name(i)).rows())
        errors.append(np.abs(got - want).max(axis=1) / np.maximum(np.abs(want).max(axis=1), 1e-12))
    errors = np.concatenate(errors)
    print(f"down columns: source type {src.tensor('blk.0.ffn_down.weight').type_name} -> ggml type {layout.down_type}; "
          f"relative error max {errors.max():.5f}, mean {errors.mean():.5f} over {len(errors)} neurons")


if __name__ == "__main__":
    main(*sys.argv[1:3])
