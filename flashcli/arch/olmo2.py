"""olmo2 (OLMo 2): no norm before attention or the FFN; RMS norms of their outputs before each
residual add, and of the whole q and k projections (weights of n_heads * head_dim and
n_kv_heads * head_dim) before they are cut into heads. NEOX rope."""

from .architecture import ROPE_NEOX, Architecture

OLMO2 = Architecture(
    "olmo2",
    rope_mode=ROPE_NEOX,
    ffn_activation="silu",
    qk_norm="projection",
    input_norms=False,
    post_norms=True,
    # OLMo 3's sliding-window layers (rope without scaling there) are not run
    unsupported_keys=("expert_count", "attention.sliding_window"),
)
