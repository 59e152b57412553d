"""llama (Llama 2/3, Mistral, SmolLM): pre-norm blocks, rope on adjacent pairs, SwiGLU.
Llama 3's long-context rope factors come as the tensor rope_freqs.weight (rope type llama3);
`attention.scale`, where a file sets it, replaces 1/sqrt(head_dim). Mistral's files are llama
files: llama.cpp reads no sliding window for this architecture, and neither do we. With experts
(Mixtral): a softmax router, top k, weights renormalised over the k, experts as wide as
feed_forward_length."""

from .architecture import ROPE_NORMAL, Architecture, MoE

LLAMA = Architecture(
    "llama",
    rope_mode=ROPE_NORMAL,
    ffn_activation="silu",
    multipliers=("attention.scale",),
    moe=MoE(renormalise=True, width_key=False),
)
