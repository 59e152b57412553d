"""The forward pass: llama-family transformer over GGUF weights, matrix work in ggml.

Per layer and per batch of n tokens (shapes in brackets, d = d_model, W = attention window):
  graph "attn_in":  x[n,d] -> rms_norm -> q[n,H*hd], k[n,Hkv*hd], v[n,Hkv*hd]; rope(q, k)
  numpy:            append k, v to the f16 KV cache
  graph "attn_out": softmax(q K^T / sqrt(hd) + causal mask) V -> a[n,H*hd]; x + Wo a -> x2[n,d];
                    rms_norm(x2) -> h[n,d]; then the FFN on h, added to x2
Attention follows llama.cpp's CPU path op for op (f16 cache, window padded to 256 positions) so
that rounding matches: quantized matmuls re-quantize their inputs to 8 bits, which turns the
smallest difference upstream into visible logit noise.
The FFN is pluggable: the dense one is fused into the "attn_out" graph; a sparse one (flash
generation) reads h, computes on the neurons it chose and returns its output to add.
Config, resident weights and decode state are kept apart: ModelConfig, Weights, DecodeState.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from . import ggml
from .config import ModelConfig
from .errors import UnsupportedModel
from .gguf_file import GGUFFile, TensorInfo

# Weight types the engine runs (ggml type ids).
SUPPORTED_TYPES = {
    0: "F32", 1: "F16", 30: "BF16", 8: "Q8_0", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
}
DEFAULT_CONTEXT = 4096
KV_PAD = 256  # attention runs over the cache window rounded up to this, as in llama.cpp


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def check_weight_types(gf: GGUFFile):
    """Every weight tensor must have a type the engine runs."""
    for name, t in gf.tensors.items():
        if name.endswith(".weight") and t.ggml_type not in SUPPORTED_TYPES:
            raise UnsupportedModel(f"{gf.path}: tensor {name} has type {t.type_name}, not supported")


class Weights:
    """Resident weights: views into the memory-mapped GGUF, by GGUF tensor name."""

    def __init__(self, gf: GGUFFile, cfg: ModelConfig, skip_ffn: bool = False):
        self.gf = gf
        check_weight_types(gf)
        self.token_embd = gf.tensor("token_embd.weight")
        self.output = gf.tensor("token_embd.weight" if cfg.tied_output else "output.weight")
        self.output_norm = _f32(gf.tensor("output_norm.weight"))
        self.rope_freqs = _f32(gf.tensor("rope_freqs.weight")) if gf.has("rope_freqs.weight") else None
        self.layers = []
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            layer = {
                "attn_norm": _f32(gf.tensor(p + "attn_norm.weight")),
                "ffn_norm": _f32(gf.tensor(p + "ffn_norm.weight")),
                "attn_q": gf.tensor(p + "attn_q.weight"),
                "attn_k": gf.tensor(p + "attn_k.weight"),
                "attn_v": gf.tensor(p + "attn_v.weight"),
                "attn_output": gf.tensor(p + "attn_output.weight"),
            }
            if not skip_ffn:
                for name in ("ffn_gate", "ffn_up", "ffn_down"):
                    layer[name] = gf.tensor(p + name + ".weight")
            self.layers.append(layer)
        from .budget import resident_names

        ffn = [f"blk.{i}.{n}.weight" for i in range(cfg.n_layers) for n in ("ffn_gate", "ffn_up", "ffn_down")]
        gf.prefetch(resident_names(gf, cfg) + ([] if skip_ffn else ffn))

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """Token ids [n] -> embeddings [n, d] (reads only those rows)."""
        t = self.token_embd
        return ggml.dequantize_rows(t.rows()[tokens], t.ggml_type, t.row_len)


def _f32(t: TensorInfo) -> np.ndarray:
    return ggml.dequantize_rows(t.rows(), t.ggml_type, t.row_len)[0] if t.ggml_type != 0 else np.asarray(t.raw.view(np.float32))


def _w(g: ggml.Graph, t: TensorInfo) -> ggml.TensorP:
    return g.external(t.raw, t.ggml_type, t.row_len, t.n_rows)


@dataclass
class DecodeState:
    """What changes while decoding: the KV cache and the position."""

    k: list  # per layer [n_kv_heads, n_ctx, head_dim] float16, as llama.cpp keeps it
    v: list  # per layer [n_kv_heads, head_dim, n_ctx] float16 (transposed, as llama.cpp)
    n_past: int = 0
    stats: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, cfg: ModelConfig, n_ctx: int) -> "DecodeState":
        return cls([np.zeros((cfg.n_kv_heads, n_ctx, cfg.head_dim), np.float16) for _ in range(cfg.n_layers)],
                   [np.zeros((cfg.n_kv_heads, cfg.head_dim, n_ctx), np.float16) for _ in range(cfg.n_layers)])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)


class DenseFFN:
    """The FFN of the source file, computed whole inside the layer graph."""

    fused = True

    def __init__(self, weights: Weights, cfg: ModelConfig):
        self.weights = weights
        self.cfg = cfg

    def build(self, g: ggml.Graph, layer: int, h: ggml.TensorP) -> ggml.TensorP:
        L, w = g.L, self.weights.layers[layer]
        gate = L.mul_mat(g.ctx, _w(g, w["ffn_gate"]), h)  # [n, n_ff]
        up = L.mul_mat(g.ctx, _w(g, w["ffn_up"]), h)  # [n, n_ff]
        act = L.relu(g.ctx, gate) if self.cfg.ffn_activation == "relu" else L.silu(g.ctx, gate)
        return L.mul_mat(g.ctx, _w(g, w["ffn_down"]), L.mul(g.ctx, act, up))  # [n, d]


class Model:
    """A loaded model: `eval(tokens)` appends tokens to the decode state and returns logits."""

    def __init__(self, path, n_threads: int | None = None, n_ctx: int | None = None,
                 ffn=None, gguf_file: GGUFFile | None = None, pool: ggml.ThreadPool | None = None):
        self.gf = gguf_file or GGUFFile(path)
        self.cfg = ModelConfig.from_gguf(self.gf)
        self.weights = Weights(self.gf, self.cfg, skip_ffn=ffn is not None)
        if ffn is None and not self.gf.has("blk.0.ffn_gate.weight") and self.gf.has("blk.0.ffn_bundle"):
            raise UnsupportedModel(f"{self.gf.path}: a converted file: run it with --dram-budget (flash generation)")
        self.ffn = ffn if ffn is not None else DenseFFN(self.weights, self.cfg)
        self.n_ctx = min(n_ctx or DEFAULT_CONTEXT, self.cfg.context_length)
        self.pool = pool or ggml.ThreadPool(n_threads or default_threads())
        self.prompt_batch = 512  # tokens per prompt batch, as llama.cpp's default n_batch/n_ubatch
        self.state = DecodeState.empty(self.cfg, -(-self.n_ctx // KV_PAD) * KV_PAD)
        self._decode_graphs, self._decode_window = None, None  # see _layer_graphs
        self._heads = {}  # n_tokens -> output head graph
        self.on_ffn_input = None  # optional callback(layer, h[n, d]): calibration taps the FFN input

    def reset(self):
        self.state.n_past = 0
        if hasattr(self.ffn, "reset"):
            self.ffn.reset()

    # --- one batch ---------------------------------------------------------------------------

    def eval(self, tokens, all_logits: bool = False, logits: bool = True) -> np.ndarray | None:
        """Run `tokens` after the current state. Logits [n, vocab] if all_logits, else [vocab];
        None with logits=False (calibration needs only the layers, not the output head)."""
        cfg, st = self.cfg, self.state
        tokens = np.asarray(tokens, dtype=np.int64)
        n = len(tokens)
        if n == 0:
            raise ValueError("no tokens to evaluate")
        if st.n_past + n > self.n_ctx:
            raise ValueError(f"context full: {st.n_past} + {n} tokens > n_ctx {self.n_ctx}")
        if tokens.min() < 0 or tokens.max() >= cfg.n_vocab:
            raise ValueError("token id out of range")
        p0, T = st.n_past, st.n_past + n
        window = min(-(-T // KV_PAD) * KV_PAD, st.k[0].shape[1])
        mask = np.where(np.arange(window)[None, :] <= np.arange(p0, T)[:, None], 0.0, -np.inf)
        x = self.weights.embed(tokens)  # [n, d]
        for i, (g_in, g_out) in enumerate(self._layer_graphs(n, window)):
            g_in.x[...] = x
            g_in.pos[...] = np.arange(p0, T, dtype=np.int32)
            g_in.g.compute()  # q, k (roped), v
            st.k[i][:, p0:T] = g_in.k.reshape(n, cfg.n_kv_heads, cfg.head_dim).transpose(1, 0, 2)
            st.v[i][:, :, p0:T] = g_in.v.reshape(n, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2, 0)
            g_out.q[...] = g_in.q.reshape(n, cfg.n_heads, cfg.head_dim).transpose(1, 0, 2)  # [H, n, hd]
            g_out.mask[...] = mask
            g_out.x[...] = x
            g_out.g.compute()  # attention; x2 = x + Wo a; h = norm(x2); [dense: + ffn(h)]
            if self.on_ffn_input:
                self.on_ffn_input(i, g_out.h)
            if self.ffn.fused:
                x = g_out.y.copy()
            else:
                x = g_out.y + self.ffn.forward(i, g_out.h)
        st.n_past = T
        if not logits:
            return None
        head = self._head(n if all_logits else 1)
        head.x[...] = x if all_logits else x[-1:]
        head.g.compute()
        return head.y.copy() if all_logits else head.y[0].copy()

    # --- graphs ------------------------------------------------------------------------------

    def _layer_graphs(self, n: int, window: int):
        """Per layer (attn_in, attn_out) graphs. Single-token graphs are built once per window and
        kept; a prompt batch's graphs are built layer by layer and dropped, so their activation
        arenas (which grow with n) never all exist at once."""
        if n > 1:
            return ((self._attn_in_graph(i, n), self._attn_out_graph(i, n, window)) for i in range(self.cfg.n_layers))
        if self._decode_window != window:
            self._decode_graphs = [(self._attn_in_graph(i, 1), self._attn_out_graph(i, 1, window)) for i in range(self.cfg.n_layers)]
            self._decode_window = window
        return self._decode_graphs

    def _head(self, n: int):
        if n not in self._heads:
            if len(self._heads) > 1:
                self._heads.pop(max(self._heads))
            self._heads[n] = self._head_graph(n)
        return self._heads[n]

    def _attn_in_graph(self, i: int, n: int):
        cfg, w = self.cfg, self.weights.layers[i]
        qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        g = ggml.Graph(self.pool, arena_bytes=4 * n * (2 * cfg.d_model + 2 * qkv) + 4096 * 8)  # + roped q, k
        L = g.L
        x_t, x = g.input(cfg.d_model, n)
        h = L.mul(g.ctx, L.rms_norm(g.ctx, x_t, cfg.norm_eps), g.external(w["attn_norm"], ggml.F32, cfg.d_model))
        pos = np.zeros(n, np.int32)
        pos_t = g.external(pos, ggml.I32, n)
        freqs = None if self.weights.rope_freqs is None else g.external(self.weights.rope_freqs, ggml.F32, cfg.rope_dim // 2)

        def rope(t, heads):  # [heads*hd, n] -> [hd, heads, n], rotated by position (llama: mode 0)
            t = L.reshape_3d(g.ctx, t, cfg.head_dim, heads, n)
            return L.rope_ext(g.ctx, t, pos_t, freqs, cfg.rope_dim, 0, cfg.context_length, cfg.rope_base,
                              1.0 / cfg.rope_scale, 0.0, 1.0, 32.0, 1.0)

        out = _Bound(g=g, x=x, pos=pos)
        out.q = g.output(rope(L.mul_mat(g.ctx, _w(g, w["attn_q"]), h), cfg.n_heads))
        out.k = g.output(rope(L.mul_mat(g.ctx, _w(g, w["attn_k"]), h), cfg.n_kv_heads))
        out.v = g.output(L.mul_mat(g.ctx, _w(g, w["attn_v"]), h))
        g.finish()
        return out

    def _attn_out_graph(self, i: int, n: int, window: int):
        cfg, w, st = self.cfg, self.weights.layers[i], self.state
        H, Hkv, hd, ctx = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, st.k[i].shape[1]
        fused = self.ffn.fused
        ff = cfg.n_ff if fused else 0
        g = ggml.Graph(self.pool, arena_bytes=4 * n * (8 * cfg.d_model + 4 * ff + 3 * H * hd + 2 * H * window) + 4096 * 24)
        L = g.L
        x_t, x = g.input(cfg.d_model, n)
        q = np.zeros((H, n, hd), np.float32)
        q_t = g.strided(q, ggml.F32, (hd, n, H), (hd * 4, n * hd * 4))
        mask_t, mask = g.input(window, n)
        # kq [W, n, H] = K q; query head h reads kv head h // (H / Hkv) (ggml broadcasting)
        k_t = g.strided(st.k[i], ggml.F16, (hd, window, Hkv), (hd * 2, ctx * hd * 2))
        kq = L.soft_max_ext(g.ctx, L.mul_mat(g.ctx, k_t, q_t), mask_t, 1.0 / float(np.sqrt(hd)), 0.0)
        v_t = g.strided(st.v[i], ggml.F16, (window, hd, Hkv), (ctx * 2, hd * ctx * 2))
        kqv = L.mul_mat(g.ctx, v_t, kq)  # [hd, n, H]
        a_t = L.reshape_2d(g.ctx, L.cont(g.ctx, L.permute(g.ctx, kqv, 0, 2, 1, 3)), H * hd, n)  # [H*hd, n]
        x2 = L.add(g.ctx, x_t, L.mul_mat(g.ctx, _w(g, w["attn_output"]), a_t))
        h = L.mul(g.ctx, L.rms_norm(g.ctx, x2, cfg.norm_eps), g.external(w["ffn_norm"], ggml.F32, cfg.d_model))
        out = _Bound(g=g, x=x, q=q, mask=mask, h=g.output(h))
        out.y = g.output(L.add(g.ctx, x2, self.ffn.build(g, i, h)) if fused else x2)
        g.finish()
        return out

    def _head_graph(self, n: int):
        cfg = self.cfg
        g = ggml.Graph(self.pool, arena_bytes=4 * n * (2 * cfg.d_model + cfg.n_vocab) + 4096 * 4)
        L = g.L
        x_t, x = g.input(cfg.d_model, n)
        h = L.mul(g.ctx, L.rms_norm(g.ctx, x_t, cfg.norm_eps), g.external(self.weights.output_norm, ggml.F32, cfg.d_model))
        y = g.output(L.mul_mat(g.ctx, _w(g, self.weights.output), h))
        g.finish()
        return _Bound(g=g, x=x, y=y)


class _Bound:
    """A finished graph and the numpy arrays bound to its inputs and outputs."""

    def __init__(self, **kw):
        self.__dict__.update(kw)
