"""llama (Llama 2/3, Mistral-style, SmolLM): pre-norm blocks, rope on adjacent pairs, SwiGLU.
Llama 3's long-context rope factors come as the tensor rope_freqs.weight."""

from .architecture import ROPE_NORMAL, Architecture

LLAMA = Architecture("llama", rope_mode=ROPE_NORMAL, ffn_activation="silu")
