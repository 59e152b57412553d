"""granite (Granite 3): llama's block with four multipliers from the metadata: the token
embeddings times embedding_scale, the attention and FFN outputs times residual_scale before
each residual add, the softmax scaled by attention.scale, the logits divided by logit_scale."""

from .architecture import MULTIPLIER_KEYS, ROPE_NORMAL, Architecture

GRANITE = Architecture(
    "granite",
    rope_mode=ROPE_NORMAL,
    ffn_activation="silu",
    multipliers=tuple(MULTIPLIER_KEYS),
    unsupported_keys=("expert_count", "expert_shared_feed_forward_length"),
)
