"""The shapes the model maker knows: real models' dimensions (from their Hugging Face configs)
and a tiny shape of every family, as data. A shape names its family (the writer in families.py
that turns it into GGUF metadata and tensors) and the model whose vocabulary it borrows
(vocab.py)."""

from __future__ import annotations

from dataclasses import dataclass

# the models scripts/fetch_model.py fetches, whose vocabularies a shape can borrow
GPT2_BPE = "smollm2-135m"  # gpt2 byte-level BPE, 49152 tokens, ChatML specials
QWEN_BPE = "qwen2.5-coder-1.5b"  # qwen2 byte-level BPE, 151936 tokens
GEMMA_SPM = "gemma3-270m"  # sentencepiece, 262144 tokens


@dataclass(frozen=True)
class Shape:
    family: str
    n_layers: int
    d_model: int
    n_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_vocab: int
    context_length: int
    rope_base: float
    norm_eps: float
    tied_output: bool
    vocab: str  # a model of scripts/fetch_model.py whose tokenizer is borrowed
    rope_dim: int = 0  # rotated dimensions per head where not all of them (phi3's partial rotary)
    # Llama 3's frequency scaling: factor, low_freq_factor, high_freq_factor, original context
    llama3_rope: tuple = ()
    longrope_original_context: int = 0  # phi3's LongRoPE: the context its short factors cover
    sliding_window: int = 0
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    # granite's multipliers
    embedding_scale: float = 0.0
    residual_scale: float = 0.0
    attention_scale: float = 0.0
    logit_scale: float = 0.0
    # a mixture of experts: experts per layer, used per token, one expert's FFN width (families
    # whose experts are as wide as n_ff leave it 0), a shared expert's width (qwen2moe)
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0

    @property
    def n_rot(self) -> int:
        return self.rope_dim or self.head_dim

    @property
    def expert_width(self) -> int:
        return self.n_ff_exp or self.n_ff

    @property
    def n_params(self) -> int:
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.d_model * self.n_ff
        if self.n_expert:
            ffn = (
                3 * self.d_model * (self.n_expert * self.expert_width + self.n_ff_shexp) + self.d_model * self.n_expert
            )
        embd = self.n_vocab * self.d_model * (1 if self.tied_output else 2)
        return self.n_layers * (attn + ffn) + embd


def _tiny(family: str, vocab: str, n_layers: int = 4, **kw) -> Shape:
    """A few layers of small widths: fast in tests, every feature of the family present."""
    base = dict(
        family=family,
        n_layers=n_layers,
        d_model=256,
        n_ff=512,
        n_heads=4,
        n_kv_heads=2,
        head_dim=64,
        n_vocab=4096,
        context_length=4096,
        rope_base=10000.0,
        norm_eps=1e-5,
        tied_output=False,
        vocab=vocab,
    )
    base.update(kw)
    return Shape(**base)


SHAPES: dict[str, Shape] = {
    # --- real models -------------------------------------------------------------------------
    "llama-3.2-1b": Shape(
        "llama3",
        16,
        2048,
        8192,
        32,
        8,
        64,
        128256,
        131072,
        500000.0,
        1e-5,
        True,
        GPT2_BPE,
        llama3_rope=(32.0, 1.0, 4.0, 8192),
    ),
    "llama-3.1-8b": Shape(
        "llama3",
        32,
        4096,
        14336,
        32,
        8,
        128,
        128256,
        131072,
        500000.0,
        1e-5,
        False,
        GPT2_BPE,
        llama3_rope=(8.0, 1.0, 4.0, 8192),
    ),
    "qwen3-0.6b": Shape("qwen3", 28, 1024, 3072, 16, 8, 128, 151936, 40960, 1e6, 1e-6, True, QWEN_BPE),
    "qwen3-8b": Shape("qwen3", 36, 4096, 12288, 32, 8, 128, 151936, 40960, 1e6, 1e-6, False, QWEN_BPE),
    "qwen3-14b": Shape("qwen3", 40, 5120, 17408, 40, 8, 128, 151936, 40960, 1e6, 1e-6, False, QWEN_BPE),
    # Mistral-7B-v0.3 (no sliding window: v0.3 has none, and llama.cpp's llama reads none)
    "mistral-7b": Shape("mistral", 32, 4096, 14336, 32, 8, 128, 32768, 32768, 1e6, 1e-5, False, GEMMA_SPM),
    # Phi-4-mini-instruct: partial rotary (96 of 128), LongRoPE from 4096 tokens; its config's
    # sliding window, which llama.cpp reads and disables
    "phi-4-mini": Shape(
        "phi3",
        32,
        3072,
        8192,
        24,
        8,
        128,
        200064,
        131072,
        10000.0,
        1e-5,
        True,
        QWEN_BPE,
        rope_dim=96,
        longrope_original_context=4096,
        sliding_window=262144,
    ),
    "gemma-2-2b": Shape(
        "gemma2",
        26,
        2304,
        9216,
        8,
        4,
        256,
        256000,
        8192,
        10000.0,
        1e-6,
        True,
        GEMMA_SPM,
        sliding_window=4096,
        attn_softcap=50.0,
        final_softcap=30.0,
    ),
    # granite-3.0-2b-instruct
    "granite-3-2b": Shape(
        "granite",
        40,
        2048,
        8192,
        32,
        8,
        64,
        49155,
        4096,
        10000.0,
        1e-5,
        True,
        GPT2_BPE,
        embedding_scale=12.0,
        residual_scale=0.22,
        attention_scale=0.015625,
        logit_scale=8.0,
    ),
    # OLMo-2-0425-1B
    "olmo-2-1b": Shape("olmo2", 16, 2048, 8192, 16, 16, 128, 100352, 4096, 500000.0, 1e-6, False, GPT2_BPE),
    "smollm3-3b": Shape("smollm3", 36, 2048, 11008, 16, 4, 128, 128256, 65536, 5e6, 1e-6, True, GPT2_BPE),
    # --- mixtures of experts -------------------------------------------------------------------
    # OLMoE-1B-7B-0924: 64 experts of 1024, 8 a token; GPT-NeoX's 50304 tokens (a gpt2 BPE padded)
    "olmoe-1b-7b": Shape(
        "olmoe", 16, 2048, 1024, 16, 16, 128, 50304, 4096, 10000.0, 1e-5, False, GPT2_BPE, n_expert=64, n_expert_used=8
    ),
    # Qwen3-30B-A3B: 128 experts of 768, 8 a token
    "qwen3-30b-a3b": Shape(
        "qwen3moe",
        48,
        2048,
        6144,
        32,
        4,
        128,
        151936,
        40960,
        1e6,
        1e-6,
        False,
        QWEN_BPE,
        n_expert=128,
        n_expert_used=8,
        n_ff_exp=768,
    ),
    # Qwen1.5-MoE-A2.7B: 60 experts of 1408, 4 a token, and a shared expert of 5632
    "qwen2-moe-a2.7b": Shape(
        "qwen2moe",
        24,
        2048,
        5632,
        16,
        16,
        128,
        151936,
        8192,
        1e6,
        1e-6,
        False,
        QWEN_BPE,
        n_expert=60,
        n_expert_used=4,
        n_ff_exp=1408,
        n_ff_shexp=5632,
    ),
    # Mixtral-8x7B-v0.1: llama's block, 8 experts of 14336, 2 a token
    "mixtral-8x7b": Shape(
        "mixtral", 32, 4096, 14336, 32, 8, 128, 32000, 32768, 1e6, 1e-5, False, GEMMA_SPM, n_expert=8, n_expert_used=2
    ),
    # --- tiny shapes, one per family ---------------------------------------------------------
    "tiny-llama": _tiny("llama", GPT2_BPE),
    "tiny-qwen2": _tiny("qwen2", QWEN_BPE, norm_eps=1e-6),
    # six layers: five sliding-window layers and one global, as gemma3 alternates them
    "tiny-gemma3": _tiny("gemma3", GEMMA_SPM, n_layers=6, norm_eps=1e-6, tied_output=True, sliding_window=8),
    "tiny-qwen3": _tiny("qwen3", QWEN_BPE, norm_eps=1e-6),
    "tiny-llama3": _tiny("llama3", GPT2_BPE, rope_base=500000.0, llama3_rope=(8.0, 1.0, 4.0, 256)),
    "tiny-mistral": _tiny("mistral", GEMMA_SPM, rope_base=1e6),
    "tiny-phi3": _tiny("phi3", GPT2_BPE, rope_dim=48, longrope_original_context=1024, tied_output=True),
    "tiny-gemma2": _tiny(
        "gemma2", GEMMA_SPM, norm_eps=1e-6, tied_output=True, sliding_window=8, attn_softcap=50.0, final_softcap=30.0
    ),
    "tiny-granite": _tiny(
        "granite",
        GPT2_BPE,
        tied_output=True,
        embedding_scale=12.0,
        residual_scale=0.22,
        attention_scale=0.015625,
        logit_scale=8.0,
    ),
    "tiny-olmo2": _tiny("olmo2", GPT2_BPE, norm_eps=1e-6),
    # four layers: the fourth uses no rope
    "tiny-smollm3": _tiny("smollm3", GPT2_BPE, norm_eps=1e-6, tied_output=True),
    "tiny-olmoe": _tiny("olmoe", GPT2_BPE, n_kv_heads=4, n_expert=8, n_expert_used=2),  # OLMoE: no GQA
    "tiny-qwen3moe": _tiny("qwen3moe", QWEN_BPE, norm_eps=1e-6, n_expert=16, n_expert_used=4, n_ff_exp=256),
    "tiny-qwen2moe": _tiny(
        "qwen2moe", QWEN_BPE, norm_eps=1e-6, n_expert=8, n_expert_used=2, n_ff_exp=256, n_ff_shexp=512
    ),
    "tiny-mixtral": _tiny("mixtral", GEMMA_SPM, n_expert=8, n_expert_used=2),
}
