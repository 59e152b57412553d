"""phi3 (Phi-3, Phi-3.5, Phi-4-mini): one fused attn_qkv matrix (q, k, v rows one after another)
and one fused ffn_up (gate rows, then up rows), multiplied whole as llama.cpp does and cut
after; q scaled by 1/sqrt(head_dim) before q k^T; NEOX rope with LongRoPE factors
(rope_factors_long where the context exceeds the original one, else rope_factors_short)."""

from .architecture import ROPE_NEOX, Architecture, head_dim_scale

PHI3 = Architecture(
    "phi3",
    rope_mode=ROPE_NEOX,
    ffn_activation="silu",
    query_scale=head_dim_scale,
    fused_gate_up=True,
    unsupported_keys=("expert_count",),
)
