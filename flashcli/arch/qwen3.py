"""qwen3 (Qwen3 dense): qwen2's block without q/k/v biases, with an RMS norm of every q and k
head before rope."""

from .architecture import ROPE_NEOX, Architecture

QWEN3 = Architecture("qwen3", rope_mode=ROPE_NEOX, ffn_activation="silu", qk_norm="heads", chat_template="chatml")
