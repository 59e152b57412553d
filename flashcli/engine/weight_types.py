"""The weight types the engine runs, and the check that a file holds no others."""

from __future__ import annotations

from gguf import GGMLQuantizationType as Q

from ..errors import UnsupportedModel
from .gguf_file import GGUFFile

# Weight types the engine runs: ggml type id -> name.
SUPPORTED_TYPES = {
    int(t): t.name
    for t in (
        Q.F32,
        Q.F16,
        Q.BF16,
        Q.Q8_0,
        Q.Q4_0,
        Q.Q4_1,
        Q.Q5_0,
        Q.Q5_1,
        Q.Q2_K,
        Q.Q3_K,
        Q.Q4_K,
        Q.Q5_K,
        Q.Q6_K,
        Q.IQ4_NL,
    )
}


def open_checked(path) -> GGUFFile:
    """The file, failing fast where a weight has a type the engine does not run (a model opened
    by the loader was checked there: it is handed down open)."""
    gf = GGUFFile(path)
    check_weight_types(gf)
    return gf


def check_weight_types(gf: GGUFFile):
    """Every weight tensor must have a type the engine runs (a converted mixture's experts: each
    kind in its records)."""
    for name, t in {**gf.tensors, **gf.views}.items():
        if name.endswith(".weight") and t.ggml_type not in SUPPORTED_TYPES:
            raise UnsupportedModel(f"{gf.path}: tensor {name} has type {t.type_name}, not supported")
