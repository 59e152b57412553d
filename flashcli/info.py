"""flashcli info: what a GGUF holds, and for a converted file its layout and predictor quality."""

from __future__ import annotations

import math

from .config import ModelConfig
from .gguf_file import GGUFFile

QUALITY_KEYS = ("rank", "true_fraction", "predicted_fraction", "recall", "precision", "preserved")


def describe(path) -> dict:
    gf = GGUFFile(path)
    cfg = ModelConfig.from_gguf(gf)
    desc = {"file": str(gf.path), "bytes": int(gf.mm.size), "config": cfg.__dict__.copy(),
            "tensors": len(gf.tensors), "flash": gf.get("flashcli.format_version") is not None}
    if desc["flash"]:
        desc["bundle"] = {k.split(".")[-1]: gf.get(k) for k in gf.metadata if k.startswith("flashcli.bundle.")}
        desc["predictor"] = {"kind": gf.get("flashcli.predictor.kind"), "target": gf.get("flashcli.predictor.target"),
                             "calibration_tokens": gf.get("flashcli.calibration.tokens")}
        cols = {k: list(gf.get(f"flashcli.predictor.{k}", [])) for k in QUALITY_KEYS}
        desc["layers"] = [{k: cols[k][i] for k in QUALITY_KEYS} for i in range(cfg.n_layers)]
        desc["average"] = {k: _mean([row[k] for row in desc["layers"]]) for k in QUALITY_KEYS if k != "rank"}
    return desc


def _mean(values):
    values = [float(v) for v in values if not math.isnan(float(v))]
    return sum(values) / len(values) if values else float("nan")


def format_description(desc: dict) -> str:
    c = desc["config"]
    lines = [f"{desc['file']}: {desc['bytes'] / 2**20:.1f} MiB, {c['arch']}, {c['n_layers']} layers, "
             f"d_model {c['d_model']}, n_ff {c['n_ff']}, heads {c['n_heads']}/{c['n_kv_heads']}, "
             f"vocab {c['n_vocab']}, FFN activation {c['ffn_activation']}"]
    if not desc["flash"]:
        lines.append("not converted: run `flashcli convert` to bundle its FFN for flash generation")
        return "\n".join(lines)
    b, p = desc["bundle"], desc["predictor"]
    lines.append(f"bundles: {b['stride']} bytes per neuron (gate {b['gate_bytes']} + up {b['up_bytes']} + "
                 f"down {b['down_bytes']} bytes, down type {b['down_type']})")
    lines.append(f"predictor: {p['kind']}, target {float(p['target']):.3f}, calibrated on {p['calibration_tokens']} tokens; "
                 "measured on held-out calibration tokens:")
    lines.append("layer  rank  active  predicted  recall  precision  output kept")
    for i, row in enumerate(desc["layers"] + [dict(desc["average"], rank=float("nan"))]):
        name = f"{i:5d}" if i < len(desc["layers"]) else "  avg"
        rank = "" if math.isnan(row["rank"]) else f"{int(row['rank'])}"
        lines.append(f"{name}  {rank:>4s}  {_pct(row['true_fraction'])}  {_pct(row['predicted_fraction']):>9s}  "
                     f"{_pct(row['recall'])}  {_pct(row['precision']):>9s}  {_pct(row['preserved']):>11s}")
    return "\n".join(lines)


def _pct(x) -> str:
    return "     -" if math.isnan(float(x)) else f"{100 * float(x):5.1f}%"
