"""A short float32 numpy forward pass, independent of ggml: the yardstick for tests.

Weights are dequantized by gguf-py's own dequantizers, so this path shares no kernel with the
fast engine. Slow (it dequantizes every weight once) and only meant for small models.
"""

from __future__ import annotations

import numpy as np

from flashcli.engine.config import ModelConfig
from flashcli.engine.gguf_file import GGUFFile, TensorInfo


def dequantize(t: TensorInfo) -> np.ndarray:
    """A tensor as float32 of shape (n_rows, row_len)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    values = gguf_dequantize(t.raw, GGMLQuantizationType(t.ggml_type))
    return np.asarray(values, dtype=np.float32).reshape(t.n_rows, t.row_len)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope_angles(cfg: ModelConfig, positions: np.ndarray, freq_factors: np.ndarray | None):
    """cos, sin of shape (n_tokens, rope_dim // 2) for llama's adjacent-pair rotation."""
    inv_freq = cfg.rope_base ** (-np.arange(0, cfg.rope_dim, 2, dtype=np.float64) / cfg.rope_dim)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors
    angles = (positions[:, None].astype(np.float64) / cfg.rope_scale) * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rope_dim: int) -> np.ndarray:
    """x: (n_tokens, n_heads, head_dim); rotates pairs (2i, 2i+1) of the first rope_dim values."""
    out = x.copy()
    x0 = x[..., 0:rope_dim:2]
    x1 = x[..., 1:rope_dim:2]
    c, s = cos[:, None, :], sin[:, None, :]
    out[..., 0:rope_dim:2] = x0 * c - x1 * s
    out[..., 1:rope_dim:2] = x0 * s + x1 * c
    return out


def ffn_activation(gate: np.ndarray, kind: str) -> np.ndarray:
    if kind == "relu":
        return np.maximum(gate, 0.0)
    return gate / (1.0 + np.exp(-gate))


class ReferenceModel:
    """Dense float32 forward over a whole token sequence (no cache)."""

    def __init__(self, gf: GGUFFile, cfg: ModelConfig | None = None):
        self.cfg = cfg or ModelConfig.from_gguf(gf)
        self.gf = gf
        self.w = {}

    def weight(self, name: str) -> np.ndarray:
        if name not in self.w:
            self.w[name] = dequantize(self.gf.tensor(name))
        return self.w[name]

    def ffn_input_and_activations(self, tokens):
        """Per layer: the FFN input (normed) and act(gate)*up, for calibration and tests."""
        return self._forward(tokens, record=True)[1]

    def logits(self, tokens) -> np.ndarray:
        """(n_tokens, n_vocab) logits at every position."""
        return self._forward(tokens, record=False)[0]

    def _forward(self, tokens, record: bool):
        cfg = self.cfg
        tokens = np.asarray(tokens, dtype=np.int64)
        n = len(tokens)
        x = self.weight("token_embd.weight")[tokens]  # (n, d)
        freq = self.gf.tensor("rope_freqs.weight") if self.gf.has("rope_freqs.weight") else None
        cos, sin = rope_angles(cfg, np.arange(n), None if freq is None else dequantize(freq)[0])
        mask = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
        group = cfg.n_heads // cfg.n_kv_heads
        records = []
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            # attention: (n, d) -> q (n, H, hd), k/v (n, Hkv, hd)
            h = rms_norm(x, self.weight(p + "attn_norm.weight")[0], cfg.norm_eps)
            q = (h @ self.weight(p + "attn_q.weight").T).reshape(n, cfg.n_heads, cfg.head_dim)
            k = (h @ self.weight(p + "attn_k.weight").T).reshape(n, cfg.n_kv_heads, cfg.head_dim)
            v = (h @ self.weight(p + "attn_v.weight").T).reshape(n, cfg.n_kv_heads, cfg.head_dim)
            q = apply_rope(q, cos, sin, cfg.rope_dim)
            k = apply_rope(k, cos, sin, cfg.rope_dim)
            k = np.repeat(k, group, axis=1)
            v = np.repeat(v, group, axis=1)
            scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(cfg.head_dim) + mask  # (H, n, n)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            attn = np.einsum("hqk,khd->qhd", scores, v).reshape(n, cfg.n_heads * cfg.head_dim)
            x = x + attn @ self.weight(p + "attn_output.weight").T
            # feed-forward: act(gate h) * (up h), then down
            h = rms_norm(x, self.weight(p + "ffn_norm.weight")[0], cfg.norm_eps)
            gate = h @ self.weight(p + "ffn_gate.weight").T  # (n, n_ff)
            up = h @ self.weight(p + "ffn_up.weight").T
            a = ffn_activation(gate, cfg.ffn_activation) * up
            if record:
                records.append((h, a))
            x = x + a @ self.weight(p + "ffn_down.weight").T
        x = rms_norm(x, self.weight("output_norm.weight")[0], cfg.norm_eps)
        head = "token_embd.weight" if cfg.tied_output else "output.weight"
        return x @ self.weight(head).T, records
