"""End-to-end perplexity of neuron-selection policies on a SwiGLU/GeGLU model.

    python studies/sparsity_e2e.py MODEL.gguf POLICY:KEEP ... [--tokens 1024] [--fit-tokens 2048] [--out FILE]

The FFN runs in numpy float32 inside flashcli's engine (attention and head in ggml, as
llama.cpp computes them); per token and layer only the top KEEP share of neurons by the
policy's score contributes. Perplexity on tests/data/heldout.txt, windows of 512, every token
after a window's first scored. Policies:
  dense          every neuron (the reference for the others)
  oracle         the true contribution |act(g) * u| * ||down column||
  lowrank-R      g and u from rank-R maps of the FFN input, fitted on the calibration text
  sketch-q2k     g and u from the gate and up rows re-quantized to Q2_K (a resident sketch)
  gate-only      |act(g)|, exact (CATS-style: the gate decides)
  prev-token     the previous token's true contributions (what a cache of one token knows)
  static         one ranking per layer: the mean contribution on the calibration text
  griffin        the window's first 64 tokens pick one set for the rest (GRIFFIN-style)
The rows go to studies/results/sparsity_e2e-MODEL.json (or --out).
A measuring aid for choosing the converter's predictor (issue 9), not part of flashcli.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from converters.calibration import calibration_tokens, ffn_inputs  # noqa: E402
from converters.predictor_fit import reduced_rank_basis  # noqa: E402
from flashcli.decoding.perplexity import perplexity  # noqa: E402
from flashcli.engine import ggml  # noqa: E402
from flashcli.engine.config import ModelConfig  # noqa: E402
from flashcli.engine.gguf_file import GGUFFile  # noqa: E402
from flashcli.engine.model import Model  # noqa: E402
from flashcli.engine.tokenizer import Tokenizer  # noqa: E402
from flashcli.flash.predictor import activation  # noqa: E402

from _results import default_out, save  # noqa: E402

Q2_K = 10  # ggml's type id


def requant(w, qtype):
    return ggml.dequantize_rows(ggml.quantize_rows(w, qtype), qtype, w.shape[1])


class Study:
    """The model's FFN weights in float32, and what each policy needs, fitted once."""

    def __init__(self, path: str, policies: list[str], fit_tokens: int):
        self.gf = GGUFFile(path)
        self.cfg = ModelConfig.from_gguf(self.gf)
        self.w = [
            [self._dequant(f"blk.{i}.{n}.weight") for n in ("ffn_gate", "ffn_up", "ffn_down")]
            for i in range(self.cfg.n_layers)
        ]
        self.down_norm = [np.linalg.norm(w[2], axis=0) for w in self.w]
        needs_fit = any(p.startswith(("lowrank", "static")) for p in policies)
        h = ffn_inputs(path, calibration_tokens(path, fit_tokens)) if needs_fit else None
        self.lowrank = {
            r: [self._lowrank(h[i], i, r) for i in range(self.cfg.n_layers)]
            for r in sorted({int(p.split("-")[1]) for p in policies if p.startswith("lowrank")})
        }
        self.static = (
            [self._contribution(i, h[i].astype(np.float32)).mean(0) for i in range(self.cfg.n_layers)]
            if "static" in policies
            else None
        )
        self.sketch = [(requant(w[0], Q2_K), requant(w[1], Q2_K)) for w in self.w] if "sketch-q2k" in policies else None

    def _dequant(self, name):
        t = self.gf.tensor(name)
        return ggml.dequantize_rows(t.rows(), t.ggml_type, t.row_len)

    def _contribution(self, i, h):
        g, u = h @ self.w[i][0].T, h @ self.w[i][1].T
        return np.abs(activation(g, self.cfg.ffn_activation) * u) * self.down_norm[i]

    def _lowrank(self, h, i, rank):
        """Rank-r maps for g and u, stored as Q8_0 (as the converter would store them)."""
        x = h.astype(np.float32)
        evals, evecs = np.linalg.eigh(x.T.astype(np.float64) @ x)
        chol = (evecs * np.sqrt(np.maximum(evals, 0))).astype(np.float32)
        maps = []
        for w in self.w[i][:2]:
            v = reduced_rank_basis(chol, w, rank)
            maps.append((requant((v.T @ w).astype(np.float32), ggml.Q8_0), requant(v, ggml.Q8_0)))
        return maps

    def scores(self, policy: str, i: int, h: np.ndarray, g: np.ndarray, a: np.ndarray) -> np.ndarray:
        act = self.cfg.ffn_activation
        if policy == "oracle":
            return np.abs(a) * self.down_norm[i]
        if policy.startswith("lowrank"):
            (ag, bg), (au, bu) = self.lowrank[int(policy.split("-")[1])][i]
            return np.abs(activation((h @ ag.T) @ bg.T, act) * ((h @ au.T) @ bu.T)) * self.down_norm[i]
        if policy == "sketch-q2k":
            sg, su = self.sketch[i]
            return np.abs(activation(h @ sg.T, act) * (h @ su.T)) * self.down_norm[i]
        if policy == "gate-only":
            return np.abs(activation(g, act))
        if policy == "prev-token":
            s = np.abs(a) * self.down_norm[i]
            return np.concatenate([s[:1], s[:-1]])
        if policy == "static":
            return np.broadcast_to(self.static[i], a.shape)
        if policy == "griffin":
            first = np.abs(a[:64]) / np.linalg.norm(a[:64], axis=1, keepdims=True)
            s = np.broadcast_to(np.linalg.norm(first, axis=0), a.shape).copy()
            s[:64] = np.abs(a[:64]) * self.down_norm[i]
            return s
        raise SystemExit(f"unknown policy {policy!r}")


class SelectedFFN:
    """An FFN outside the graph (Model's non-fused interface): only the top `keep` neurons."""

    fused = False
    streams = False

    def __init__(self, study: Study, policy: str, keep: float):
        self.study, self.policy, self.keep = study, policy, keep

    def reset(self):
        pass

    def forward(self, i: int, h: np.ndarray) -> np.ndarray:
        wg, wu, wd = self.study.w[i]
        h = h.astype(np.float32)
        g = h @ wg.T
        a = activation(g, self.study.cfg.ffn_activation) * (h @ wu.T)
        if self.policy != "dense":
            s = self.study.scores(self.policy, i, h, g, a)
            k = max(1, int(self.keep * a.shape[1]))
            idx = np.argpartition(-s, k - 1, axis=1)[:, :k]
            mask = np.zeros(a.shape, bool)
            np.put_along_axis(mask, idx, True, axis=1)
            a = a * mask
        return a @ wd.T


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("specs", nargs="+", help="POLICY:KEEP, e.g. oracle:0.5 lowrank-128:0.7 dense")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--fit-tokens", type=int, default=2048)
    ap.add_argument(
        "--out", type=Path, default=None, help="results JSON (default: studies/results/sparsity_e2e-MODEL.json)"
    )
    args = ap.parse_args()
    specs = [(s.split(":")[0], float(s.split(":")[1]) if ":" in s else 1.0) for s in args.specs]
    study = Study(args.model, [p for p, _ in specs], args.fit_tokens)
    tokens = Tokenizer(args.model).encode((ROOT / "tests" / "data" / "heldout.txt").read_text())[: args.tokens]
    pool = ggml.ThreadPool(2)
    rows = []
    for policy, keep in specs:
        model = Model(args.model, n_ctx=512, ffn=SelectedFFN(study, policy, keep), gguf_file=study.gf, pool=pool)
        t = time.time()
        ppl = perplexity(model, tokens, window=512)["perplexity"]
        rows.append({"policy": policy, "keep": keep, "ppl": round(ppl, 3), "s": round(time.time() - t, 1)})
        print(json.dumps(rows[-1]), flush=True)
    save(
        args.out or default_out("sparsity_e2e", args.model),
        {
            "model": Path(args.model).name,
            "tokens": len(tokens),
            "fit_tokens": args.fit_tokens,
            "window": 512,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
