"""Which experts an expert cache should keep (issue 35): policies replayed on a real decode's routing.

Generates N greedy tokens of a mixture of experts through flashcli at a budget (default half the
file), recording each layer's routed experts per pass, then replays that routing through caches
of the same slots per layer as the plan gave, counting hits over decode passes 1-128 and 129-N:

  lru              per layer, the least recently used expert goes (flashcli before 52e80bc)
  fading           per layer, the expert whose uses, each faded by DECAY a pass, count least
                   (flashcli's expert_cache since 52e80bc)
  global fading    the same weights, but one pool of slots for all layers: a miss in any layer
                   may take the slot of the least-weighted expert of any other layer
  opt              per layer, Belady's: the expert used furthest in the future goes (a bound)

    PYTHONPATH=. python studies/moe_cache_policies.py MODEL.flash.gguf [-n 256] [--share 0.5]

Routing is the file's: on the model maker's files it is the maker's skew (random weights), not a
trained model's.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

DECAY = 0.97


def record(path: str, n: int, share: float) -> tuple[list, list]:
    """(per layer, the pass-by-pass sets of routed experts; slots per layer) of an n-token run."""
    from flashcli.decoding.generate import generate_step
    from flashcli.decoding.loader import LoadOptions, load
    from flashcli.decoding.sampling import make_sampler
    from flashcli.engine.tokenizer import Tokenizer

    loaded = load(path, LoadOptions(dram_budget=int(os.path.getsize(path) * share), threads=2, n_ctx=n + 64))
    ffn = loaded.model.ffn
    seq = [[] for _ in ffn.caches]
    add = ffn.routing.add

    def recorded(layer, routed):
        seq[layer].append(np.unique(np.concatenate([r.ravel() for r in routed])))
        add(layer, routed)

    ffn.routing.add = recorded
    prompt = Tokenizer(path).encode("The history of the printing press begins")
    for _ in generate_step(loaded.model, prompt, make_sampler(0.0), n):
        pass
    slots = [c.n_slots for c in ffn.caches]
    loaded.close()
    return seq, slots


def replay(seq: list, slots: list, policy: str, n_expert: int) -> np.ndarray:
    """Hits per pass (summed over layers) of `policy` on the routing `seq`."""
    L, T = len(seq), len(seq[0])
    hits = np.zeros(T)
    w, at, last = np.zeros((L, n_expert)), np.zeros((L, n_expert)), np.full((L, n_expert), -1.0)
    resident = np.zeros((L, n_expert), bool)
    pool = sum(slots)
    for t in range(T):
        for layer in range(L):
            ex = seq[layer][t]
            hits[t] += resident[layer, ex].sum()
            for e in ex[~resident[layer, ex]]:
                if policy == "global fading":
                    full, candidates = resident.sum() >= pool, resident.copy()
                else:
                    full, candidates = resident[layer].sum() >= slots[layer], np.zeros_like(resident)
                    candidates[layer] = resident[layer]
                candidates[layer, ex] = False  # a pass's own experts stay
                if full and candidates.any():
                    if policy == "opt":
                        nxt = np.full(n_expert, np.inf)
                        for u in range(T - 1, t, -1):
                            nxt[seq[layer][u]] = u
                        value = np.where(candidates[layer], -nxt, np.inf)
                        victim = (layer, int(np.argmin(value)))
                    else:
                        fade = DECAY if policy != "lru" else 0.0
                        weight = np.where(at >= 0, w * fade ** (t - at), 0.0) if fade else np.zeros_like(w)
                        value = np.where(candidates, weight + 1e-9 * (last + 1), np.inf)
                        victim = np.unravel_index(np.argmin(value), value.shape)
                    resident[victim] = False
                resident[layer, e] = True
            w[layer, ex] = w[layer, ex] * DECAY ** (t - at[layer, ex]) + 1
            at[layer, ex], last[layer, ex] = t, t
    return hits


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("-n", type=int, default=256)
    ap.add_argument("--share", type=float, default=0.5)
    args = ap.parse_args()
    seq, slots = record(args.model, args.n, args.share)
    k_all = sum(len(s[1]) for s in seq)  # experts asked a decode pass, all layers
    n_expert = int(max(int(s.max()) for layer in seq for s in layer)) + 1
    out = {"model": args.model, "slots_per_layer": slots, "passes": len(seq[0]), "hit_rate": {}}
    for policy in ("lru", "fading", "global fading", "opt"):
        hits = replay(seq, slots, policy, n_expert)
        out["hit_rate"][policy] = {
            "passes 1-128": round(float(hits[1:129].sum() / (k_all * len(hits[1:129]))), 4),
            "passes 129-end": round(float(hits[129:].sum() / max(1, k_all * len(hits[129:]))), 4),
        }
        print(policy, out["hit_rate"][policy], flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
