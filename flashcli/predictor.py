"""Activation predictors: which FFN neurons of a layer will matter for the next token.

Kind "lowrank" (one per layer): the gate pre-activation g = W_gate h is linear in the FFN input
h, so a rank-r map fitted to the model's own activations predicts it cheaply:

    g_hat = B (A h)      A: [r, d_model], B: [n_ff, r]

A and B come from reduced-rank regression on calibration inputs X (closed form, no training):
with C = X^T X = L L^T, the best rank-r predictor of X W^T is W^T V_r V_r^T, where V_r are the
top right singular vectors of L^T W^T. So A = V_r^T W, B = V_r.

- ReLU models: neuron j is active iff g_j > 0. Predicted iff g_hat_j > -k * sigma_j, sigma_j the
  predictor's error on neuron j; k is set on held-out calibration tokens for the target recall.
- SwiGLU models: nothing is exactly zero, so "active" means contributing materially. A second
  rank-r map predicts up = W_up h, and the score is |silu(g_hat) * u_hat| * ||down column j||
  (the size of the neuron's contribution to the output); predicted iff the score exceeds a
  per-layer threshold set on held-out tokens so that the predicted set preserves the target
  share of the FFN output.
Misses are skipped, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ggml

KIND = "lowrank"
RELU_RECALL_TARGET = 0.965  # share of truly active (neuron, token) pairs predicted, held-out
SILU_PRESERVE_TARGET = 0.93  # share of the FFN output norm the predicted set keeps, held-out
RELU_RANKS = (64, 128)
RELU_MAX_RATIO = 2.0  # a layer's rank grows until predicted/true <= this, or the last candidate
# SwiGLU: a low-rank predictor of silu(g)*u is weak (SmolLM2: rank 256 still predicts 73-91% of
# neurons to keep 93% of the output), so it stays small; the neuron cache does the saving there.


def matrix_type(row_len: int) -> int:
    """Q8_0 (a quarter of float32) where rows split into its blocks of 32, else F16."""
    return 8 if row_len % 32 == 0 else 1


def _as_stored(m: np.ndarray) -> np.ndarray:
    """m rounded to its storage type: the predictor is calibrated as it will run."""
    qtype = matrix_type(m.shape[1])
    return ggml.dequantize_rows(ggml.quantize_rows(m, qtype), qtype, m.shape[1])


@dataclass
class LayerPredictor:
    gate_a: np.ndarray  # [r, d] float32
    gate_b: np.ndarray  # [n_ff, r]
    threshold: np.ndarray  # [n_ff]: predicted iff score > threshold
    up_a: np.ndarray | None = None  # SwiGLU only
    up_b: np.ndarray | None = None
    down_norm: np.ndarray | None = None  # [n_ff] ||down column||, SwiGLU only

    @property
    def rank(self) -> int:
        return self.gate_a.shape[0]

    @property
    def nbytes(self) -> int:
        arrays = [self.gate_a, self.gate_b, self.threshold, self.up_a, self.up_b, self.down_norm]
        return sum(a.nbytes for a in arrays if a is not None)

    def scores(self, h: np.ndarray) -> np.ndarray:
        """h [n, d] -> scores [n, n_ff], comparable with `threshold`."""
        g = (h @ self.gate_a.T) @ self.gate_b.T
        if self.up_a is None:
            return g
        u = (h @ self.up_a.T) @ self.up_b.T
        return np.abs(g / (1.0 + np.exp(-g)) * u) * self.down_norm

    def predict(self, h: np.ndarray) -> np.ndarray:
        """h [n, d] -> bool [n, n_ff]."""
        return self.scores(h) > self.threshold


@dataclass
class Quality:
    """One layer's predictor measured on calibration tokens used neither to fit nor to set it."""

    rank: int
    true_fraction: float  # ReLU: share of neurons active per token; SwiGLU: nan
    predicted_fraction: float  # share of neurons predicted per token
    recall: float  # ReLU: active pairs predicted / active pairs; SwiGLU: nan
    precision: float  # ReLU: predicted pairs active / predicted pairs
    preserved: float  # share of the FFN output norm kept by the predicted set: 1 - |y - y_p| / |y|

    def as_dict(self) -> dict:
        return {k: float(v) for k, v in self.__dict__.items()}


def _reduced_rank_basis(chol: np.ndarray, w: np.ndarray, rank: int) -> np.ndarray:
    """The top `rank` right singular vectors [n_ff, rank] of M = L^T W^T [d, n_ff].

    Through the eigenvectors of the small Gram matrix M M^T [d, d]: for a 7B layer this is an
    eigendecomposition of 4096^2 instead of a full SVD of 4096 x 11008 (minutes per layer)."""
    m = (chol.T @ w.T).astype(np.float64)  # [d, n_ff]
    evals, u = np.linalg.eigh(m @ m.T)
    top = np.argsort(evals)[::-1][:rank]
    v = m.T @ u[:, top]  # [n_ff, rank] = V S
    return (v / np.maximum(np.linalg.norm(v, axis=0), 1e-30)).astype(np.float32)


def fit_layer(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray, activation: str,
              silu_rank: int | None = None) -> tuple[LayerPredictor, Quality]:
    """Fits one layer's predictor. x: FFN inputs [N, d] on calibration text; weights float32 as
    stored ([n_ff, d] for gate/up, [d, n_ff] for down). x is split in order: 60% to fit A and B,
    20% to set the threshold, 20% to measure the quality reported."""
    x = x.astype(np.float32)
    d = x.shape[1]
    n_fit, n_thr = (3 * len(x)) // 5, (4 * len(x)) // 5
    x_fit, x_val, x_eval = x[:n_fit], x[n_fit:n_thr], x[n_thr:]
    evals, evecs = np.linalg.eigh(x_fit.T.astype(np.float64) @ x_fit)
    chol = (evecs * np.sqrt(np.maximum(evals, 0.0))).astype(np.float32)  # C = L L^T
    g_fit, g_val, g_eval = x_fit @ w_gate.T, x_val @ w_gate.T, x_eval @ w_gate.T
    ranks = [r for r in RELU_RANKS if r <= d // 2] or [max(1, d // 4)]
    silu_rank = silu_rank or int(np.clip(d // 16 // 32 * 32, 32, 256))  # multiples of 32: Q8_0 rows
    basis = _reduced_rank_basis(chol, w_gate, max(ranks) if activation == "relu" else silu_rank)
    if activation == "relu":
        for rank in ranks:
            pred = _fit_relu(basis[:, :rank], w_gate, x_fit, g_fit, x_val, g_val)
            predicted = pred.predict(x_val)
            if predicted.mean() <= RELU_MAX_RATIO * (g_val > 0).mean():
                break
    else:
        pred = _fit_silu(basis, _reduced_rank_basis(chol, w_up, silu_rank), w_gate, w_up, w_down, x_val, g_val)
    return pred, _quality(pred, x_eval, g_eval, w_up, w_down, activation)


def _fit_relu(vr, w_gate, x_fit, g_fit, x_val, g_val):
    a, b = _as_stored((vr.T @ w_gate).astype(np.float32)), _as_stored(vr.astype(np.float32))
    sigma = ((x_fit @ a.T) @ b.T - g_fit).std(0) + 1e-6
    pred = LayerPredictor(a, b, np.zeros(len(b), np.float32))
    s_val = pred.scores(x_val) / sigma
    active = g_val > 0
    # the smallest margin k (predicted iff g_hat > -k sigma) reaching the recall target
    k = float(np.quantile(-s_val[active], RELU_RECALL_TARGET)) if active.any() else 0.0
    pred.threshold = (-k * sigma).astype(np.float32)
    return pred


def _fit_silu(vg, vu, w_gate, w_up, w_down, x_val, g_val):
    down_norm = np.linalg.norm(w_down, axis=0).astype(np.float32)
    pred = LayerPredictor(_as_stored((vg.T @ w_gate).astype(np.float32)), _as_stored(vg.astype(np.float32)),
                          np.zeros(len(vg), np.float32), _as_stored((vu.T @ w_up).astype(np.float32)),
                          _as_stored(vu.astype(np.float32)), down_norm)
    s_val = pred.scores(x_val)
    a_val = _act(g_val, "silu") * (x_val @ w_up.T)
    y = a_val @ w_down.T
    # bisect the threshold on held-out tokens: highest tau whose predicted set keeps the target share
    lo, hi = 0.0, float(s_val.max())
    for _ in range(20):
        tau = 0.5 * (lo + hi)
        kept = 1.0 - _residual(a_val * (s_val > tau), w_down, y)
        lo, hi = (tau, hi) if kept >= SILU_PRESERVE_TARGET else (lo, tau)
    pred.threshold = np.full(len(vg), lo, np.float32)
    return pred


def _act(g, activation):
    return np.maximum(g, 0.0) if activation == "relu" else g / (1.0 + np.exp(-g))


def _residual(a_masked, w_down, y) -> float:
    return float(np.linalg.norm(y - a_masked @ w_down.T, axis=1).mean() / max(np.linalg.norm(y, axis=1).mean(), 1e-12))


def _quality(pred: LayerPredictor, x, g, w_up, w_down, activation) -> Quality:
    predicted = pred.predict(x)
    a = _act(g, activation) * (x @ w_up.T)
    preserved = 1.0 - _residual(a * predicted, w_down, a @ w_down.T)
    if activation == "relu":
        active = g > 0
        hits = float((predicted & active).sum())
        return Quality(pred.rank, float(active.mean()), float(predicted.mean()),
                       hits / max(active.sum(), 1), hits / max(predicted.sum(), 1), preserved)
    return Quality(pred.rank, float("nan"), float(predicted.mean()), float("nan"), float("nan"), preserved)


# --- storage: tensors and metadata in the flash GGUF ------------------------------------------


def tensor_names(layer: int) -> dict[str, str]:
    p = f"blk.{layer}.ffn_pred_"
    return {k: p + k for k in ("gate_a", "gate_b", "threshold", "up_a", "up_b", "down_norm")}


def to_tensors(layer: int, pred: LayerPredictor) -> list[tuple[str, int, tuple, bytes]]:
    """(name, ggml type, ne, bytes) of each stored array: A and B in their stored type (already
    rounded to it by fit_layer, so the thresholds were set on exactly these values), vectors F32."""
    out = []
    for key, name in tensor_names(layer).items():
        value = getattr(pred, key)
        if value is None:
            continue
        if value.ndim == 2:
            qtype = matrix_type(value.shape[1])
            out.append((name, qtype, (value.shape[1], value.shape[0]), ggml.quantize_rows(value, qtype).tobytes()))
        else:
            out.append((name, 0, (len(value),), value.astype(np.float32).tobytes()))
    return out
