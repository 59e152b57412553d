"""Which weights run on ggml's repacked kernels: flashcli asks ggml (repack.repacks); these tests
check the answer against what llama.cpp does on this CPU, observed from outside the question:
the tensors llama.cpp's loader repacks (ggml logs each one) and the logits it computes."""

from __future__ import annotations

import ctypes as C
import re
from contextlib import contextmanager

import numpy as np
import pytest

from flashcli.engine import ggml
from flashcli.engine.config import ModelConfig
from flashcli.engine.gguf_file import GGUFFile
from flashcli.engine.model import Model
from flashcli.engine.repack import repacked_types, repacks
from flashcli.engine.weight_types import SUPPORTED_TYPES
from flashcli.engine.weights import Weights

from conftest import llama_cpp, llama_cpp_logits, token_logits
from synthetic import TINY, write_llama_gguf

TYPES = {name: ggml_type for ggml_type, name in SUPPORTED_TYPES.items()}


@contextmanager
def llama_cpp_log():
    """The lines llama.cpp and its ggml log meanwhile (DEBUG included); the loggers restored
    after. Set through llama-cpp-python: the process may hold a second copy of ggml beside
    flashcli's (the wheel ships libggml-base.so and libggml-base.so.0 as two files), and only
    llama_log_set reaches the one llama.cpp calls."""
    import llama_cpp

    previous, user_data = llama_cpp.llama_log_callback(), C.c_void_p()
    llama_cpp.llama_log_get(C.byref(previous), C.byref(user_data))
    ours, ours_data = C.c_void_p(), C.c_void_p()
    ggml.lib().log_get(C.byref(ours), C.byref(ours_data))
    lines = []

    @llama_cpp.llama_log_callback
    def capture(level, text, _user):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(capture, None)
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(previous, user_data)
        ggml.lib().log_set(ours, ours_data)


def llama_cpp_repacked(path) -> set[str]:
    """Names of the tensors llama.cpp puts in CPU_REPACK buffers when it loads `path`: ggml's
    repack buffer logs "repack tensor NAME" for each tensor it repacks."""
    with llama_cpp_log() as lines:
        llm = llama_cpp(path, n_ctx=64)
    del llm
    return set(re.findall(r"repack tensor (\S+) with", "".join(lines)))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("type_name", list(TYPES))
def test_repacked_tensors_are_llama_cpps(type_name, tied, synthetic_dir):
    """Tensor by tensor, flashcli repacks what llama.cpp's loader repacks on this CPU."""
    path = write_llama_gguf(
        synthetic_dir / f"repack-{type_name}-{'tied' if tied else 'untied'}.gguf",
        TINY,
        TYPES[type_name],
        seed=1,
        tied_output=tied,
    )
    theirs = llama_cpp_repacked(path)
    model = Model(path, n_ctx=64)
    ours = set(model.weights.repacked.tensors)
    asked = {name for name, t in model.weights.matrices.items() if repacks(t.ggml_type, t.ne)}
    print(
        f"\n{type_name} ({'tied' if tied else 'untied'} output): llama.cpp repacks {len(theirs)} tensors, "
        f"flashcli {len(ours)}; ggml repacks {', '.join(repacked_types()) or 'nothing'} on this CPU"
    )
    assert ours == asked
    assert ours == theirs


@pytest.mark.parametrize("type_name", list(TYPES))
def test_kernels_chosen_give_llama_cpps_logits(type_name, synthetic_dir):
    """The logits tell which kernels llama.cpp ran: where ggml repacks a type, the plain and
    repacked kernels round differently (by 0.4% to 5% of the logits' scale on the tiny model),
    and flashcli's logits must be llama.cpp's with the repacked ones (measured: bit for bit),
    far from what the plain ones give. Where it does not, nothing is repacked and flashcli's
    logits must be llama.cpp's far more closely than that gap."""
    path = write_llama_gguf(synthetic_dir / f"kernels-{type_name}.gguf", TINY, TYPES[type_name], seed=1)
    rng = np.random.default_rng(0)
    tokens = [1] + rng.integers(3, TINY.n_vocab, 63).tolist()
    ref, _ = llama_cpp_logits(path, tokens)
    chosen = token_logits(Model(path, n_ctx=128), tokens)
    gf = GGUFFile(path)
    plain_weights = Weights(gf, ModelConfig.from_gguf(gf), repack=False)
    plain = token_logits(Model(path, n_ctx=128, gguf_file=gf, weights=plain_weights), tokens)
    repacked = repacks(TYPES[type_name], (TINY.d_model, TINY.n_ff))
    d_chosen, d_plain = float(np.abs(chosen - ref).max()), float(np.abs(plain - ref).max())
    print(
        f"\n{type_name}: {'repacked' if repacked else 'plain'} kernels; max |diff| to llama.cpp "
        f"{d_chosen:.2e} (plain kernels: {d_plain:.2e})"
    )
    if repacked:
        assert d_plain > 0, "plain and repacked kernels agree here: the comparison cannot tell them apart"
        assert d_chosen <= 0.01 * d_plain
    else:
        assert np.array_equal(chosen, plain)
        assert d_chosen <= 1e-4 * np.abs(ref).mean()
