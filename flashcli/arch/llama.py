"""llama (Llama 2/3, Mistral-style, SmolLM): pre-norm blocks, rope on adjacent pairs, SwiGLU.
Llama 3's long-context rope factors come as the tensor rope_freqs.weight. With experts (Mixtral):
a softmax router, top k, weights renormalised over the k, experts as wide as feed_forward_length."""

from .architecture import ROPE_NORMAL, Architecture, MoE

LLAMA = Architecture("llama", rope_mode=ROPE_NORMAL, ffn_activation="silu", moe=MoE(renormalise=True, width_key=False))
