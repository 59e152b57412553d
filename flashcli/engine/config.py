"""ModelConfig: the shape of a model, built once from GGUF metadata, in one place."""

from __future__ import annotations

from dataclasses import dataclass

from ..arch import ARCHITECTURES
from ..arch.architecture import MULTIPLIER_KEYS, Architecture
from ..errors import BadModelFile, UnsupportedModel
from .bundles import ACTIVATION, layout_of
from .gguf_file import GGUFFile

FFN_ACTIVATIONS = ("silu", "gelu", "relu")
SOFTCAP_KEYS = ("attn_logit_softcapping", "final_logit_softcapping")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layers: int
    d_model: int
    n_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_dim: int
    rope_base: float
    rope_scale: float  # linear position scaling (1.0 = none)
    rope_base_swa: float  # rope base of sliding-window layers
    sliding_window: int  # tokens a sliding-window layer sees (0: no such layers)
    swa_layers: tuple  # per layer: True where attention is a sliding window
    norm_eps: float
    n_vocab: int
    context_length: int
    tied_output: bool  # output head shares token_embd.weight
    ffn_activation: str  # "silu" (SwiGLU), "gelu" (GeGLU) or "relu" (relu(gate) * up)
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos: bool
    ffn_layout: str | None  # a converted file's FFN layout, "rows" or "bundles" (bundles.py); None: plain
    rope_layers: tuple = ()  # per layer: False where q and k get no rope (SmolLM3); () every layer
    attn_softcap: float = 0.0  # attention scores capped as cap * tanh(s / cap) (0: none)
    final_softcap: float = 0.0  # logits capped the same way (0: none)
    # the family's metadata multipliers (arch/architecture.MULTIPLIER_KEYS), 0 where unset
    attention_scale: float = 0.0
    embedding_multiplier: float = 0.0
    residual_multiplier: float = 0.0
    logit_scale: float = 0.0
    rope_original_context: int = 0  # LongRoPE's original context: longer contexts use its long factors
    rope_attn_factor: float = 1.0  # rope's magnitude scale (LongRoPE's attention factor)
    # a mixture of experts (0 experts: a dense FFN): a token uses n_expert_used of each layer's
    # n_expert experts of width n_ff_exp, as the layer's router picks; n_ff_shexp > 0: plus a
    # shared expert of that width every token uses (qwen2moe)
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0

    @property
    def family(self) -> Architecture:
        return ARCHITECTURES[self.arch]

    @property
    def moe(self) -> bool:
        return self.n_expert > 0

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def is_swa(self, layer: int) -> bool:
        return self.swa_layers[layer]

    def uses_rope(self, layer: int) -> bool:
        return not self.rope_layers or self.rope_layers[layer]

    def layer_rope_base(self, layer: int) -> float:
        return self.rope_base_swa if self.is_swa(layer) else self.rope_base

    @classmethod
    def from_gguf(cls, gf: GGUFFile) -> ModelConfig:
        arch = gf.get("general.architecture")
        if arch is None:
            raise BadModelFile(f"{gf.path}: no general.architecture in metadata")
        family = ARCHITECTURES.get(arch)
        if family is None:
            raise UnsupportedModel(
                f"{gf.path}: architecture '{arch}' is not supported (supported: {', '.join(ARCHITECTURES)})"
            )
        for key in family.unsupported_keys:
            value = gf.get(f"{arch}.{key}")
            if value not in (None, 0, 0.0):
                raise UnsupportedModel(f"{gf.path}: {arch} with {key} = {value} is not supported")

        def need(key):
            value = gf.get(f"{arch}.{key}")
            if value is None:
                raise BadModelFile(f"{gf.path}: missing metadata {arch}.{key}")
            if isinstance(value, list):
                raise UnsupportedModel(f"{gf.path}: per-layer {arch}.{key} is not supported")
            return value

        d_model = int(need("embedding_length"))
        n_heads = int(need("attention.head_count"))
        head_dim = int(gf.get(f"{arch}.attention.key_length", d_model // n_heads))
        if int(gf.get(f"{arch}.attention.value_length", head_dim)) != head_dim:
            raise UnsupportedModel(f"{gf.path}: different key and value head sizes are not supported")
        scaling_type = gf.get(f"{arch}.rope.scaling.type", "none")
        rope_scale = 1.0
        if scaling_type == "linear":
            rope_scale = float(gf.get(f"{arch}.rope.scaling.factor", 1.0))
        elif scaling_type not in ("none", "llama3", "longrope", None):
            # llama3 and LongRoPE scaling are carried by factor tensors, applied in the model
            raise UnsupportedModel(f"{gf.path}: rope scaling '{scaling_type}' is not supported")
        tokens = gf.get("tokenizer.ggml.tokens")
        n_vocab = int(gf.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else 0))
        if n_vocab == 0:
            n_vocab = gf.tensor("token_embd.weight").ne[1]
        activation = str(gf.get(ACTIVATION, family.ffn_activation)).lower()
        if activation not in FFN_ACTIVATIONS:
            raise UnsupportedModel(f"{gf.path}: {ACTIVATION} '{activation}' is not supported")
        experts = _experts(gf, arch, family, int(need("feed_forward_length")))
        bos = gf.get("tokenizer.ggml.bos_token_id")
        eos = gf.get("tokenizer.ggml.eos_token_id")
        n_layers = int(need("block_count"))
        window = int(gf.get(f"{arch}.attention.sliding_window", family.default_window)) if family.swa_pattern else 0
        pattern = gf.get(f"{arch}.attention.sliding_window_pattern", family.swa_pattern)
        if isinstance(pattern, list):  # one flag per layer
            swa = tuple(bool(x) for x in pattern[:n_layers])
        else:
            swa = tuple(
                window > 0 and int(pattern) > 0 and i % int(pattern) < int(pattern) - 1 for i in range(n_layers)
            )
        multipliers = {MULTIPLIER_KEYS[k]: float(gf.get(f"{arch}.{k}", 0.0)) for k in family.multipliers}
        if family.softcapping:
            attn_cap, final_cap = (float(gf.get(f"{arch}.{k}", d)) for k, d in zip(SOFTCAP_KEYS, family.softcapping))
        else:
            attn_cap = final_cap = 0.0
        rope_base = float(gf.get(f"{arch}.rope.freq_base", 10000.0))
        step = family.no_rope_every
        rope_layers = tuple((i + 1) % step != 0 for i in range(n_layers)) if step else ()
        context_length = int(gf.get(f"{arch}.context_length", 2048))
        return cls(
            arch=arch,
            n_layers=n_layers,
            d_model=d_model,
            n_ff=int(need("feed_forward_length")),
            n_heads=n_heads,
            n_kv_heads=int(gf.get(f"{arch}.attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            rope_dim=int(gf.get(f"{arch}.rope.dimension_count", head_dim)),
            rope_base=rope_base,
            rope_scale=rope_scale,
            rope_base_swa=float(gf.get(f"{arch}.rope.freq_base_swa", family.rope_base_swa or rope_base)),
            sliding_window=window,
            swa_layers=swa,
            norm_eps=float(gf.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            n_vocab=n_vocab,
            context_length=context_length,
            tied_output=not gf.has("output.weight"),
            ffn_activation=activation,
            bos_token_id=None if bos is None else int(bos),
            eos_token_id=None if eos is None else int(eos),
            add_bos=bool(gf.get("tokenizer.ggml.add_bos_token", True)),
            ffn_layout=layout_of(gf),
            rope_layers=rope_layers,
            attn_softcap=attn_cap,
            final_softcap=final_cap,
            rope_original_context=int(gf.get(f"{arch}.rope.scaling.original_context_length", context_length)),
            rope_attn_factor=float(gf.get(f"{arch}.rope.scaling.attn_factor", 1.0)),
            **multipliers,
            **experts,
        )


def _experts(gf: GGUFFile, arch: str, family: Architecture, n_ff: int) -> dict:
    """The mixture-of-experts fields (all 0 for a dense FFN), read as llama.cpp reads them."""
    n_expert = int(gf.get(f"{arch}.expert_count", 0) or 0)
    if not n_expert:
        return {}
    if family.moe is None:
        raise UnsupportedModel(f"{gf.path}: {arch} with expert_count = {n_expert} is not supported")
    used = int(gf.get(f"{arch}.expert_used_count", 0) or 0)
    if not 0 < used <= n_expert:
        raise BadModelFile(f"{gf.path}: {arch}.expert_used_count = {used} with {n_expert} experts")
    for key in ("expert_gating_func", "expert_group_count", "expert_weights_scale"):
        value = gf.get(f"{arch}.{key}")
        if value not in (None, 0, 0.0, 1, 1.0) or (key == "expert_gating_func" and value not in (None, 1)):
            raise UnsupportedModel(f"{gf.path}: {arch} with {key} = {value} is not supported")
    n_ff_exp = int(gf.get(f"{arch}.expert_feed_forward_length", 0) or 0) if family.moe.width_key else n_ff
    shared = int(gf.get(f"{arch}.expert_shared_feed_forward_length", 0) or 0) if family.moe.shared_expert else 0
    return {
        "n_expert": n_expert,
        "n_expert_used": used,
        "n_ff_exp": n_ff_exp or n_ff // used,
        "n_ff_shexp": shared or (n_ff if family.moe.shared_expert else 0),
    }
