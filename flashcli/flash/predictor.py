"""Activation predictors at generation time: which FFN neurons of a layer a token needs.

Stored per layer by the converter (converters/predictor_fit.py fits them) as low-rank maps of
the FFN input h: g_hat = B_g (A_g h) estimates the gate pre-activation, and for gated
activations other than ReLU u_hat = B_u (A_u h) the up projection; a neuron is predicted when
its score passes its threshold (ReLU: g_hat; else |act(g_hat) * u_hat| * ||down column||).
"""

from __future__ import annotations

import numpy as np

from ..engine import ggml
from ..engine.bundles import PREDICTOR_TENSOR
from ..engine.gguf_file import GGUFFile


def matrix_type(row_len: int) -> int:
    """Q8_0 (a quarter of float32) where rows split into its blocks of 32, else F16."""
    return 8 if row_len % 32 == 0 else 1


# --- storage: tensors and metadata in the flash GGUF ------------------------------------------


def tensor_names(layer: int) -> dict[str, str]:
    p = PREDICTOR_TENSOR.format(layer=layer)
    return {k: p + k for k in ("gate_a", "gate_b", "threshold", "up_a", "up_b", "down_norm")}


def has_predictor(gf: GGUFFile) -> bool:
    return gf.has(tensor_names(0)["gate_a"])


class PredictorGraph:
    """One layer's predictor in ggml (A and B stay in their stored type, memory-mapped).

    sparsity None: a neuron is predicted when its score passes the calibrated threshold;
    a float s: each token keeps the (1 - s) share of neurons with the highest scores."""

    def __init__(self, gf: GGUFFile, layer: int, pool: ggml.ThreadPool, activation: str, sparsity: float | None = None):
        self.names = {k: n for k, n in tensor_names(layer).items() if gf.has(n)}
        self.gf, self.pool, self.activation, self.sparsity = gf, pool, activation, sparsity
        # copies in our own memory, the file's pages dropped: the budget counts them once
        self.arrays = {k: np.array(gf.tensor(n).raw) for k, n in self.names.items()}
        gf.release(self.names.values())
        self.threshold = self.arrays["threshold"].view(np.float32)
        self.down_norm = self.arrays["down_norm"].view(np.float32) if "down_norm" in self.arrays else None
        self._graphs = {}  # n tokens -> (graph, h, gate, up)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def _graph(self, n: int):
        if n not in self._graphs:
            gf, names = self.gf, self.names
            g = ggml.Graph(self.pool, max_nodes=16)
            L = g.L
            h_t, h = g.input(gf.tensor(names["gate_a"]).row_len, n)

            def low_rank(prefix):
                ta, tb = gf.tensor(names[prefix + "_a"]), gf.tensor(names[prefix + "_b"])
                wa = g.external(self.arrays[prefix + "_a"], ta.ggml_type, ta.row_len, ta.n_rows)
                wb = g.external(self.arrays[prefix + "_b"], tb.ggml_type, tb.row_len, tb.n_rows)
                return g.output(L.mul_mat(g.ctx, wb, L.mul_mat(g.ctx, wa, h_t)))

            gate = low_rank("gate")
            up = low_rank("up") if "up_a" in names else None
            g.finish()
            self._graphs[n] = (g, h, g.array(gate), None if up is None else g.array(up))
        return self._graphs[n]

    def scores(self, h: np.ndarray) -> np.ndarray:
        """h [n, d] -> scores [n, n_ff], comparable with the thresholds."""
        g, h_in, gate, up = self._graph(h.shape[0])
        h_in[...] = h
        g.compute()
        scores = neuron_scores(gate, up, self.down_norm, self.activation)
        if h.shape[0] > 1:  # a prompt batch's graph goes: every layer keeping one adds up
            del self._graphs[h.shape[0]]
        return scores

    def predict(self, h: np.ndarray) -> list:
        """h [n, d] -> per token, the ascending ids of its predicted neurons."""
        scores = self.scores(h)
        if self.sparsity is None:
            return [np.flatnonzero(row > self.threshold) for row in scores]
        keep = max(1, int(round((1.0 - self.sparsity) * scores.shape[1])))
        ranked = scores - self.threshold  # the margin over each neuron's calibrated threshold
        return [np.sort(np.argpartition(-row, keep - 1)[:keep]) for row in ranked]


def neuron_scores(gate: np.ndarray, up: np.ndarray | None, down_norm: np.ndarray | None, kind: str) -> np.ndarray:
    """A new array [n, n_ff]: each neuron's score, from the estimated gate (and up) projections,
    compared with its threshold (the converter fits thresholds on these same scores). ReLU: g_hat
    (active iff > 0); other activations: the estimated contribution |act(g_hat) * u_hat| * ||down column||."""
    if up is None:
        return gate.copy()
    return np.abs(activation(gate, kind) * up) * down_norm


def activation(g: np.ndarray, kind: str) -> np.ndarray:
    """act(g) in numpy: relu, silu, or gelu with the tanh approximation (ggml's gelu)."""
    if kind == "relu":
        return np.maximum(g, 0.0)
    if kind == "gelu":
        return 0.5 * g * (1.0 + np.tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    return g / (1.0 + np.exp(-g))
