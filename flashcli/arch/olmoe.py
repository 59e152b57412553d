"""olmoe (OLMoE-1B-7B): llama's pre-norm block with RMS norms of the whole q and k projections
(as OLMo 2's), NEOX rope, and a mixture of experts in every layer: softmax router, top k,
weights as they are (not renormalised), experts as wide as feed_forward_length."""

from .architecture import ROPE_NEOX, Architecture, MoE

OLMOE = Architecture(
    "olmoe",
    rope_mode=ROPE_NEOX,
    ffn_activation="silu",
    qk_norm="projection",
    moe=MoE(renormalise=False, width_key=False),
)
