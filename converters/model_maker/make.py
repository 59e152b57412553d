"""Makes a GGUF model file of a named shape: the family's metadata and tensors (families.py),
a borrowed tokenizer (vocab.py), each tensor's type for the file type (type_mix.py) and random
weights (weights.py), streamed to disk tensor by tensor under a temporary name, renamed when
complete.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from converters.gguf_writer import TensorSpec, encode_metadata, write_gguf

from .families import FamilyModel, family_model
from .router_skew import router_skew, skewed
from .shapes import SHAPES, Shape
from .type_mix import FILE_TYPES, is_quantized, tensor_types
from .vocab import UNUSED, fit_vocab, read_vocab
from .weights import ChunkMaker, tensor_nbytes

ALIGNMENT = 32
QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION, which llama-quantize writes


class UnknownShape(ValueError):
    pass


def shape_by_name(name: str | Shape) -> Shape:
    if isinstance(name, Shape):
        return name
    if name not in SHAPES:
        raise UnknownShape(f"unknown shape {name!r}; known shapes: {', '.join(SHAPES)}")
    return SHAPES[name]


def model_metadata(
    name: str, shape: Shape, model: FamilyModel, file_type: str, seed: int, vocab_file, skew: str = "even"
) -> dict:
    """Every metadata entry of the made file, in file order."""
    vocab_meta, vocab_record = fit_vocab(read_vocab(str(vocab_file)), shape.n_vocab)
    meta = {
        "general.architecture": model.arch,
        "general.type": "model",
        # not the shape's name: llama.cpp reads "phi3" in general.name as a Phi-3 tokenizer, whose
        # <|end|> token a borrowed vocabulary lacks
        "general.name": "flashcli made model",
        **model.metadata,
        "general.file_type": FILE_TYPES[file_type].llama_ftype,
        "general.quantization_version": QUANTIZATION_VERSION,
        **vocab_meta,
        "flashcli.maker.shape": name,
        "flashcli.maker.seed": seed,
        "flashcli.maker.weights": "random",
        **({"flashcli.maker.router_skew": skew} if shape.n_expert else {}),
        "flashcli.maker.vocab_source": shape.vocab,
        **vocab_record,
    }
    return meta


def make_model(
    name: str | Shape,
    out,
    vocab_file,
    file_type: str = "F32",
    seed: int = 0,
    n_threads: int | None = None,
    progress=None,
    skew: str = "even",
) -> Path:
    """Writes shape `name` (a name of SHAPES, or a Shape of one's own) as a GGUF of `file_type`
    to `out`; returns its path. vocab_file: the GGUF whose tokenizer is borrowed (the shape's
    `vocab` model: scripts/fetch_model.py's model_path(shape.vocab)). skew: a router skew of
    router_skew.SKEWS (a mixture of experts' routers preferring some experts)."""
    shape = shape_by_name(name)
    if isinstance(name, Shape):
        name = f"custom {shape.family}"
    if file_type not in FILE_TYPES:
        raise ValueError(f"unknown type {file_type!r}; known types: {', '.join(FILE_TYPES)}")
    model = family_model(shape)
    model.tensors[:] = skewed(model.tensors, shape, router_skew(skew), seed)
    types = tensor_types(model.tensors, file_type, shape.n_layers)
    meta = model_metadata(name, shape, model, file_type, seed, vocab_file, skew)
    live = _live_tokens(meta["tokenizer.ggml.token_type"])
    if live < shape.n_vocab:
        # unused tokens at the vocabulary's end (ours or the source's padding) get zero rows, in
        # the embeddings and the output: a zero logit, never the argmax of a real one
        vocab_rows = ("token_embd.weight", "output.weight")
        model.tensors[:] = [replace(p, live_rows=live) if p.name in vocab_rows else p for p in model.tensors]
    if not any(is_quantized(t) for t in types.values()):
        del meta["general.quantization_version"]
    entries = [encode_metadata(k, v) for k, v in meta.items()]
    maker = ChunkMaker(
        seed, n_threads if n_threads is not None else _cores(), [(plan, types[plan.name]) for plan in model.tensors]
    )
    specs = [
        TensorSpec(
            plan.name,
            tuple(plan.ne),
            int(types[plan.name]),
            tensor_nbytes(plan, types[plan.name]),
            lambda plan=plan: maker.chunks(plan, types[plan.name]),
        )
        for plan in model.tensors
    ]
    out = Path(out)
    tmp = out.with_name(f".{out.name}.part{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write_gguf(f, entries, specs, ALIGNMENT, progress=progress)
        os.replace(tmp, out)
    finally:
        maker.close()
        if tmp.exists():
            tmp.unlink()
    return out


def _live_tokens(token_types) -> int:
    """The vocabulary's size without its trailing unused tokens."""
    n = len(token_types)
    while n and token_types[n - 1] == UNUSED:
        n -= 1
    return n


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
