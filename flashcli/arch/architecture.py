"""What an architecture sets in the shared forward pass: the switches of llama.cpp's decoder
block that model.py reads, one Architecture per family file."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROPE_NORMAL, ROPE_NEOX = 0, 2  # ggml rope modes: rotate adjacent pairs / the two halves of a head


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
    qk_norm: bool = False  # RMS norm of every q and k head (weights attn_q_norm, attn_k_norm)
    post_norms: bool = False  # RMS norm of the attention and FFN outputs before each residual add
    embedding_scale: bool = False  # token embeddings multiplied by sqrt(d_model)
    # q scaled by query_scale(cfg) before q k^T, then softmax scale 1 (Gemma); None: the
    # softmax scales by 1/sqrt(head_dim) (llama)
    query_scale: object = None
    swa_pattern: int = 0  # >0: every n-th layer attends globally, the others in a sliding window
    rope_base_swa: float = 10000.0  # rope base of the sliding-window layers (metadata may override)
    chat_template: str | None = None  # llama.cpp's built-in template, for files that carry none
    # metadata keys (without the "arch." prefix) whose presence with a non-zero value means a
    # feature we do not run: the model is refused with the key's name
    unsupported_keys: tuple = ()
    # a mixture of experts where the file has experts (expert_count): None (refused)
    moe: MoE | None = None


def inverse_sqrt(x) -> float:
    """1/sqrt(x) computed in float32, as llama.cpp does (1.0f / sqrtf(x))."""
    return float(np.float32(1.0) / np.sqrt(np.float32(x)))
