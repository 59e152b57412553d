"""How well can a small resident predictor pick a SwiGLU/GeGLU layer's important neurons?

    python studies/predictor_study.py MODEL.gguf [--layers 0,7,14,21,27] [--fit-tokens 3072] [--out FILE]

For each layer: dense FFN inputs h on the shipped calibration text (fit) and on tests/data/
heldout.txt (evaluation), the true contribution of every neuron |act(g) * u| * ||down column||,
and for each predictor option its scores. At a kept fraction f (per token, the top f by score)
it reports the recall of the oracle's top-f set and the share of the FFN output kept
(1 - |y - y_kept| / |y|), next to the option's resident bytes for the layer. Options:
  lowrank-r     g and u from rank-r maps of h (reduced-rank regression), Q8_0
  gate-q2k+u64  the gate rows re-quantized to Q2_K (exact-ish g), u from a rank-64 map
  gate-sign+u64 the gate rows as signs with one scale per row (1 bit per weight), u rank 64
  lookahead-r   as lowrank-r, but from the previous layer's FFN input (known one layer early)
  static        one fixed ranking per layer: the mean contribution on the fit tokens
The rows go to studies/results/predictor_study-MODEL.json (or --out).
This is a measuring aid for choosing the converter's predictor, not part of flashcli.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from converters.calibration import calibration_tokens, ffn_inputs  # noqa: E402
from converters.predictor_fit import reduced_rank_basis  # noqa: E402
from flashcli.engine import ggml  # noqa: E402
from flashcli.engine.config import ModelConfig  # noqa: E402
from flashcli.engine.gguf_file import GGUFFile  # noqa: E402
from flashcli.engine.tokenizer import Tokenizer  # noqa: E402
from flashcli.flash.predictor import activation  # noqa: E402

from _results import default_out, save  # noqa: E402

Q8 = 1.0625  # bytes per weight of Q8_0


def dequant(gf, name):
    t = gf.tensor(name)
    return ggml.dequantize_rows(t.rows(), t.ggml_type, t.row_len)


def requant(w, qtype):
    return ggml.dequantize_rows(ggml.quantize_rows(w, qtype), qtype, w.shape[1])


def top_mask(scores, keep):
    k = max(1, int(round(keep * scores.shape[1])))
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    m = np.zeros(scores.shape, bool)
    np.put_along_axis(m, idx, True, axis=1)
    return m


def lowrank(x_fit, w, rank):
    """Rank-r map of x -> x w^T fitted on x_fit: returns (A [r, d], B [n_ff, r])."""
    evals, evecs = np.linalg.eigh(x_fit.T.astype(np.float64) @ x_fit)
    chol = (evecs * np.sqrt(np.maximum(evals, 0.0))).astype(np.float32)
    v = reduced_rank_basis(chol, w, rank)
    return requant((v.T @ w).astype(np.float32), 8), requant(v, 8)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--layers", default=None, help="comma-separated layer ids (default: 5 spread out)")
    ap.add_argument("--fit-tokens", type=int, default=3072)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--keep", default="0.5,0.4,0.3")
    ap.add_argument(
        "--out", type=Path, default=None, help="results JSON (default: studies/results/predictor_study-MODEL.json)"
    )
    args = ap.parse_args()
    gf = GGUFFile(args.model)
    cfg = ModelConfig.from_gguf(gf)
    layers = (
        [int(x) for x in args.layers.split(",")]
        if args.layers
        else sorted({0, cfg.n_layers // 4, cfg.n_layers // 2, 3 * cfg.n_layers // 4, cfg.n_layers - 1})
    )
    keeps = [float(x) for x in args.keep.split(",")]
    fit_tokens = calibration_tokens(args.model, args.fit_tokens)
    heldout = Tokenizer(args.model).encode((ROOT / "tests" / "data" / "heldout.txt").read_text())[: args.eval_tokens]
    want = sorted(set(layers) | {i - 1 for i in layers if i > 0})
    print(f"capturing FFN inputs: {len(fit_tokens)} fit + {len(heldout)} held-out tokens", file=sys.stderr)
    h_fit = ffn_inputs(args.model, fit_tokens, layers=want)
    h_eval = ffn_inputs(args.model, heldout, layers=want)
    d, n_ff = cfg.d_model, cfg.n_ff
    rows = []
    for i in layers:
        p = f"blk.{i}."
        wg, wu, wd = (dequant(gf, p + n + ".weight") for n in ("ffn_gate", "ffn_up", "ffn_down"))
        dn = np.linalg.norm(wd, axis=0)
        xf, xe = h_fit[i].astype(np.float32), h_eval[i].astype(np.float32)
        g_e, u_e = xe @ wg.T, xe @ wu.T
        a_e = activation(g_e, cfg.ffn_activation) * u_e
        truth = np.abs(a_e) * dn
        y = a_e @ wd.T
        options = {}
        ag, bg = None, None
        for r in (32, 64, 128, 256):
            ag, bg = lowrank(xf, wg, r)
            au, bu = lowrank(xf, wu, r)
            g_hat, u_hat = (xe @ ag.T) @ bg.T, (xe @ au.T) @ bu.T
            options[f"lowrank-{r}"] = (
                np.abs(activation(g_hat, cfg.ffn_activation) * u_hat) * dn,
                2 * Q8 * r * (d + n_ff),
            )
            if r == 64:
                u64 = u_hat
        q2 = requant(wg, 10)  # Q2_K
        options["gate-q2k+u64"] = (
            np.abs(activation(xe @ q2.T, cfg.ffn_activation) * u64) * dn,
            ggml.row_bytes(10, d) * n_ff + Q8 * 64 * (d + n_ff),
        )
        sign = np.sign(wg) * np.abs(wg).mean(1, keepdims=True)
        options["gate-sign+u64"] = (
            np.abs(activation(xe @ sign.T, cfg.ffn_activation) * u64) * dn,
            d * n_ff / 8 + 2 * n_ff + Q8 * 64 * (d + n_ff),
        )
        if i > 0:
            xp_f, xp_e = h_fit[i - 1].astype(np.float32), h_eval[i - 1].astype(np.float32)
            for r in (64, 128):
                ag, bg = lowrank_cross(xp_f, xf @ wg.T, r)
                au, bu = lowrank_cross(xp_f, xf @ wu.T, r)
                g_hat, u_hat = (xp_e @ ag.T) @ bg.T, (xp_e @ au.T) @ bu.T
                options[f"lookahead-{r}"] = (
                    np.abs(activation(g_hat, cfg.ffn_activation) * u_hat) * dn,
                    2 * Q8 * r * (d + n_ff),
                )
        a_f = activation(xf @ wg.T, cfg.ffn_activation) * (xf @ wu.T)
        static = (np.abs(a_f) * dn).mean(0)
        options["static"] = (np.broadcast_to(static, truth.shape), 4 * n_ff)
        for keep in keeps:
            oracle = top_mask(truth, keep)
            kept_oracle = (
                1 - np.linalg.norm(y - (a_e * oracle) @ wd.T, axis=1).mean() / np.linalg.norm(y, axis=1).mean()
            )
            rows.append(
                {
                    "layer": i,
                    "keep": keep,
                    "option": "oracle",
                    "bytes": 0,
                    "recall": 1.0,
                    "output_kept": float(kept_oracle),
                }
            )
            for name, (scores, nbytes) in options.items():
                m = top_mask(np.ascontiguousarray(scores), keep)
                recall = float((m & oracle).sum() / oracle.sum())
                kept = 1 - np.linalg.norm(y - (a_e * m) @ wd.T, axis=1).mean() / np.linalg.norm(y, axis=1).mean()
                rows.append(
                    {
                        "layer": i,
                        "keep": keep,
                        "option": name,
                        "bytes": int(nbytes),
                        "recall": recall,
                        "output_kept": float(kept),
                    }
                )
        for r in rows[-len(keeps) * (len(options) + 1) :]:
            print(json.dumps(r), flush=True)
    save(
        args.out or default_out("predictor_study", args.model),
        {
            "model": Path(args.model).name,
            "fit_tokens": len(fit_tokens),
            "eval_tokens": len(heldout),
            "layers": layers,
            "keep": keeps,
            "rows": rows,
        },
    )
    summarize(rows, keeps)


def lowrank_cross(x_fit, target, rank):
    """Rank-r map x -> target fitted by least squares through the top principal directions of
    the fitted values (reduced-rank regression with an explicit target)."""
    coef, *_ = np.linalg.lstsq(x_fit.astype(np.float64), target.astype(np.float64), rcond=None)  # [d, n_ff]
    fitted = x_fit @ coef
    _, _, vt = np.linalg.svd(fitted - 0, full_matrices=False)
    v = vt[:rank].T  # [n_ff, r]
    a = (coef @ v).T.astype(np.float32)  # [r, d]
    return requant(a, 8), requant(v.astype(np.float32), 8)


def summarize(rows, keeps):
    names = []
    for r in rows:
        if r["option"] not in names:
            names.append(r["option"])
    print("\noption            MiB/layer  " + "  ".join(f"recall@{k:.0%} kept@{k:.0%}" for k in keeps))
    for name in names:
        sel = [r for r in rows if r["option"] == name]
        mib = np.mean([r["bytes"] for r in sel]) / 2**20
        cells = []
        for k in keeps:
            ks = [r for r in sel if r["keep"] == k]
            cells.append(f"{np.mean([r['recall'] for r in ks]):10.1%} {np.mean([r['output_kept'] for r in ks]):7.1%}")
        print(f"{name:16s} {mib:9.2f}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
