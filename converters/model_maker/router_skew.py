"""Router skew: made mixtures of experts whose routers prefer some experts, as trained ones do.

A random router picks a layer's experts about evenly (each expert ~k/E of a token's picks), which
makes an expert cache look worse than it is on a trained model. Trained routers are skewed:

- Qwen3-30B-A3B, per-expert selection counts from llama-imatrix over ~1k tokens of prose, code
  and math: 90% of the picks go to 65 of 128 experts (58 on single-domain Python), the hottest
  expert takes 4.3% of them (6.3%), against 0.8% for an even router (the gpu-container project's
  "Routing de-risk" page, mcp-tool-shop-org.github.io/gpu-container/handbook/derisk/).
- Liang et al. 2025, "Not All Models Suit Expert Offloading" (arXiv 2505.16056), 20 MoE models:
  consecutive tokens reuse experts ("local routing consistency"), most in models with MoE in
  every layer and no shared expert (OLMoE, Mixtral, Qwen3-MoE), least with shared experts
  (Qwen2-MoE); a cache of about twice the active experts gets most of the benefit.
- Jiang et al. 2024, Mixtral of Experts (arXiv 2401.04088) §5: no topic specialisation, but
  consecutive tokens are routed to the same experts more often than chance, more in the middle
  and last layers than the first.

How a made file gets it (through the real pass, not a stub): every token's embedding row carries
a constant `CARRIER` value on the first CARRIER_DIMS dimensions (a direction shared by all tokens,
as real residual streams have a few large constant dimensions). The residual stream keeps it
through every layer; after the FFN norm it is a near-constant input to each router. Each
expert's router row gets weight on those dimensions so that its logit is offset by
`spread * q_e`, q_e a normal quantile by the expert's rank in a seeded per-layer order: a
deterministic long tail of hot and cold experts, different in every layer, on top of the random
router's own logits (std ~1). The carrier's share of the FFN input could fall as the residual
stream grows with depth; `depth_gain` would make up for it, but measured through 16 layers the
offsets hold (deep layers of random models develop a common direction of their own, which even
routers also show): every skew leaves it at 0.
Repeats from one token to the next follow from the hot experts plus what attention's mixing of
the context gives. What this yields through flashcli is measured by studies/moe_routing.py
(results in studies/results/moe_routing.json) against the figures above.

Weights stay random: a skewed model has no more meaning than an even one.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from statistics import NormalDist

import numpy as np

from .shapes import Shape

UNIT = 256  # the shifted values lie in a row's first unit of the weight maker (weights.UNIT)
CARRIER_DIMS = 4
CARRIER_SHARE = 0.05  # of an embedding row's energy on the carrier: attention barely notices


@dataclass(frozen=True)
class RouterSkew:
    spread: float  # std, in router-logit units, of the per-expert offsets (0: even)
    depth_gain: float  # the offset's growth per layer, making up for the residual's growth


# "trained": chosen so that a made model of Qwen3-30B-A3B's routing geometry (128 experts, 8 a
# token) routes with Qwen3-30B-A3B's measured concentration (about half the experts for 90% of
# picks, the hottest several times the even share: studies/results/moe_routing.json); "hot": a
# few very hot experts a layer, an easy case for a cache
SKEWS = {
    "even": RouterSkew(0.0, 0.0),
    "trained": RouterSkew(0.6, 0.0),
    "hot": RouterSkew(1.2, 0.0),
}


class UnknownSkew(ValueError):
    pass


def router_skew(name: str) -> RouterSkew:
    if name not in SKEWS:
        raise UnknownSkew(f"unknown router skew {name!r}; known: {', '.join(SKEWS)}")
    return SKEWS[name]


def carrier(shape: Shape, emb_std: float) -> float:
    """The carrier's value on each of its dimensions in an embedding row of std emb_std."""
    return emb_std * float(np.sqrt(CARRIER_SHARE * shape.d_model / CARRIER_DIMS))


def expert_offsets(shape: Shape, layer: int, skew: RouterSkew, seed: int) -> np.ndarray:
    """Each expert's logit offset [E] in a layer: normal quantiles, ranked by a seeded order."""
    E = shape.n_expert
    quantiles = np.array([NormalDist().inv_cdf((E - r - 0.5) / E) for r in range(E)], np.float32)
    order = np.random.default_rng([seed, zlib.crc32(b"router skew"), layer]).permutation(E)
    offsets = np.empty(E, np.float32)
    offsets[order] = quantiles  # order[0] is the hottest
    return skew.spread * (1 + skew.depth_gain * layer) * offsets


def skewed(plans: list, shape: Shape, skew: RouterSkew, seed: int) -> list:
    """The tensor plans with the skew's shifts: the embeddings' carrier, the routers' rows."""
    if not skew.spread:
        return plans
    if not shape.n_expert:
        raise UnknownSkew("a router skew needs a mixture of experts")
    out, value = [], None
    for p in plans:
        if p.name == "token_embd.weight":
            value = carrier(shape, p.std)
            shift = np.zeros(UNIT, np.float32)
            shift[:CARRIER_DIMS] = value
            p = replace(p, first_unit_shift=shift)
        elif p.name.endswith(".ffn_gate_inp.weight"):
            layer = int(p.name.split(".")[1])
            # the FFN input's carrier after the norm: the embedding's value over the row's rms
            # (std 1 and a little carrier), spread evenly over the carrier dimensions
            x = value / np.sqrt(1 + CARRIER_SHARE)
            shift = np.zeros((shape.n_expert, UNIT), np.float32)
            shift[:, :CARRIER_DIMS] = (expert_offsets(shape, layer, skew, seed) / (CARRIER_DIMS * x))[:, None]
            p = replace(p, first_unit_shift=shift)
        out.append(p)
    return out
