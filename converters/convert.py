"""flashcli convert: a llama.cpp GGUF -> one standard GGUF laid out for flash generation.

Steps: validate the source; choose the FFN layout (flashcli/engine/bundles.py); for "bundles", run the
dense model over calibration text, tapping each layer's FFN input, fit each layer's predictor
and order its neurons hot first; stream the output (source metadata and every other tensor
copied byte for byte, then per layer the FFN as rows or bundles plus the predictor) to a
temporary file renamed only once complete.

Layout "auto": bundles where the FFN activation is ReLU (exact zeros: a small predictor finds
the active neurons; its recall is stored per layer in the file's metadata, and its effect on
perplexity is in BENCHMARKS.md, "Quality and size"); rows for SwiGLU and GeGLU, where no
predictor small enough to keep resident finds the neurons that matter (studies/predictor_study.py
and studies/sparsity_e2e.py measure it, results in studies/results/), so every neuron is computed
and flash generation streams what the budget cannot hold.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flashcli.engine import bundles, expert_records, ggml
from flashcli.engine.bundles import BundleLayout
from flashcli.engine.config import ModelConfig
from flashcli.engine.gguf_file import GGUFFile
from flashcli.engine.repack import GROUP, repack_rows, repacks, signature
from flashcli.engine.weight_types import check_weight_types
from flashcli.engine.weights import ATTENTION_MATRICES, EXPERT_MATRICES, FFN_MATRICES, ffn_matrices
from flashcli.errors import BadModelFile, DiskFull, OutputExists, UnsupportedModel

from . import predictor_fit
from .calibration import calibration_tokens, ffn_inputs
from .expert_calibration import CALIBRATION_TOKENS as EXPERT_CALIBRATION_TOKENS
from .expert_calibration import expert_picks
from .expert_records import records_metadata, records_spec
from .gguf_writer import TensorSpec, encode_metadata, write_gguf_file
from .tensor_source import TensorSource

CALIBRATION_TOKENS = 4096


@dataclass
class ConvertResult:
    output: Path
    layout: str
    input_bytes: int
    output_bytes: int
    seconds: float
    calibration_tokens: int
    quality: list  # per layer predictor_fit.Quality ("bundles" only)


def default_output(source: Path) -> Path:
    name = source.name[: -len(".gguf")] if source.name.endswith(".gguf") else source.name
    return source.with_name(name + ".flash.gguf")


def choose_layout(cfg: ModelConfig) -> str:
    return "bundles" if cfg.ffn_activation == "relu" else "rows"


def convert(
    source,
    output=None,
    force: bool = False,
    layout: str = "auto",
    down_type: str = "auto",
    calibration_tokens: int = CALIBRATION_TOKENS,
    threads: int | None = None,
    log=None,
    progress: bool | None = None,
) -> ConvertResult:
    """Converts `source`; returns what was written. `log(str)` receives progress lines.
    down_type (bundles): "auto" (flashcli.bundles.down_type_for), "source" (the source's own
    type where d_model splits into its blocks), or a ggml type name such as q5_1 or f16."""
    t0 = time.perf_counter()
    log = log or (lambda _msg: None)
    source = Path(source)
    gf = GGUFFile(source)
    cfg = ModelConfig.from_gguf(gf)
    _check_source(gf, cfg)
    output = Path(output) if output else default_output(source)
    if output.exists() and not force:
        raise OutputExists(f"{output} exists (use --force to overwrite)")
    if output.exists() and output.resolve() == source.resolve():
        raise OutputExists(f"{output}: output would overwrite the source")
    if layout == "auto":
        layout = choose_layout(cfg)
    if layout not in bundles.LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: expected auto, {' or '.join(bundles.LAYOUTS)}")
    if layout == "bundles" and cfg.family.fused_gate_up:
        raise UnsupportedModel(f"{source}: the bundles layout of {cfg.arch}'s fused gate|up tensor is not supported")
    ours = {
        "general.alignment": bundles.FILE_ALIGN,
        bundles.FORMAT: bundles.FORMAT_VERSION,
        bundles.LAYOUT: layout,
        bundles.SOURCE: gf.path.name,
    }
    if bundles.ACTIVATION not in gf.metadata:
        ours[bundles.ACTIVATION] = cfg.ffn_activation
    with TensorSource(gf) as src:
        tensors, quality, n_cal = _specs(src, cfg, layout, ours, calibration_tokens, threads, log, down_type)
        metadata = [gf.raw_metadata(k) for k in gf.metadata if k not in ours] + [
            encode_metadata(k, v) for k, v in ours.items()
        ]
        total = sum(t.nbytes for t in tensors)
        free = shutil.disk_usage(output.parent if str(output.parent) else ".").free
        if free < total + (64 << 20):
            raise DiskFull(f"{output.parent}: {free / 2**30:.2f} GiB free, the output needs {total / 2**30:.2f} GiB")
        write_gguf_file(output, metadata, tensors, bundles.FILE_ALIGN, progress)
    return ConvertResult(
        output, layout, source.stat().st_size, output.stat().st_size, time.perf_counter() - t0, n_cal, quality
    )


def _specs(src: TensorSource, cfg: ModelConfig, layout: str, ours: dict, calibration_tokens, threads, log, down_type):
    """Every tensor of the output, in order, as specs that read the source when written; adds the
    layout's metadata to `ours`. Returns (specs, per layer quality, calibration tokens)."""
    gf = src.gf
    quality, n_cal = [], 0
    repacked = set()
    if layout == "rows":
        log(f"layout rows: the FFN tensors are copied as they are ({cfg.ffn_activation} activations)")
        repacked = _repacked_matrices(gf, cfg)
        if repacked:
            log(f"{len(repacked)} matrices stored as ggml's repacked kernels read them on this CPU")
            ours[bundles.REPACKED] = sorted(repacked)
            ours[bundles.REPACK_SIGNATURE] = signature({gf.tensor(n).ggml_type for n in repacked})
        ffn_specs = [
            copy_spec(src, gf.tensor(f"blk.{i}.{n}.weight"), repacked)
            for i in range(cfg.n_layers)
            for n in ffn_matrices(cfg)
            if n not in EXPERT_MATRICES
        ]
        if cfg.moe:  # each expert's gate, up and down side by side: one read an expert
            log("experts laid out as records: an expert's gate, up and down read at once")
            ours.update(records_metadata(src, cfg.n_layers))
            log(f"calibrating the routers on {EXPERT_CALIBRATION_TOKENS} tokens of shipped text")
            picks = expert_picks(gf.path, EXPERT_CALIBRATION_TOKENS, threads)
            ours[expert_records.PICKS] = [int(x) for x in picks.ravel()]
            n_cal = EXPERT_CALIBRATION_TOKENS
            ffn_specs += [records_spec(src, i, repacked) for i in range(cfg.n_layers)]
    else:
        ffn_specs, quality, n_cal = _bundle_specs(
            src, cfg, calibration_tokens, threads, log, ours, _down_type_choice(down_type, cfg.d_model)
        )
    ffn = {f"blk.{i}.{n}.weight" for i in range(cfg.n_layers) for n in ffn_matrices(cfg)}
    tensors = [copy_spec(src, t, repacked) for name, t in gf.tensors.items() if name not in ffn] + ffn_specs
    return tensors, quality, n_cal


def _check_source(gf: GGUFFile, cfg: ModelConfig):
    if gf.get(bundles.FORMAT) is not None:
        raise BadModelFile(f"{gf.path}: already a flashcli file")
    check_weight_types(gf)
    for i in range(cfg.n_layers):
        for name in ffn_matrices(cfg):
            gf.tensor(f"blk.{i}.{name}.weight")  # present, or BadModelFile
    if cfg.d_model % 32:
        raise UnsupportedModel(f"{gf.path}: d_model {cfg.d_model} is not a multiple of 32")


def _dequantize(src: TensorSource, name: str) -> np.ndarray:
    t = src.gf.tensor(name)
    return ggml.dequantize_rows(src.all_rows(t), t.ggml_type, t.row_len)


def _down_type_choice(name: str, d_model: int):
    """source ggml type -> the down columns' type."""
    if name == "auto":
        return lambda t: bundles.down_type_for(t, d_model)
    if name == "source":
        return lambda t: t if d_model % ggml.type_traits(t).blck_size == 0 else bundles.down_type_for(t, d_model)
    from gguf import GGMLQuantizationType

    try:
        chosen = int(GGMLQuantizationType[name.upper()])
    except KeyError:
        raise ValueError(f"unknown down type {name!r}: auto, source, or a ggml type such as q8_0, q5_1, f16") from None
    if d_model % ggml.type_traits(chosen).blck_size:
        raise UnsupportedModel(f"{name}: d_model {d_model} does not split into its blocks")
    return lambda t: chosen


def _bundle_specs(src: TensorSource, cfg, n_tokens, threads, log, ours: dict, down_type):
    """Calibrates, fits the predictors and returns the bundle and predictor tensor specs; adds
    the layout's metadata to `ours`."""
    gf = src.gf
    log(f"calibrating on {n_tokens} tokens of shipped text ({cfg.n_layers} layers)")
    tokens = calibration_tokens(gf.path, n_tokens)
    inputs = ffn_inputs(gf.path, tokens, threads=threads, gguf_file=gf)
    gf.release(gf.tensors)  # the dense run's pages of the mapping: what follows reads through src
    layouts, specs, quality = [], [], []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        gate, up, down = (_dequantize(src, p + n + ".weight") for n in FFN_MATRICES)
        pred, q, frequency = predictor_fit.fit_layer(inputs.pop(i), gate, up, down, cfg.ffn_activation)
        order = np.argsort(-frequency, kind="stable")  # the most often predicted neurons first
        layout = BundleLayout(
            cfg.d_model,
            gf.tensor(p + "ffn_gate.weight").ggml_type,
            gf.tensor(p + "ffn_up.weight").ggml_type,
            down_type(gf.tensor(p + "ffn_down.weight").ggml_type),
        )
        layouts.append(layout)
        quality.append(q)
        specs.append(
            TensorSpec(
                bundles.bundle_name(i),
                (layout.stride, cfg.n_ff),
                bundles.TYPE_I8,
                layout.stride * cfg.n_ff,
                lambda i=i, lay=layout, o=order: [_records(src, lay, i, o)],
            )
        )
        for name, ggml_type, ne, data in predictor_fit.to_tensors(i, pred.permuted(order)):
            specs.append(TensorSpec(name, ne, ggml_type, len(data), lambda data=data: [data]))
        log(
            f"layer {i:3d}: rank {q.rank:3d}, predicted {q.predicted_fraction:6.1%} of neurons, "
            f"output kept {q.preserved:6.1%}, recall {q.recall:6.1%}"
        )
    ours.update(bundles.layout_metadata(layouts))
    ours.update(
        {
            bundles.PREDICTOR + "kind": "lowrank",
            bundles.PREDICTOR + "target": predictor_fit.RELU_RECALL_TARGET
            if cfg.ffn_activation == "relu"
            else predictor_fit.GATED_PRESERVE_TARGET,
            bundles.CALIBRATION + "tokens": len(tokens),
            bundles.CALIBRATION + "text": "converters/data/calibration.txt (Python standard library docstrings)",
        }
    )
    for key in ("true_fraction", "predicted_fraction", "recall", "precision", "preserved"):
        ours[bundles.PREDICTOR + key] = [float(getattr(q, key)) for q in quality]
    ours[bundles.PREDICTOR + "rank"] = [int(q.rank) for q in quality]
    return specs, quality, len(tokens)


def _records(src: TensorSource, layout: BundleLayout, layer: int, order: np.ndarray) -> np.ndarray:
    p = f"blk.{layer}."
    gate = src.all_rows(src.gf.tensor(p + "ffn_gate.weight"))[order]
    up = src.all_rows(src.gf.tensor(p + "ffn_up.weight"))[order]
    down_t = np.ascontiguousarray(_dequantize(src, p + "ffn_down.weight").T[order])  # [n_ff, d]
    return layout.encode(gate, up, down_t)


def _repacked_matrices(gf: GGUFFile, cfg: ModelConfig) -> set:
    """The matrices a pass multiplies by (attention, FFN or stacked experts, an untied output head)
    that ggml runs on its repacked kernels here: stored repacked, streaming them costs no
    repacking at run time (an expert read into its slot is ready as it lands)."""
    ffn = FFN_MATRICES + (EXPERT_MATRICES if cfg.moe else ())
    names = [f"blk.{i}.{n}.weight" for i in range(cfg.n_layers) for n in ATTENTION_MATRICES + ffn]
    names += [] if cfg.tied_output else ["output.weight"]
    return {n for n in names if gf.has(n) and repacks(gf.tensor(n).ggml_type, gf.tensor(n).ne)}


def copy_spec(src: TensorSource, t, repacked: set = frozenset()) -> TensorSpec:
    """t as it is in the source, or (its name in `repacked`) in ggml's repacked layout, read
    through src a chunk at a time."""

    def repacked_chunks():
        per_block = max(GROUP, src.chunk // t.row_bytes // GROUP * GROUP)
        return src.row_blocks(t, per_block, lambda rows: repack_rows(t.ggml_type, rows))

    return TensorSpec(
        t.name, t.ne, t.ggml_type, t.nbytes, repacked_chunks if t.name in repacked else lambda: src.chunks(t)
    )
