"""Per family: the GGUF metadata keys and the tensors (names, shapes, how to fill them) that
llama.cpp's convert_hf_to_gguf.py writes for a model of that family, and that llama.cpp's loader
requires. Weights are described here, not made: weights.py fills them.

Shapes are GGUF's: ne[0] is a row's length, so a matrix of `rows` x `cols` is (cols, rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .shapes import Shape

# A tied model's embedding rows enter the residual stream at this fraction of 1/sqrt(d): small
# enough that a token's own row does not win its logits (tried on the tiny shapes: at 1 and 0.5
# greedy output of some families repeats one token, at 0.25 none does)
TIED_EMBEDDING_SHARE = 0.25


@dataclass(frozen=True)
class TensorPlan:
    name: str
    ne: tuple  # GGUF dimensions: (row length,) or (row length, rows)
    fill: str  # "normal" (std), "norm" (near `center`), "bias" (near 0), "values" (the given values)
    std: float = 0.0
    center: float = 1.0
    values: np.ndarray | None = None
    live_rows: int | None = None  # rows from here on are zeros (a padded vocabulary's tokens)
    # added to the first 256 values of every row (256,) or of each row (rows, 256): router_skew.py
    first_unit_shift: np.ndarray | None = None


@dataclass(frozen=True)
class FamilyModel:
    arch: str  # general.architecture
    metadata: dict  # key -> value, architecture keys with the arch prefix
    tensors: list  # TensorPlan, in file order


def _in(name, rows, cols):
    """A projection into a wider or equal space: std 1/sqrt(fan_in) keeps the output's scale."""
    return TensorPlan(name, (cols, rows), "normal", cols**-0.5)


def _out(name, rows, cols):
    """A projection back onto the residual stream: half the scale, so a layer adds less than
    the stream holds and activations stay finite through every layer."""
    return TensorPlan(name, (cols, rows), "normal", 0.5 * cols**-0.5)


def _norm(name, n, center=1.0):
    return TensorPlan(name, (n,), "norm", center=center)


def _bias(name, n):
    return TensorPlan(name, (n,), "bias")


def _common_keys(s: Shape, arch: str) -> dict:
    """What convert_hf_to_gguf.py's TextModel writes for every family."""
    return {
        f"{arch}.block_count": s.n_layers,
        f"{arch}.context_length": s.context_length,
        f"{arch}.embedding_length": s.d_model,
        f"{arch}.feed_forward_length": s.n_ff,
        f"{arch}.attention.head_count": s.n_heads,
        f"{arch}.attention.head_count_kv": s.n_kv_heads,
        f"{arch}.rope.freq_base": s.rope_base,
        f"{arch}.attention.layer_norm_rms_epsilon": s.norm_eps,
    }


def _head_dim_keys(s: Shape, arch: str) -> dict:
    return {f"{arch}.attention.key_length": s.head_dim, f"{arch}.attention.value_length": s.head_dim}


def _llama_keys(s: Shape, arch: str) -> dict:
    """LlamaModel's additions (llama, mistral, granite, smollm3)."""
    keys = _common_keys(s, arch)
    keys[f"{arch}.vocab_size"] = s.n_vocab
    keys[f"{arch}.rope.dimension_count"] = s.head_dim
    if s.head_dim * s.n_heads != s.d_model:
        keys.update(_head_dim_keys(s, arch))
    return keys


def _embeddings(s: Shape, input_scale: float = 1.0) -> list:
    """Untied: rows of std 1. Tied: the output reads the embeddings too, and a token's own row
    would win its logits (greedy output repeating the last token) unless it is a small part of
    the residual stream (TIED_EMBEDDING_SHARE). input_scale: what the family multiplies
    embeddings by (gemma: sqrt(d), granite: its embedding multiplier)."""
    # (granite's residual multiplier shrinks what layers add: the rows shrink with it)
    std = (TIED_EMBEDDING_SHARE * s.d_model**-0.5 * (s.residual_scale or 1.0) if s.tied_output else 1.0) / input_scale
    return [TensorPlan("token_embd.weight", (s.d_model, s.n_vocab), "normal", std)]


def _head(s: Shape, input_scale: float = 1.0) -> list:
    """The final norm and, for an untied model, the output projection: logits of std ~3. Tied,
    the final norm's scale makes up for the small embedding rows (and granite's logit divisor)."""
    if s.tied_output:
        return [
            _norm(
                "output_norm.weight",
                s.d_model,
                center=3.0 * input_scale * (s.logit_scale or 1.0) / (s.residual_scale or 1.0) / TIED_EMBEDDING_SHARE,
            )
        ]
    return [
        _norm("output_norm.weight", s.d_model),
        TensorPlan("output.weight", (s.d_model, s.n_vocab), "normal", 3.0 * s.d_model**-0.5),
    ]


def _qkvo(s: Shape, p: str) -> list:
    q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    # granite scales attention scores by its own multiplier, not 1/sqrt(head_dim): q and k grow
    # to keep scores at the usual scale (else attention is uniform and every token looks alike)
    gain = (s.head_dim**-0.5 / s.attention_scale) ** 0.5 if s.attention_scale else 1.0
    return [
        TensorPlan(p + "attn_q.weight", (s.d_model, q), "normal", gain * s.d_model**-0.5),
        TensorPlan(p + "attn_k.weight", (s.d_model, kv), "normal", gain * s.d_model**-0.5),
        _in(p + "attn_v.weight", kv, s.d_model),
        _out(p + "attn_output.weight", s.d_model, q),
    ]


def _swiglu(s: Shape, p: str) -> list:
    return [
        _in(p + "ffn_gate.weight", s.n_ff, s.d_model),
        _in(p + "ffn_up.weight", s.n_ff, s.d_model),
        _out(p + "ffn_down.weight", s.d_model, s.n_ff),
    ]


def _experts(s: Shape, p: str) -> list:
    """A mixture of experts: the router (kept F32, as llama.cpp's quantizer keeps it), the
    stacked experts [ne0, rows, n_expert], and a shared expert with its gate where the shape has
    one."""
    d, ff, n = s.d_model, s.expert_width, s.n_expert
    plans = [
        TensorPlan(p + "ffn_gate_inp.weight", (d, n), "normal", d**-0.5),
        TensorPlan(p + "ffn_gate_exps.weight", (d, ff, n), "normal", d**-0.5),
        TensorPlan(p + "ffn_up_exps.weight", (d, ff, n), "normal", d**-0.5),
        TensorPlan(p + "ffn_down_exps.weight", (ff, d, n), "normal", 0.5 * ff**-0.5),
    ]
    if s.n_ff_shexp:
        plans.append(TensorPlan(p + "ffn_gate_inp_shexp.weight", (d,), "normal", d**-0.5))
        plans += [
            _in(p + "ffn_gate_shexp.weight", s.n_ff_shexp, d),
            _in(p + "ffn_up_shexp.weight", s.n_ff_shexp, d),
            _out(p + "ffn_down_shexp.weight", d, s.n_ff_shexp),
        ]
    return plans


def _expert_keys(s: Shape, arch: str) -> dict:
    keys = {f"{arch}.expert_count": s.n_expert, f"{arch}.expert_used_count": s.n_expert_used}
    if s.n_ff_exp:
        keys[f"{arch}.expert_feed_forward_length"] = s.n_ff_exp
    if s.n_ff_shexp:
        keys[f"{arch}.expert_shared_feed_forward_length"] = s.n_ff_shexp
    return keys


def _llama_layers(s: Shape, extra_attn=None) -> list:
    plans = []
    for i in range(s.n_layers):
        p = f"blk.{i}."
        plans.append(_norm(p + "attn_norm.weight", s.d_model))
        plans += _qkvo(s, p)
        plans += extra_attn(p) if extra_attn else []
        plans.append(_norm(p + "ffn_norm.weight", s.d_model))
        plans += _experts(s, p) if s.n_expert else _swiglu(s, p)
    return plans


def llama3_rope_factors(s: Shape) -> np.ndarray:
    """Llama 3's per-frequency divisors of the rope angle (the rope_freqs tensor): long
    wavelengths are slowed by `factor`, short ones kept, the band between blended smoothly."""
    factor, low_freq_factor, high_freq_factor, original_context = s.llama3_rope
    low_wavelen = original_context / low_freq_factor
    high_wavelen = original_context / high_freq_factor
    factors = []
    for i in range(0, s.head_dim, 2):
        wavelen = 2 * math.pi / s.rope_base ** (i / s.head_dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _llama(s: Shape, arch: str = "llama") -> FamilyModel:
    """llama, and with experts Mixtral (llama's keys and block, experts as wide as n_ff)."""
    plans = _embeddings(s, s.embedding_scale or 1.0)
    if s.llama3_rope:
        plans.append(TensorPlan("rope_freqs.weight", (s.head_dim // 2,), "values", values=llama3_rope_factors(s)))
    keys = _llama_keys(s, arch) | (_expert_keys(s, arch) if s.n_expert else {})
    return FamilyModel(arch, keys, plans + _llama_layers(s) + _head(s, s.embedding_scale or 1.0))


def _qwen2(s: Shape, arch: str = "qwen2") -> FamilyModel:
    """qwen2, and qwen2moe (experts and a shared expert)."""

    def biases(p):
        q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
        return [_bias(p + "attn_q.bias", q), _bias(p + "attn_k.bias", kv), _bias(p + "attn_v.bias", kv)]

    keys = _common_keys(s, arch) | (_expert_keys(s, arch) if s.n_expert else {})
    return FamilyModel(arch, keys, _embeddings(s) + _llama_layers(s, biases) + _head(s))


def _qwen3(s: Shape, arch: str = "qwen3") -> FamilyModel:
    """qwen3, and qwen3moe (experts)."""

    def head_norms(p):  # RMS norms over each head of q and k
        return [_norm(p + "attn_q_norm.weight", s.head_dim), _norm(p + "attn_k_norm.weight", s.head_dim)]

    keys = _common_keys(s, arch) | _head_dim_keys(s, arch) | (_expert_keys(s, arch) if s.n_expert else {})
    return FamilyModel(arch, keys, _embeddings(s) + _llama_layers(s, head_norms) + _head(s))


def _olmoe(s: Shape) -> FamilyModel:
    """llama's pre-norm block, q/k norms over the whole projections, experts as wide as n_ff."""

    def projection_norms(p):
        return [
            _norm(p + "attn_q_norm.weight", s.n_heads * s.head_dim),
            _norm(p + "attn_k_norm.weight", s.n_kv_heads * s.head_dim),
        ]

    keys = _common_keys(s, "olmoe") | _expert_keys(s, "olmoe")
    return FamilyModel("olmoe", keys, _embeddings(s) + _llama_layers(s, projection_norms) + _head(s))


def _gemma_layers(s: Shape, head_norms: bool) -> list:
    """Gemma 2 and 3: a norm before and after attention and the FFN (stored as 1 + w, as the
    converter writes Gemma's norms, so "near 1" is right for them too)."""
    plans = []
    for i in range(s.n_layers):
        p = f"blk.{i}."
        plans.append(_norm(p + "attn_norm.weight", s.d_model))
        plans += _qkvo(s, p)
        if head_norms:
            plans += [_norm(p + "attn_q_norm.weight", s.head_dim), _norm(p + "attn_k_norm.weight", s.head_dim)]
        plans.append(_norm(p + "post_attention_norm.weight", s.d_model))
        plans.append(_norm(p + "ffn_norm.weight", s.d_model))
        plans += _swiglu(s, p)
        plans.append(_norm(p + "post_ffw_norm.weight", s.d_model))
    return plans


def _gemma2(s: Shape) -> FamilyModel:
    keys = _common_keys(s, "gemma2") | _head_dim_keys(s, "gemma2")
    del keys["gemma2.rope.freq_base"]  # Gemma2Model writes none (llama.cpp's default, 10000)
    keys["gemma2.attn_logit_softcapping"] = s.attn_softcap
    keys["gemma2.final_logit_softcapping"] = s.final_softcap
    keys["gemma2.attention.sliding_window"] = s.sliding_window
    return FamilyModel(
        "gemma2", keys, _embeddings(s, s.d_model**0.5) + _gemma_layers(s, False) + _head(s, s.d_model**0.5)
    )


def _gemma3(s: Shape) -> FamilyModel:
    keys = _common_keys(s, "gemma3") | _head_dim_keys(s, "gemma3")
    keys["gemma3.attention.sliding_window"] = s.sliding_window
    if s.final_softcap:
        keys["gemma3.final_logit_softcapping"] = s.final_softcap
    return FamilyModel(
        "gemma3", keys, _embeddings(s, s.d_model**0.5) + _gemma_layers(s, True) + _head(s, s.d_model**0.5)
    )


def _phi3(s: Shape) -> FamilyModel:
    """Fused q|k|v and gate|up projections; LongRoPE factors (short for the original context,
    long beyond it) on the rotated part of each head."""
    keys = _common_keys(s, "phi3")
    keys["phi3.rope.scaling.original_context_length"] = s.longrope_original_context
    keys["phi3.rope.dimension_count"] = s.n_rot
    keys["phi3.attention.sliding_window"] = s.sliding_window
    scale = s.context_length / s.longrope_original_context
    attn_factor = math.sqrt(1 + math.log(scale) / math.log(s.longrope_original_context)) if scale > 1 else 1.0
    keys["phi3.rope.scaling.attn_factor"] = attn_factor
    half = s.n_rot // 2
    # made-up factors of the real files' form: 1 (short), rising towards high dimensions (long)
    long = np.linspace(1.0, scale, half, dtype=np.float32)
    plans = _embeddings(s)
    plans.append(TensorPlan("rope_factors_long.weight", (half,), "values", values=long))
    plans.append(TensorPlan("rope_factors_short.weight", (half,), "values", values=np.ones(half, np.float32)))
    qkv = (s.n_heads + 2 * s.n_kv_heads) * s.head_dim
    for i in range(s.n_layers):
        p = f"blk.{i}."
        plans.append(_norm(p + "attn_norm.weight", s.d_model))
        plans.append(_in(p + "attn_qkv.weight", qkv, s.d_model))
        plans.append(_out(p + "attn_output.weight", s.d_model, s.n_heads * s.head_dim))
        plans.append(_norm(p + "ffn_norm.weight", s.d_model))
        plans.append(_in(p + "ffn_up.weight", 2 * s.n_ff, s.d_model))  # gate rows, then up rows
        plans.append(_out(p + "ffn_down.weight", s.d_model, s.n_ff))
    return FamilyModel("phi3", keys, plans + _head(s))


def _granite(s: Shape) -> FamilyModel:
    model = _llama(s, "granite")
    model.metadata.update(
        {
            "granite.attention.scale": s.attention_scale,
            "granite.embedding_scale": s.embedding_scale,
            "granite.residual_scale": s.residual_scale,
            "granite.logit_scale": s.logit_scale,
        }
    )
    return model


def _olmo2(s: Shape) -> FamilyModel:
    """No norm before attention or the FFN: norms after both, and q/k norms over the whole
    projection (all heads at once)."""
    plans = _embeddings(s)
    for i in range(s.n_layers):
        p = f"blk.{i}."
        plans += _qkvo(s, p)
        plans.append(_norm(p + "attn_q_norm.weight", s.n_heads * s.head_dim))
        plans.append(_norm(p + "attn_k_norm.weight", s.n_kv_heads * s.head_dim))
        plans.append(_norm(p + "post_attention_norm.weight", s.d_model))
        plans += _swiglu(s, p)
        plans.append(_norm(p + "post_ffw_norm.weight", s.d_model))
    keys = _common_keys(s, "olmo2")
    if s.head_dim * s.n_heads != s.d_model:
        keys.update(_head_dim_keys(s, "olmo2"))
    return FamilyModel("olmo2", keys, plans + _head(s))


def _smollm3(s: Shape) -> FamilyModel:
    # llama.cpp leaves out rope on every fourth layer (a constant of its smollm3, no key)
    return _llama(s, "smollm3")


FAMILIES = {
    "llama": _llama,
    "llama3": _llama,
    "mistral": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "phi3": _phi3,
    "granite": _granite,
    "olmo2": _olmo2,
    "smollm3": _smollm3,
    "mixtral": _llama,
    "qwen3moe": lambda s: _qwen3(s, "qwen3moe"),
    "qwen2moe": lambda s: _qwen2(s, "qwen2moe"),
    "olmoe": _olmoe,
}


def family_model(s: Shape) -> FamilyModel:
    return FAMILIES[s.family](s)
