"""qwen2 (Qwen2, Qwen2.5): llama's block with q/k/v biases (read when present, as for every
family) and NEOX rope (the two halves of each head rotate together)."""

from .architecture import ROPE_NEOX, Architecture

QWEN2 = Architecture("qwen2", rope_mode=ROPE_NEOX, ffn_activation="silu", chat_template="chatml")
