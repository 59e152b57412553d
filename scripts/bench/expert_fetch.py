"""Cold expert fetch throughput (issue 35): experts of a mixture-of-experts GGUF read from disk
into expert-cache slots (flash/expert_cache.py), the page cache dropped first (root), MB/s of
experts' bytes made resident. Two patterns: a decode step's (k experts in every layer of the
first N layers) and a layer's whole stack (every expert of one layer at once).

    python -m scripts.bench.expert_fetch FILE.gguf [--layers N] [--repeat R]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from flashcli.engine.config import ModelConfig
from flashcli.engine.gguf_file import GGUFFile
from flashcli.flash.expert_cache import ExpertCache, staging_for


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def fetch_rate(path: str, layers: int, per_layer: int | None, seed: int, threads: int = 8) -> float:
    """MB/s of experts read into slots: `per_layer` random experts (None: all) in each of the
    first `layers` layers, one fetch a layer, from a cold page cache."""
    gf = GGUFFile(path)
    cfg = ModelConfig.from_gguf(gf)
    rng = np.random.default_rng(seed)
    io = ThreadPoolExecutor(threads)
    staging = staging_for(gf, range(layers))
    caches = [ExpertCache(gf, i, cfg.n_expert, io, staging) for i in range(layers)]
    wanted = [np.sort(rng.choice(cfg.n_expert, per_layer or cfg.n_expert, replace=False)) for _ in caches]
    cold = drop_page_cache()
    t0 = time.perf_counter()
    for cache, experts in zip(caches, wanted):
        cache.fetch(experts, 0)
    seconds = time.perf_counter() - t0
    moved = sum(len(e) * sum(s.expert_bytes for s in c.slots.values()) for c, e in zip(caches, wanted))
    for c in caches:
        c.close()
    staging.close()
    io.shutdown(wait=True)
    if not cold:
        print("(page cache not dropped: not root)")
    return moved / seconds / 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args()
    k = ModelConfig.from_gguf(GGUFFile(a.path)).n_expert_used
    for name, per_layer, layers in (("decode step", k, a.layers), ("whole layer", None, 1)):
        rates = [fetch_rate(a.path, layers, per_layer, seed) for seed in range(a.repeat)]
        print(f"{name}: {', '.join(f'{r:.0f}' for r in rates)} MB/s (pid {os.getpid()})")


if __name__ == "__main__":
    main()
