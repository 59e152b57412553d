"""Fitting the activation predictors (the converter's side of flashcli/flash/predictor.py).

One low-rank predictor per layer: the gate pre-activation g = W_gate h is linear in the FFN
input h, so a rank-r map fitted to the model's own activations predicts it cheaply:

    g_hat = B (A h)      A: [r, d_model], B: [n_ff, r]

A and B come from reduced-rank regression on calibration inputs X (closed form, no training):
with C = X^T X = L L^T, the best rank-r predictor of X W^T is W^T V_r V_r^T, where V_r are the
top right singular vectors of L^T W^T. So A = V_r^T W, B = V_r.

- ReLU: neuron j is active iff g_j > 0. Predicted iff g_hat_j > -k * sigma_j, sigma_j the
  predictor's error on neuron j; k is set on held-out calibration tokens for the target recall.
- Other gated activations (SiLU, GELU): nothing is exactly zero, so a neuron is needed when its
  contribution |act(g) * u| * ||down column|| is large. A second rank-r map estimates u, and a
  per-layer threshold on the estimated contribution is set on held-out tokens so that the
  predicted set keeps the target share of the layer's FFN output. Measured on SmolLM2 and
  Qwen2.5-Coder-1.5B (studies/predictor_study.py) such predictors keep most neurons for that
  share; the converter therefore lays those models out as rows (see converters/convert.py).
Misses are skipped, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flashcli.engine import ggml
from flashcli.flash.predictor import activation as act
from flashcli.flash.predictor import matrix_type, neuron_scores, tensor_names

RELU_RECALL_TARGET = 0.98  # share of truly active (neuron, token) pairs predicted, held-out
GATED_PRESERVE_TARGET = 0.93  # share of the FFN output norm the predicted set keeps, held-out
RELU_RANKS = (64, 128)
RELU_MAX_RATIO = 2.0  # a layer's rank grows until predicted/true <= this, or the last candidate


def _as_stored(m: np.ndarray) -> np.ndarray:
    """m rounded to its storage type: the predictor is calibrated as it will run."""
    qtype = matrix_type(m.shape[1])
    return ggml.dequantize_rows(ggml.quantize_rows(m, qtype), qtype, m.shape[1])


@dataclass
class LayerPredictor:
    activation: str
    gate_a: np.ndarray  # [r, d] float32
    gate_b: np.ndarray  # [n_ff, r]
    threshold: np.ndarray  # [n_ff]: predicted iff score > threshold
    up_a: np.ndarray | None = None  # gated activations other than ReLU
    up_b: np.ndarray | None = None
    down_norm: np.ndarray | None = None  # [n_ff] ||down column||

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
        u = None if self.up_a is None else (h @ self.up_a.T) @ self.up_b.T
        return neuron_scores(g, u, self.down_norm, self.activation)

    def predict(self, h: np.ndarray) -> np.ndarray:
        """h [n, d] -> bool [n, n_ff]."""
        return self.scores(h) > self.threshold

    def permuted(self, order: np.ndarray) -> LayerPredictor:
        """The same predictor for neurons stored in `order` (neuron k of the result is order[k])."""
        pick = lambda a: None if a is None else np.ascontiguousarray(a[order])  # noqa: E731
        return LayerPredictor(
            self.activation,
            self.gate_a,
            pick(self.gate_b),
            pick(self.threshold),
            self.up_a,
            pick(self.up_b),
            pick(self.down_norm),
        )


@dataclass
class Quality:
    """One layer's predictor measured on calibration tokens used neither to fit nor to set it."""

    rank: int
    true_fraction: float  # ReLU: share of neurons active per token; else nan
    predicted_fraction: float  # share of neurons predicted per token
    recall: float  # ReLU: active pairs predicted / active pairs; else: of the oracle's set of the same size
    precision: float  # ReLU: predicted pairs active / predicted pairs; else nan
    preserved: float  # share of the FFN output norm kept by the predicted set: 1 - |y - y_p| / |y|

    def as_dict(self) -> dict:
        return {k: float(v) for k, v in self.__dict__.items()}


def reduced_rank_basis(chol: np.ndarray, w: np.ndarray, rank: int) -> np.ndarray:
    """The top `rank` right singular vectors [n_ff, rank] of M = L^T W^T [d, n_ff].

    Through the eigenvectors of the small Gram matrix M M^T [d, d]: for a 7B layer this is an
    eigendecomposition of 4096^2 instead of a full SVD of 4096 x 11008 (minutes per layer)."""
    m = chol.T @ w.T  # [d, n_ff] float32
    evals, u = np.linalg.eigh((m @ m.T).astype(np.float64))
    top = np.argsort(evals)[::-1][:rank]
    v = m.T @ u[:, top].astype(np.float32)  # [n_ff, rank] = V S
    return (v / np.maximum(np.linalg.norm(v, axis=0), 1e-30)).astype(np.float32)


def fit_layer(
    x: np.ndarray,
    w_gate: np.ndarray,
    w_up: np.ndarray,
    w_down: np.ndarray,
    activation: str,
    gated_rank: int | None = None,
) -> tuple[LayerPredictor, Quality, np.ndarray]:
    """Fits one layer's predictor. x: FFN inputs [N, d] on calibration text; weights float32 as
    stored ([n_ff, d] for gate/up, [d, n_ff] for down). x is split in order: 60% to fit A and B,
    20% to set the threshold, 20% to measure the quality reported. Also returns how often each
    neuron is predicted on all calibration tokens [n_ff] (the converter stores hot neurons first)."""
    x = x.astype(np.float32)
    d = x.shape[1]
    n_fit, n_thr = (3 * len(x)) // 5, (4 * len(x)) // 5
    x_fit, x_val, x_eval = x[:n_fit], x[n_fit:n_thr], x[n_thr:]
    evals, evecs = np.linalg.eigh(x_fit.T.astype(np.float64) @ x_fit)
    chol = (evecs * np.sqrt(np.maximum(evals, 0.0))).astype(np.float32)  # C = L L^T
    g_fit, g_val, g_eval = x_fit @ w_gate.T, x_val @ w_gate.T, x_eval @ w_gate.T
    ranks = [r for r in RELU_RANKS if r <= d // 2] or [max(1, d // 4)]
    gated_rank = gated_rank or int(np.clip(d // 16 // 32 * 32, 32, 256))  # multiples of 32: Q8_0 rows
    basis = reduced_rank_basis(chol, w_gate, max(ranks) if activation == "relu" else gated_rank)
    if activation == "relu":
        for rank in ranks:
            pred = _fit_relu(basis[:, :rank], w_gate, x_fit, g_fit, x_val, g_val)
            if pred.predict(x_val).mean() <= RELU_MAX_RATIO * (g_val > 0).mean():
                break
    else:
        pred = _fit_gated(
            activation, basis, reduced_rank_basis(chol, w_up, gated_rank), w_gate, w_up, w_down, x_val, g_val
        )
    frequency = np.mean([pred.predict(x[s : s + 512]).sum(0) for s in range(0, len(x), 512)], axis=0) / 512
    return pred, _quality(pred, x_eval, g_eval, w_up, w_down), frequency.astype(np.float32)


def _fit_relu(vr, w_gate, x_fit, g_fit, x_val, g_val):
    a, b = _as_stored((vr.T @ w_gate).astype(np.float32)), _as_stored(vr.astype(np.float32))
    sigma = ((x_fit @ a.T) @ b.T - g_fit).std(0) + 1e-6
    pred = LayerPredictor("relu", a, b, np.zeros(len(b), np.float32))
    s_val = pred.scores(x_val) / sigma
    active = g_val > 0
    # the smallest margin k (predicted iff g_hat > -k sigma) reaching the recall target
    k = float(np.quantile(-s_val[active], RELU_RECALL_TARGET)) if active.any() else 0.0
    pred.threshold = (-k * sigma).astype(np.float32)
    return pred


def _fit_gated(activation, vg, vu, w_gate, w_up, w_down, x_val, g_val):
    down_norm = np.linalg.norm(w_down, axis=0).astype(np.float32)
    pred = LayerPredictor(
        activation,
        _as_stored((vg.T @ w_gate).astype(np.float32)),
        _as_stored(vg.astype(np.float32)),
        np.zeros(len(vg), np.float32),
        _as_stored((vu.T @ w_up).astype(np.float32)),
        _as_stored(vu.astype(np.float32)),
        down_norm,
    )
    s_val = pred.scores(x_val)
    a_val = act(g_val, activation) * (x_val @ w_up.T)
    y = a_val @ w_down.T
    # bisect the threshold on held-out tokens: highest tau whose predicted set keeps the target share
    lo, hi = 0.0, float(s_val.max())
    for _ in range(20):
        tau = 0.5 * (lo + hi)
        kept = 1.0 - _residual(a_val * (s_val > tau), w_down, y)
        lo, hi = (tau, hi) if kept >= GATED_PRESERVE_TARGET else (lo, tau)
    pred.threshold = np.full(len(vg), lo, np.float32)
    return pred


def _residual(a_masked, w_down, y) -> float:
    return float(np.linalg.norm(y - a_masked @ w_down.T, axis=1).mean() / max(np.linalg.norm(y, axis=1).mean(), 1e-12))


def _quality(pred: LayerPredictor, x, g, w_up, w_down) -> Quality:
    predicted = pred.predict(x)
    a = act(g, pred.activation) * (x @ w_up.T)
    preserved = 1.0 - _residual(a * predicted, w_down, a @ w_down.T)
    if pred.activation == "relu":
        active = g > 0
        hits = float((predicted & active).sum())
        return Quality(
            pred.rank,
            float(active.mean()),
            float(predicted.mean()),
            hits / max(active.sum(), 1),
            hits / max(predicted.sum(), 1),
            preserved,
        )
    # the oracle's set of the same size per token: the largest true contributions
    contribution = np.abs(a) * pred.down_norm
    k = predicted.sum(1, keepdims=True)
    ranks = np.argsort(np.argsort(-contribution, axis=1), axis=1)
    oracle = ranks < k
    recall = float((predicted & oracle).sum() / max(oracle.sum(), 1))
    return Quality(pred.rank, float("nan"), float(predicted.mean()), recall, float("nan"), preserved)


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
