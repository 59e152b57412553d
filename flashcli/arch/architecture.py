"""What an architecture sets in the shared forward pass: the switches of llama.cpp's decoder
block that model.py reads, one Architecture per family file."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROPE_NORMAL, ROPE_NEOX = 0, 2  # ggml rope modes: rotate adjacent pairs / the two halves of a head

# scale factors a family may read from its metadata (without the "arch." prefix), as ModelConfig
# fields: 0 where the file does not set one
MULTIPLIER_KEYS = {
    "attention.scale": "attention_scale",  # softmax scale in place of 1/sqrt(head_dim)
    "embedding_scale": "embedding_multiplier",  # token embeddings multiplied by it
    "residual_scale": "residual_multiplier",  # attention and FFN outputs multiplied by it
    "logit_scale": "logit_scale",  # logits divided by it
}


@dataclass(frozen=True)
class MoE:
    """How a family's mixture of experts differs (llama.cpp's build_moe_ffn arguments): the
    router's softmax weights of a token's top k renormalised to sum to 1 or not; the experts'
    width from expert_feed_forward_length or feed_forward_length; a shared expert every token
    uses, gated by a sigmoid."""

    renormalise: bool
    width_key: bool = True
    shared_expert: bool = False


@dataclass(frozen=True)
class Architecture:
    name: str
    rope_mode: int
    ffn_activation: str  # "silu" (SwiGLU), "gelu" (GeGLU, tanh approximation), "relu"
    # RMS norm of q and k: "heads" (every head, weights of head_dim), "projection" (the whole
    # projection before it is cut into heads, OLMo 2), "" none (weights attn_q_norm, attn_k_norm)
    qk_norm: str = ""
    input_norms: bool = True  # RMS norm of the attention and FFN inputs (attn_norm, ffn_norm)
    post_norms: bool = False  # RMS norm of the attention and FFN outputs before each residual add
    embedding_scale: bool = False  # token embeddings multiplied by sqrt(d_model)
    # q scaled by query_scale(cfg) before q k^T, then softmax scale 1 (Gemma, Phi-3); None: the
    # softmax scales by 1/sqrt(head_dim) (llama)
    query_scale: object = None
    # (attention, final) logit soft-capping where the metadata does not say: cap * tanh(x / cap)
    softcapping: tuple | None = None
    multipliers: tuple = ()  # MULTIPLIER_KEYS the family reads (Granite: all four)
    swa_pattern: int = 0  # >0: every n-th layer attends globally, the others in a sliding window
    default_window: int = 0  # sliding window where the metadata gives none (0: no window then)
    # rope base of the sliding-window layers (metadata may override); None: the global base
    rope_base_swa: float | None = 10000.0
    no_rope_every: int = 0  # >0: every n-th layer uses no rope (SmolLM3)
    fused_gate_up: bool = False  # ffn_up holds gate then up rows (Phi-3), no ffn_gate
    chat_template: str | None = None  # llama.cpp's built-in template, for files that carry none
    # metadata keys (without the "arch." prefix) whose presence with a non-zero value means a
    # feature we do not run: the model is refused with the key's name
    unsupported_keys: tuple = ()
    # a mixture of experts where the file has experts (expert_count): None (refused)
    moe: MoE | None = None


def inverse_sqrt(x) -> float:
    """1/sqrt(x) computed in float32, as llama.cpp does (1.0f / sqrtf(x))."""
    return float(np.float32(1.0) / np.sqrt(np.float32(x)))


def head_dim_scale(cfg) -> float:
    """1/sqrt(head_dim), the query scale of families that scale q rather than the softmax."""
    return inverse_sqrt(cfg.head_dim)
