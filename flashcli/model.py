"""The forward pass: llama-family transformer over GGUF weights, matrix work in ggml.

Per layer and per batch of n tokens (shapes in brackets, d = d_model):
  graph "attn_in":  x[n,d] -> rms_norm -> q[n,H*hd], k[n,Hkv*hd], v[n,Hkv*hd]
  numpy:            rope(q, k); append k, v to the KV cache; causal attention -> a[n,H*hd]
  graph "attn_out": x + Wo a -> x2[n,d]; rms_norm(x2) -> h[n,d]; then the FFN on h, added to x2
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


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class Weights:
    """Resident weights: views into the memory-mapped GGUF, by GGUF tensor name."""

    def __init__(self, gf: GGUFFile, cfg: ModelConfig, skip_ffn: bool = False):
        self.gf = gf
        for name, t in gf.tensors.items():
            if t.ggml_type not in SUPPORTED_TYPES and name.endswith(".weight") and not name.startswith("flash."):
                raise UnsupportedModel(f"{gf.path}: tensor {name} has type {t.type_name}, not supported")
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

    k: list  # per layer [n_kv_heads, n_ctx, head_dim] float32
    v: list
    n_past: int = 0
    stats: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, cfg: ModelConfig, n_ctx: int) -> "DecodeState":
        shape = (cfg.n_kv_heads, n_ctx, cfg.head_dim)
        return cls([np.zeros(shape, np.float32) for _ in range(cfg.n_layers)],
                   [np.zeros(shape, np.float32) for _ in range(cfg.n_layers)])

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
                 ffn=None, gguf_file: GGUFFile | None = None):
        self.gf = gguf_file or GGUFFile(path)
        self.cfg = ModelConfig.from_gguf(self.gf)
        self.weights = Weights(self.gf, self.cfg, skip_ffn=ffn is not None)
        self.ffn = ffn if ffn is not None else DenseFFN(self.weights, self.cfg)
        self.n_ctx = min(n_ctx or DEFAULT_CONTEXT, self.cfg.context_length)
        self.pool = ggml.ThreadPool(n_threads or default_threads())
        self.state = DecodeState.empty(self.cfg, self.n_ctx)
        self._graphs = {}  # n_tokens -> per-layer graphs, kept for the last two batch sizes
        inv = self.cfg.rope_base ** (-np.arange(0, self.cfg.rope_dim, 2, dtype=np.float64) / self.cfg.rope_dim)
        if self.weights.rope_freqs is not None:
            inv = inv / self.weights.rope_freqs.astype(np.float64)
        self._inv_freq = inv

    def reset(self):
        self.state.n_past = 0
        if hasattr(self.ffn, "reset"):
            self.ffn.reset()

    # --- one batch ---------------------------------------------------------------------------

    def eval(self, tokens, all_logits: bool = False) -> np.ndarray:
        """Run `tokens` after the current state. Logits [n, vocab] if all_logits, else [vocab]."""
        cfg, st = self.cfg, self.state
        tokens = np.asarray(tokens, dtype=np.int64)
        n = len(tokens)
        if n == 0:
            raise ValueError("no tokens to evaluate")
        if st.n_past + n > self.n_ctx:
            raise ValueError(f"context full: {st.n_past} + {n} tokens > n_ctx {self.n_ctx}")
        if tokens.min() < 0 or tokens.max() >= cfg.n_vocab:
            raise ValueError("token id out of range")
        graphs = self._graphs_for(n, all_logits)
        cos, sin = self._rope(st.n_past, n)
        x = self.weights.embed(tokens)  # [n, d]
        for i, (g_in, g_out) in enumerate(graphs["layers"]):
            g_in.x[...] = x
            g_in.g.compute()  # q, k, v
            q = g_in.q.reshape(n, cfg.n_heads, cfg.head_dim)
            k = g_in.k.reshape(n, cfg.n_kv_heads, cfg.head_dim)
            v = g_in.v.reshape(n, cfg.n_kv_heads, cfg.head_dim)
            g_out.a[...] = self._attention(i, _rope(q, cos, sin, cfg.rope_dim), _rope(k, cos, sin, cfg.rope_dim), v)
            g_out.x[...] = x
            g_out.g.compute()  # x2 = x + Wo a; h = norm(x2); [dense: + ffn(h)]
            if self.ffn.fused:
                x = g_out.y.copy()
            else:
                x = g_out.y + self.ffn.forward(i, g_out.h)
        st.n_past += n
        head = graphs["head"]
        head.x[...] = x if all_logits else x[-1:]
        head.g.compute()
        return head.y.copy() if all_logits else head.y[0].copy()

    def _attention(self, layer: int, q, k, v) -> np.ndarray:
        """q [n,H,hd], k/v [n,Hkv,hd] at positions n_past.. -> [n, H*hd], causal."""
        cfg, st = self.cfg, self.state
        n, p0 = q.shape[0], st.n_past
        K, V = st.k[layer], st.v[layer]  # [Hkv, n_ctx, hd]
        K[:, p0 : p0 + n] = k.transpose(1, 0, 2)
        V[:, p0 : p0 + n] = v.transpose(1, 0, 2)
        T = p0 + n
        group = cfg.n_heads // cfg.n_kv_heads
        # [Hkv, group*n, hd]: query heads sharing one kv head side by side
        qg = q.reshape(n, cfg.n_kv_heads, group, cfg.head_dim).transpose(1, 2, 0, 3).reshape(cfg.n_kv_heads, group * n, cfg.head_dim)
        scores = np.matmul(qg, K[:, :T].transpose(0, 2, 1)) * (1.0 / np.sqrt(cfg.head_dim))  # [Hkv, group*n, T]
        if n > 1:
            future = np.arange(T)[None, :] > (p0 + np.arange(n))[:, None]  # [n, T]
            scores = scores.reshape(cfg.n_kv_heads, group, n, T)
            scores[:, :, future] = -np.inf
            scores = scores.reshape(cfg.n_kv_heads, group * n, T)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        out = np.matmul(scores, V[:, :T])  # [Hkv, group*n, hd]
        return out.reshape(cfg.n_kv_heads, group, n, cfg.head_dim).transpose(2, 0, 1, 3).reshape(n, cfg.n_heads * cfg.head_dim)

    def _rope(self, p0: int, n: int):
        pos = np.arange(p0, p0 + n, dtype=np.float64) / self.cfg.rope_scale
        angles = pos[:, None] * self._inv_freq[None, :]
        return np.cos(angles).astype(np.float32)[:, None, :], np.sin(angles).astype(np.float32)[:, None, :]

    # --- graphs ------------------------------------------------------------------------------

    def _graphs_for(self, n: int, all_logits: bool):
        key = (n, all_logits)
        if key not in self._graphs:
            if len(self._graphs) >= 2:
                self._graphs.pop(next(k for k in self._graphs if k != (1, False)), None)
            self._graphs[key] = {
                "layers": [(self._attn_in_graph(i, n), self._attn_out_graph(i, n)) for i in range(self.cfg.n_layers)],
                "head": self._head_graph(n if all_logits else 1),
            }
        return self._graphs[key]

    def _attn_in_graph(self, i: int, n: int):
        cfg, w = self.cfg, self.weights.layers[i]
        qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        g = ggml.Graph(self.pool, arena_bytes=4 * n * (2 * cfg.d_model + qkv) + 4096 * 8)
        L = g.L
        x_t, x = g.input(cfg.d_model, n)
        h = L.mul(g.ctx, L.rms_norm(g.ctx, x_t, cfg.norm_eps), g.external(w["attn_norm"], ggml.F32, cfg.d_model))
        out = _Bound(g=g, x=x)
        out.q = g.output(L.mul_mat(g.ctx, _w(g, w["attn_q"]), h))
        out.k = g.output(L.mul_mat(g.ctx, _w(g, w["attn_k"]), h))
        out.v = g.output(L.mul_mat(g.ctx, _w(g, w["attn_v"]), h))
        g.finish()
        return out

    def _attn_out_graph(self, i: int, n: int):
        cfg, w = self.cfg, self.weights.layers[i]
        fused = self.ffn.fused
        ff = cfg.n_ff if fused else 0
        g = ggml.Graph(self.pool, arena_bytes=4 * n * (6 * cfg.d_model + 4 * ff + cfg.n_heads * cfg.head_dim) + 4096 * 12)
        L = g.L
        x_t, x = g.input(cfg.d_model, n)
        a_t, a = g.input(cfg.n_heads * cfg.head_dim, n)
        x2 = L.add(g.ctx, x_t, L.mul_mat(g.ctx, _w(g, w["attn_output"]), a_t))
        h = L.mul(g.ctx, L.rms_norm(g.ctx, x2, cfg.norm_eps), g.external(w["ffn_norm"], ggml.F32, cfg.d_model))
        out = _Bound(g=g, x=x, a=a)
        if fused:
            out.y = g.output(L.add(g.ctx, x2, self.ffn.build(g, i, h)))
        else:
            out.y = g.output(x2)
            out.h = g.output(h)
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


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rope_dim: int) -> np.ndarray:
    """Rotate adjacent pairs (2i, 2i+1) of the first rope_dim values; x [n, heads, hd]."""
    x0 = x[..., 0:rope_dim:2]
    x1 = x[..., 1:rope_dim:2]
    out = x.copy()
    out[..., 0:rope_dim:2] = x0 * cos - x1 * sin
    out[..., 1:rope_dim:2] = x0 * sin + x1 * cos
    return out
