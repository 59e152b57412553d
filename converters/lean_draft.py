"""A lean draft: a small model re-laid to propose tokens for a larger one of its vocabulary.

A draft sits resident beside a target that streams what the budget does not hold, so every byte
the draft keeps is a byte the target reads again at every pass. Three things make it smaller
and faster to run, none of which touches the target's output (verification decides every token):
- the output head keeps only the rows of the HEAD_ROWS tokens that occur most in the shipped
  calibration text (ties and unseen tokens by id, which in a BPE vocabulary is merge order); the
  kept ids are stored in the file (bundles.DRAFT_VOCAB), so a drafted token is always a real id;
- matrices whose type ggml has no repacked kernel for on this CPU (Q5_0, Q6_K, Q8_0 on x86) are
  re-encoded to one it has (Q4_0), and stored repacked as a rows file stores them;
- the token embeddings stay as they are: a draft reads one row per token (weights.Weights).
The result is a rows file (bundles.LAYOUT) with the extra key; BENCHMARKS.md has what it gains.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q

from flashcli.engine import bundles, ggml
from flashcli.engine.config import ModelConfig
from flashcli.engine.gguf_file import GGUFFile, TensorInfo
from flashcli.engine.repack import GROUP, repack_rows, repacks, signature
from flashcli.engine.weight_types import check_weight_types
from flashcli.engine.weights import ATTENTION_MATRICES, FFN_MATRICES
from flashcli.errors import BadModelFile, OutputExists

from .gguf_writer import TensorSpec, encode_metadata, write_gguf_file
from .tensor_source import TensorSource

HEAD_ROWS = 32768  # tokens the draft's head keeps (BENCHMARKS.md: acceptance against head size)
FAST_TYPE = int(Q.Q4_0)  # what a matrix without repacked kernels is re-encoded to, where ggml repacks it
ROWS_AT_A_TIME = 4096


def default_output(source: Path) -> Path:
    name = source.name[: -len(".gguf")] if source.name.endswith(".gguf") else source.name
    return source.with_name(name + ".draft.gguf")


def draft_vocabulary(source, n_vocab: int, rows: int) -> np.ndarray:
    """The ids the draft's head keeps, sorted: the `rows` most frequent in the calibration text
    (converters/data), then the lowest ids."""
    from flashcli.engine.tokenizer import Tokenizer

    from .calibration import calibration_text

    counts = np.zeros(n_vocab, np.int64)
    np.add.at(counts, np.asarray(Tokenizer(source).encode(calibration_text()), np.int64), 1)
    order = np.lexsort((np.arange(n_vocab), -counts))
    rows = min(rows, n_vocab) // GROUP * GROUP or min(rows, n_vocab)
    return np.sort(order[:rows]).astype(np.int32)


def lean_type(t: TensorInfo) -> int:
    """t's type, or FAST_TYPE where ggml runs t's type on plain kernels only and FAST_TYPE on
    repacked ones (never a float type: those are kept as they are)."""
    if repacks(t.ggml_type, t.ne) or t.ggml_type in bundles.FLOAT_TYPES:
        return t.ggml_type
    if t.row_len % ggml.type_traits(FAST_TYPE).blck_size or not repacks(FAST_TYPE, t.ne):
        return t.ggml_type
    return FAST_TYPE


def make_lean_draft(source, output=None, force: bool = False, head_rows: int = HEAD_ROWS, log=None):
    """Writes the lean draft of `source` (a plain GGUF); returns (output path, seconds)."""
    t0 = time.perf_counter()
    log = log or (lambda _msg: None)
    source = Path(source)
    gf = GGUFFile(source)
    cfg = ModelConfig.from_gguf(gf)
    if gf.get(bundles.FORMAT) is not None:
        raise BadModelFile(f"{gf.path}: already a flashcli file: a draft is made from the source GGUF")
    check_weight_types(gf)
    output = Path(output) if output else default_output(source)
    if output.exists() and not force:
        raise OutputExists(f"{output} exists (use --force to overwrite)")
    head = gf.tensor("token_embd.weight" if cfg.tied_output else "output.weight")
    vocab = draft_vocabulary(source, head.n_rows, head_rows)
    matrices = [f"blk.{i}.{n}.weight" for i in range(cfg.n_layers) for n in ATTENTION_MATRICES + FFN_MATRICES]
    with TensorSource(gf) as src:
        specs = []
        for name, t in gf.tensors.items():
            if name == "output.weight":
                continue  # written below, truncated
            if name in matrices:  # in whole rows: they may be re-encoded and repacked
                specs.append(_encoded(src, t, name, lean_type(t), np.arange(t.n_rows)))
            else:
                specs.append(_encoded(src, t, name, t.ggml_type))
        specs.append(_encoded(src, head, "output.weight", lean_type(head), vocab))
        log(
            f"lean draft: head of {len(vocab)} of {head.n_rows} tokens, "
            f"{sum(s.ggml_type != gf.tensor(s.name).ggml_type for s in specs if gf.has(s.name))} matrices re-encoded"
        )
        _write(output, gf, specs, matrices, vocab)
    return output, time.perf_counter() - t0


def _write(output: Path, gf: GGUFFile, specs: list, matrices: list, vocab: np.ndarray):
    repacked = {s.name for s in specs if s.name in matrices + ["output.weight"] and repacks(s.ggml_type, s.ne)}
    specs = [_stored_repacked(s) if s.name in repacked else s for s in specs]
    ours = {
        "general.alignment": bundles.FILE_ALIGN,
        bundles.FORMAT: bundles.FORMAT_VERSION,
        bundles.LAYOUT: "rows",
        bundles.SOURCE: gf.path.name,
        bundles.DRAFT_VOCAB: vocab,
        bundles.REPACKED: sorted(repacked),
        bundles.REPACK_SIGNATURE: signature({s.ggml_type for s in specs if s.name in repacked}),
    }
    metadata = [gf.raw_metadata(k) for k in gf.metadata if k not in ours] + [
        encode_metadata(k, v) for k, v in ours.items()
    ]
    write_gguf_file(output, metadata, specs, bundles.FILE_ALIGN, progress=False)


def _encoded(src: TensorSource, t: TensorInfo, name: str, ggml_type: int, rows: np.ndarray | None = None):
    """A TensorSpec of t's rows `rows` (ascending) in ggml_type, ROWS_AT_A_TIME at a time; None:
    t's bytes as they are, in chunks of no particular row count."""
    if rows is None:
        return TensorSpec(name, t.ne, t.ggml_type, t.nbytes, lambda: src.chunks(t))
    n_rows = len(rows)
    every_row = n_rows == t.n_rows  # then rows is 0..n-1: read in plain blocks, nothing to pick

    def chunks():
        blocks = src.row_blocks(t, ROWS_AT_A_TIME) if every_row else src.picked_rows(t, rows, ROWS_AT_A_TIME)
        for picked in blocks:
            if ggml_type == t.ggml_type:
                yield picked
            else:
                yield ggml.quantize_rows(ggml.dequantize_rows(picked, t.ggml_type, t.row_len), ggml_type)

    ne = (t.row_len, n_rows)
    return TensorSpec(name, ne, ggml_type, n_rows * ggml.row_bytes(ggml_type, t.row_len), chunks)


def _stored_repacked(spec: TensorSpec) -> TensorSpec:
    """The same tensor in ggml's repacked layout (ROWS_AT_A_TIME is a multiple of GROUP)."""
    plain = spec.chunks
    row_bytes = spec.nbytes // spec.ne[1]

    def chunks():
        for chunk in plain():
            yield repack_rows(spec.ggml_type, np.asarray(chunk, np.uint8).reshape(-1, row_bytes))

    return TensorSpec(spec.name, spec.ne, spec.ggml_type, spec.nbytes, chunks)


def make_beside(model, log=None) -> None:
    """The lean draft of a smaller model of MODEL's family beside it (loader.find_draft), once:
    `flashcli convert` makes it with the target's converted file."""
    from flashcli.decoding.loader import find_draft

    found = find_draft(model, GGUFFile(model), lean=False)
    if found is None or default_output(Path(found)).exists():
        return
    written, seconds = make_lean_draft(found, log=log)
    if log:
        log(f"wrote {written}, the lean draft of {Path(found).name}, in {seconds:.1f} s")
