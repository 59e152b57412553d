"""qwen3moe (Qwen3-30B-A3B, Qwen3-235B-A22B): qwen3's attention (q and k heads RMS-normed, no
biases, NEOX rope) with a mixture of experts in every layer: softmax router, top k, weights
renormalised over the k."""

from .architecture import ROPE_NEOX, Architecture, MoE

QWEN3MOE = Architecture(
    "qwen3moe",
    rope_mode=ROPE_NEOX,
    ffn_activation="silu",
    qk_norm="heads",
    chat_template="chatml",
    moe=MoE(renormalise=True),
)
