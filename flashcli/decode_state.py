"""What changes while decoding, and what a batch feeds its graphs (model.py's run state).

The KV cache is llama.cpp's layout: per layer K rows [n_ctx, kv_dim] and V transposed
[kv_dim, n_ctx], both float16; masks hide the positions a token may not see, so rolling back is
moving n_past.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig


@dataclass
class DecodeState:
    """What changes while decoding: the KV cache (llama.cpp's layout) and the position."""

    k: list  # per layer [n_ctx, kv_dim] float16: one row per position
    v: list  # per layer [kv_dim, n_ctx] float16: transposed, one row per value dimension
    n_past: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, n_ctx: int) -> DecodeState:
        return cls(
            [np.zeros((n_ctx, cfg.kv_dim), np.float16) for _ in range(cfg.n_layers)],
            [np.zeros((cfg.kv_dim, n_ctx), np.float16) for _ in range(cfg.n_layers)],
        )

    @property
    def n_ctx(self) -> int:
        return self.k[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)


class BatchInputs:
    """The per-batch inputs of a graph: embeddings, positions, cache rows, masks, output rows.
    Graphs bind these arrays once; each eval refills them."""

    def __init__(self, cfg: ModelConfig, n: int, n_out: int, window: int):
        self.n, self.n_out, self.window = n, n_out, window
        self.x = np.zeros((n, cfg.d_model), np.float32)
        self.pos = np.zeros((1, n), np.int32)
        self.k_rows = np.zeros((1, n), np.int64)
        self.v_rows = np.zeros((1, n * cfg.kv_dim), np.int64)
        self.mask = np.zeros((n, window), np.float32)
        self.mask_swa = np.zeros((n, window), np.float32) if cfg.sliding_window else None
        self.out_rows = np.arange(n - n_out, n, dtype=np.int32)[None, :]

    def fill(self, cfg: ModelConfig, x: np.ndarray, p0: int, n_ctx: int):
        n = self.n
        pos = np.arange(p0, p0 + n)
        self.x[...] = x
        self.pos[0] = pos
        self.k_rows[0] = pos
        self.v_rows[0] = (np.arange(cfg.kv_dim)[None, :] * n_ctx + pos[:, None]).reshape(-1)
        keys = np.arange(self.window)[None, :]
        self.mask[...] = np.where(keys <= pos[:, None], 0.0, -np.inf)
        if self.mask_swa is not None:
            visible = (keys <= pos[:, None]) & (pos[:, None] - keys < cfg.sliding_window)
            self.mask_swa[...] = np.where(visible, 0.0, -np.inf)
