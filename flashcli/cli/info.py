"""flashcli info: what a GGUF holds, and for a converted file its FFN layout and predictor quality."""

from __future__ import annotations

import math

from ..engine.bundles import CALIBRATION, PREDICTOR, bits_per_weight, layer_layouts, layout_of
from ..engine.config import ModelConfig
from ..engine.gguf_file import GGUFFile
from ..engine.weights import EXPERT_MATRICES, FFN_MATRICES

QUALITY_KEYS = ("rank", "true_fraction", "predicted_fraction", "recall", "precision", "preserved")


def describe(path) -> dict:
    gf = GGUFFile(path)
    cfg = ModelConfig.from_gguf(gf)
    layout = layout_of(gf)
    config = dict(cfg.__dict__, swa_layers=sum(cfg.swa_layers))
    desc = {
        "file": str(gf.path),
        "bytes": int(gf.mm.size),
        "config": config,
        "tensors": len(gf.tensors),
        "flash": layout is not None,
        "layout": layout,
        "expert_records": bool(gf.views),
    }
    # a converted mixture's experts are records: its stacked names are views (GGUFFile.views)
    tensors = {**gf.tensors, **gf.views}
    ffn = [t for name, t in tensors.items() if any(f".{m}." in name for m in FFN_MATRICES + EXPERT_MATRICES)]
    desc["ffn_bytes"] = (
        sum(t.nbytes for t in ffn)
        if layout != "bundles"
        else sum(t.nbytes for name, t in gf.tensors.items() if name.endswith(".ffn_bundle"))
    )
    if layout == "bundles":
        layouts = layer_layouts(gf, cfg.d_model, cfg.n_layers)
        desc["bundle"] = [
            {
                "stride": x.stride,
                "gate_bytes": x.gate_bytes,
                "up_bytes": x.up_bytes,
                "down_bytes": x.down_bytes,
                "down_type": x.down_type,
                "down_bits": bits_per_weight(x.down_type),
            }
            for x in layouts
        ]
        desc["predictor"] = {
            "kind": gf.get(PREDICTOR + "kind"),
            "target": gf.get(PREDICTOR + "target"),
            "calibration_tokens": gf.get(CALIBRATION + "tokens"),
        }
        cols = {k: list(gf.get(PREDICTOR + k, [])) for k in QUALITY_KEYS}
        desc["layers"] = [{k: cols[k][i] for k in QUALITY_KEYS} for i in range(cfg.n_layers)]
        desc["average"] = {k: _mean([row[k] for row in desc["layers"]]) for k in QUALITY_KEYS if k != "rank"}
    return desc


def _mean(values):
    values = [float(v) for v in values if not math.isnan(float(v))]
    return sum(values) / len(values) if values else float("nan")


def format_description(desc: dict) -> str:
    c = desc["config"]
    lines = [
        f"{desc['file']}: {desc['bytes'] / 2**20:.1f} MiB, {c['arch']}, {c['n_layers']} layers, "
        f"d_model {c['d_model']}, n_ff {c['n_ff']}, heads {c['n_heads']}/{c['n_kv_heads']} of {c['head_dim']}, "
        f"vocab {c['n_vocab']}, FFN activation {c['ffn_activation']}"
        + (f", sliding window {c['sliding_window']} on {c['swa_layers']} layers" if c["sliding_window"] else "")
    ]
    share = desc["ffn_bytes"] / desc["bytes"]
    if c["n_expert"]:  # any file: the experts layout reads whole experts from it
        lines.append(
            f"mixture of experts: {c['n_expert']} experts of width {c['n_ff_exp']} a layer, {c['n_expert_used']} a "
            f"token{', a shared expert of ' + str(c['n_ff_shexp']) if c['n_ff_shexp'] else ''}; experts "
            f"{desc['ffn_bytes'] / 2**20:.1f} MiB ({share:.0%} of the file), read whole into expert caches under a budget"
            + ("; one record an expert (gate, up and down side by side)" if desc.get("expert_records") else "")
        )
        return "\n".join(lines)
    if not desc["flash"]:
        lines.append(
            f"FFN {desc['ffn_bytes'] / 2**20:.1f} MiB ({share:.0%} of the file); not converted: "
            "`flashcli convert` lays it out for flash generation (a budget also works on this file)"
        )
        return "\n".join(lines)
    if desc["layout"] == "rows":
        lines.append(
            f"layout rows: the FFN tensors as in the source ({desc['ffn_bytes'] / 2**20:.1f} MiB, {share:.0%} "
            "of the file); every neuron is computed, what the budget cannot hold is streamed per pass"
        )
        return "\n".join(lines)
    b, p = desc["bundle"], desc["predictor"]
    lines.append(
        f"layout bundles: {desc['ffn_bytes'] / 2**20:.1f} MiB ({share:.0%} of the file); per neuron "
        f"{b[0]['stride']} bytes (gate {b[0]['gate_bytes']} + up {b[0]['up_bytes']} + down {b[0]['down_bytes']}, "
        f"down at {b[0]['down_bits']:.2f} bits per weight)"
    )
    lines.append(
        f"predictor: {p['kind']}, target {float(p['target']):.3f}, calibrated on {p['calibration_tokens']} tokens; "
        "measured on held-out calibration tokens (recall: of the active set for ReLU, else of the "
        "oracle's set of the same size):"
    )
    lines.append("layer  rank  active  predicted  recall  precision  output kept")
    for i, row in enumerate(desc["layers"] + [dict(desc["average"], rank=float("nan"))]):
        name = f"{i:5d}" if i < len(desc["layers"]) else "  avg"
        rank = "" if math.isnan(row["rank"]) else f"{int(row['rank'])}"
        lines.append(
            f"{name}  {rank:>4s}  {_pct(row['true_fraction'])}  {_pct(row['predicted_fraction']):>9s}  "
            f"{_pct(row['recall'])}  {_pct(row['precision']):>9s}  {_pct(row['preserved']):>11s}"
        )
    return "\n".join(lines)


def _pct(x) -> str:
    return "     -" if math.isnan(float(x)) else f"{100 * float(x):5.1f}%"
