"""gemma2 (Gemma 2): Gemma 3's block without q/k head norms, with soft-capping of the attention
scores (50 * tanh(s / 50) before the softmax) and of the final logits (30 * tanh(z / 30)),
and a sliding window (4096 tokens unless the metadata says) on every other layer, starting
with the first; all layers share one rope base."""

from .architecture import ROPE_NEOX, Architecture, inverse_sqrt


def query_scale(cfg) -> float:
    """1/sqrt(head_dim); the 27B (46 layers) uses 1/sqrt(d_model / n_heads), as llama.cpp."""
    return inverse_sqrt(cfg.d_model // cfg.n_heads if cfg.n_layers == 46 else cfg.head_dim)


GEMMA2 = Architecture(
    "gemma2",
    rope_mode=ROPE_NEOX,
    ffn_activation="gelu",
    post_norms=True,
    embedding_scale=True,
    query_scale=query_scale,
    softcapping=(50.0, 30.0),
    swa_pattern=2,
    default_window=4096,
    rope_base_swa=None,
    chat_template="gemma",
)
