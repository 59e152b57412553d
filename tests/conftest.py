"""Shared fixtures: the real default model, the ReLU fixture from ../shared, synthetic GGUFs."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
RELU_MODEL = ROOT.parent / "shared" / "models" / "smollm2-135m-relu.gguf"
TEXT = (Path(__file__).parent / "data" / "declaration.txt").read_text()


@pytest.fixture(scope="session")
def smollm2() -> Path:
    if not SMOLLM2.exists():
        pytest.fail(f"{SMOLLM2} is missing: run `make model` (make test does it)")
    return SMOLLM2


@pytest.fixture(scope="session")
def relu_model() -> Path:
    if not RELU_MODEL.exists():
        pytest.skip(f"ReLU fixture {RELU_MODEL} is absent (it lives in ../shared, not in this repo)")
    return RELU_MODEL


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def llama_cpp_logits(path, tokens, n_threads: int = 2):
    """Reference logits [n, vocab] from llama.cpp itself (llama-cpp-python) on the same file."""
    import numpy as np
    from llama_cpp import Llama

    from flashcli.tokenizer import _quiet_stderr

    with _quiet_stderr():
        llm = Llama(str(path), n_ctx=max(64, len(tokens) + 8), n_batch=512, n_threads=n_threads,
                    logits_all=True, verbose=False)
        llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)], dtype=np.float32), llm


def llama_cpp_greedy(llm, prompt_tokens, n: int):
    """n greedy tokens from llama.cpp after prompt_tokens."""
    import numpy as np

    llm.reset()
    llm.eval(list(prompt_tokens))
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("converted")


@pytest.fixture(scope="session")
def smollm2_flash(smollm2, converted_dir) -> Path:
    """SmolLM2 converted with a short calibration (the full default is exercised by make bench)."""
    from flashcli.convert import convert

    return convert(smollm2, converted_dir / "smollm2.flash.gguf", calibration_tokens=1024).output


@pytest.fixture(scope="session")
def relu_flash(relu_model, converted_dir) -> Path:
    """The ReLU fixture converted with default settings: the acceptance case for predictors."""
    from flashcli.convert import convert

    return convert(relu_model, converted_dir / "relu.flash.gguf").output
