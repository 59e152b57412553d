"""qwen2moe (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): qwen2's attention (q/k/v biases, NEOX rope) with
a mixture of experts: softmax router, top k, weights as they are (not renormalised), plus a
shared expert every token uses, its output scaled by sigmoid(w . h)."""

from .architecture import ROPE_NEOX, Architecture, MoE

QWEN2MOE = Architecture(
    "qwen2moe",
    rope_mode=ROPE_NEOX,
    ffn_activation="silu",
    chat_template="chatml",
    moe=MoE(renormalise=False, shared_expert=True),
)
