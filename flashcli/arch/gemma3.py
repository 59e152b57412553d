"""gemma3 (Gemma 3): GeGLU FFN, embeddings scaled by sqrt(d_model), RMS norms also after the
attention and FFN outputs, RMS norms of q and k heads, q scaled before attention, and sliding
window attention on five of every six layers (with their own rope base, 10000 unless the
metadata says otherwise). llama.cpp's converter folds Gemma's `1 + w` norm weights into the
stored weights, so they are used as stored. Files without a chat template get llama.cpp's
built-in "gemma" one."""

from .architecture import ROPE_NEOX, Architecture, inverse_sqrt


def query_scale(cfg) -> float:
    """1/sqrt(head_dim); the 27B (62 layers) uses 1/sqrt(d_model / n_heads), as llama.cpp."""
    return inverse_sqrt(cfg.d_model // cfg.n_heads if cfg.n_layers == 62 else cfg.head_dim)


GEMMA3 = Architecture(
    "gemma3",
    rope_mode=ROPE_NEOX,
    ffn_activation="gelu",
    qk_norm="heads",
    post_norms=True,
    embedding_scale=True,
    query_scale=query_scale,
    swa_pattern=6,
    chat_template="gemma",
    unsupported_keys=("expert_count", "attn_logit_softcapping", "final_logit_softcapping"),
)
