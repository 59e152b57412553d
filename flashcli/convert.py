"""flashcli convert: a llama.cpp GGUF -> one standard GGUF with bundled FFN neurons and predictors.

Steps: validate the source; run the dense model over calibration text, tapping each layer's FFN
input; fit each layer's predictor on those inputs; stream the output (source metadata and
non-FFN tensors copied byte for byte, then per layer the neuron bundles and the predictor) to a
temporary file that is renamed only once complete.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from . import bundles, ggml, predictor
from .bundles import BundleLayout
from .config import ModelConfig
from .errors import BadModelFile, DiskFull, OutputExists, UnsupportedModel
from .gguf_file import GGUFFile, TensorSpec, encode_metadata, write_gguf
from .model import SUPPORTED_TYPES, Model

CALIBRATION_TOKENS = 4096
CALIBRATION_BATCH = 512
CHUNK = 16 << 20  # bytes per write of a copied tensor
FFN_TENSORS = ("ffn_gate", "ffn_up", "ffn_down")


@dataclass
class ConvertResult:
    output: Path
    input_bytes: int
    output_bytes: int
    seconds: float
    calibration_tokens: int
    quality: list  # per layer predictor.Quality


def default_output(source: Path) -> Path:
    name = source.name[: -len(".gguf")] if source.name.endswith(".gguf") else source.name
    return source.with_name(name + ".flash.gguf")


def calibration_text() -> str:
    return resources.files("flashcli").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def convert(source, output=None, force: bool = False, calibration_tokens: int = CALIBRATION_TOKENS,
            threads: int | None = None, log=None, progress: bool | None = None) -> ConvertResult:
    """Converts `source`; returns what was written. `log(str)` receives progress lines."""
    t0 = time.perf_counter()
    log = log or (lambda _msg: None)
    source = Path(source)
    gf = GGUFFile(source)
    cfg = ModelConfig.from_gguf(gf)
    _check_source(gf, cfg)
    output = Path(output) if output else default_output(source)
    if output.exists() and not force:
        raise OutputExists(f"{output} exists (use --force to overwrite)")
    if output.resolve() == source.resolve():
        raise OutputExists(f"{output}: output would overwrite the source")

    layout = BundleLayout.for_types(cfg.d_model, gf.tensor("blk.0.ffn_gate.weight").ggml_type,
                                    gf.tensor("blk.0.ffn_up.weight").ggml_type,
                                    gf.tensor("blk.0.ffn_down.weight").ggml_type)
    log(f"calibrating on {calibration_tokens} tokens of shipped text ({cfg.n_layers} layers)")
    inputs = _ffn_inputs(source, gf, calibration_tokens, threads)
    predictors, quality = [], []
    for i in range(cfg.n_layers):
        gate, up, down = (_dequantize(gf, f"blk.{i}.{n}.weight") for n in FFN_TENSORS)
        pred, q = predictor.fit_layer(inputs[i], gate, up, down, cfg.ffn_activation)
        inputs[i] = None  # free as we go
        predictors.append(pred)
        quality.append(q)
        log(f"layer {i:3d}: rank {q.rank:3d}, predicted {q.predicted_fraction:6.1%} of neurons, "
            f"output kept {q.preserved:6.1%}" + (f", recall {q.recall:6.1%}" if cfg.ffn_activation == "relu" else ""))

    metadata = _metadata(gf, cfg, layout, quality, calibration_tokens)
    tensors = _tensor_specs(gf, cfg, layout, predictors)
    total = sum(t.nbytes for t in tensors)
    free = shutil.disk_usage(output.parent if str(output.parent) else ".").free
    if free < total + (64 << 20):
        raise DiskFull(f"{output.parent}: {free / 2**30:.2f} GiB free, the output needs {total / 2**30:.2f} GiB")
    _write_atomically(output, metadata, tensors, total, progress)
    return ConvertResult(output, source.stat().st_size, output.stat().st_size, time.perf_counter() - t0,
                         calibration_tokens, quality)


def _check_source(gf: GGUFFile, cfg: ModelConfig):
    if gf.get("flashcli.format_version") is not None:
        raise BadModelFile(f"{gf.path}: already a flashcli file")
    for i in range(cfg.n_layers):
        for name in FFN_TENSORS:
            t = gf.tensor(f"blk.{i}.{name}.weight")
            if t.ggml_type not in SUPPORTED_TYPES:
                raise UnsupportedModel(f"{gf.path}: {t.name} has type {t.type_name}, not supported")
    if cfg.d_model % 32:
        raise UnsupportedModel(f"{gf.path}: d_model {cfg.d_model} is not a multiple of 32")


def _dequantize(gf: GGUFFile, name: str) -> np.ndarray:
    t = gf.tensor(name)
    return ggml.dequantize_rows(t.rows(), t.ggml_type, t.row_len)


def _ffn_inputs(source: Path, gf: GGUFFile, n_tokens: int, threads) -> list:
    """Per layer, the FFN input h [n_tokens, d] (float16) of the dense model on calibration text."""
    from .tokenizer import Tokenizer

    tokens = Tokenizer(source).encode(calibration_text())[:n_tokens]
    if len(tokens) < 256:
        raise BadModelFile(f"{source}: calibration text gives only {len(tokens)} tokens")
    model = Model(source, n_threads=threads, n_ctx=CALIBRATION_BATCH, gguf_file=gf)
    taps = [[] for _ in range(model.cfg.n_layers)]
    model.on_ffn_input = lambda layer, h: taps[layer].append(h.astype(np.float16))
    for start in range(0, len(tokens), CALIBRATION_BATCH):
        model.reset()
        model.eval(tokens[start : start + CALIBRATION_BATCH], logits=False)
    return [np.concatenate(t) for t in taps]


def _metadata(gf: GGUFFile, cfg: ModelConfig, layout: BundleLayout, quality: list, n_tokens: int) -> list[bytes]:
    entries = [gf.raw_metadata(k) for k in gf.metadata if k != "general.alignment"]
    ours = {
        "general.alignment": bundles.FILE_ALIGN,
        "flashcli.format_version": bundles.FORMAT_VERSION,
        **layout.metadata(),
        "flashcli.predictor.kind": predictor.KIND,
        "flashcli.predictor.target": predictor.RELU_RECALL_TARGET if cfg.ffn_activation == "relu" else predictor.SILU_PRESERVE_TARGET,
        "flashcli.calibration.tokens": n_tokens,
        "flashcli.calibration.text": "flashcli/data/calibration.txt (Python standard library docstrings)",
        "flashcli.source.file": gf.path.name,
    }
    if "flashcli.ffn_activation" not in gf.metadata:
        ours["flashcli.ffn_activation"] = cfg.ffn_activation
    for key in ("true_fraction", "predicted_fraction", "recall", "precision", "preserved"):
        ours[f"flashcli.predictor.{key}"] = [float(getattr(q, key)) for q in quality]
    ours["flashcli.predictor.rank"] = [int(q.rank) for q in quality]
    return entries + [encode_metadata(k, v) for k, v in ours.items()]


def _tensor_specs(gf: GGUFFile, cfg: ModelConfig, layout: BundleLayout, predictors: list) -> list[TensorSpec]:
    ffn = {f"blk.{i}.{n}.weight" for i in range(cfg.n_layers) for n in FFN_TENSORS}
    specs = [_copy_spec(t) for name, t in gf.tensors.items() if name not in ffn]
    for i in range(cfg.n_layers):
        specs.append(TensorSpec(bundles.bundle_name(i), (layout.stride, cfg.n_ff), bundles.TYPE_I8,
                                layout.stride * cfg.n_ff, lambda i=i: [_bundle_records(gf, layout, i)]))
        for name, ggml_type, ne, data in predictor.to_tensors(i, predictors[i]):
            specs.append(TensorSpec(name, ne, ggml_type, len(data), lambda data=data: [data]))
    return specs


def _copy_spec(t) -> TensorSpec:
    def chunks():
        for start in range(0, t.nbytes, CHUNK):
            yield t.raw[start : start + CHUNK]

    return TensorSpec(t.name, t.ne, t.ggml_type, t.nbytes, chunks)


def _bundle_records(gf: GGUFFile, layout: BundleLayout, layer: int) -> np.ndarray:
    gate = gf.tensor(f"blk.{layer}.ffn_gate.weight").rows()
    up = gf.tensor(f"blk.{layer}.ffn_up.weight").rows()
    down_t = np.ascontiguousarray(_dequantize(gf, f"blk.{layer}.ffn_down.weight").T)  # [n_ff, d]
    return layout.encode_layer(gate, up, down_t)


def _write_atomically(output: Path, metadata, tensors, total: int, progress: bool | None):
    from tqdm import tqdm

    tmp = output.with_name(f".{output.name}.part-{os.getpid()}")
    show = progress if progress is not None else (sys.stderr.isatty() or total > (1 << 30))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=not show, file=sys.stderr)
    try:
        with open(tmp, "wb") as f:
            write_gguf(f, metadata, tensors, bundles.FILE_ALIGN, progress=bar.update,
                       on_tensor=lambda name: bar.set_postfix_str(name.split(".ffn")[0] if name.startswith("blk.") else name))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
