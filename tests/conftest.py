"""Shared fixtures: the real models (fetched by `make test`), the ReLU fixture from ../shared,
synthetic GGUFs, and llama.cpp itself as the reference; every test's time limit."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
# the speeds runs remember for the cost model (flashcli/flash/measured.py) stay inside the test session:
# the loader's choices in one test must not depend on what another test ran
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="flashcli-tests-cache-")
sys.path.insert(0, str(ROOT / "scripts"))

from fetch_model import RELU_FIXTURE, model_path, relu_fixture_path  # noqa: E402

SMOLLM2 = model_path("smollm2-135m")
GEMMA3 = model_path("gemma3-270m")
QWEN = model_path("qwen2.5-coder-1.5b")
TEXT = (Path(__file__).parent / "data" / "declaration.txt").read_text()
HELDOUT = (Path(__file__).parent / "data" / "heldout.txt").read_text()


# Every test gets a time limit (pytest-timeout), so that a hung test fails on its own instead of
# eating CI's 90 minutes. The thread method ends the whole run with every thread's stack: a hang
# inside ggml (C code) never returns to Python, where the signal method would wait for it.
DEFAULT_TIMEOUT_S = 600
SLOW_TIMEOUT_S = 900  # tests marked `slow` (the 1.5B), their session fixtures' conversions included


def pytest_configure(config):
    if os.environ.get("CI") == "true" and not config.pluginmanager.hasplugin("timeout"):
        raise pytest.UsageError("CI needs pytest-timeout: pip install -e '.[test]'")


def _cuda_missing() -> str | None:
    """Why tests marked `cuda` cannot run here (None where they can)."""
    from flashcli.engine.gpu import cuda
    from flashcli.errors import NoGpu

    try:
        cuda()
    except NoGpu as e:
        return str(e)
    return None


def pytest_collection_modifyitems(config, items):
    cuda_items = [item for item in items if item.get_closest_marker("cuda")]
    why = _cuda_missing() if cuda_items else None
    for item in cuda_items if why else ():
        item.add_marker(pytest.mark.skip(reason=why))
    if not config.pluginmanager.hasplugin("timeout"):
        return
    for item in items:
        if item.get_closest_marker("timeout") is None:
            limit = SLOW_TIMEOUT_S if item.get_closest_marker("slow") else DEFAULT_TIMEOUT_S
            item.add_marker(pytest.mark.timeout(limit, method="thread"))


def _model(path: Path, name: str) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: run `python scripts/fetch_model.py {name}` (make test does it)")
    return path


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return _model(SMOLLM2, "smollm2-135m")


@pytest.fixture(scope="session")
def gemma3() -> Path:
    return _model(GEMMA3, "gemma3-270m")


@pytest.fixture(scope="session")
def qwen() -> Path:
    return _model(QWEN, "qwen2.5-coder-1.5b")


@pytest.fixture(scope="session")
def relu_model() -> Path:
    """The ReLU fixture (scripts/fetch_model.py finds it). Absent, its tests are skipped; in CI
    (CI=true) they fail: the predictor's acceptance tests must not vanish from a green run."""
    path = relu_fixture_path()
    if path is None:
        message = f"ReLU fixture {RELU_FIXTURE} is absent (it lives in ../shared/models, not in this repo)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def token_logits(model, tokens):
    """Our next-token logits [n, vocab] at every position of `tokens`, from an empty state."""
    import numpy as np

    model.reset()
    batch = model.prompt_batch
    return np.concatenate([model.eval(tokens[s : s + batch], all_logits=True) for s in range(0, len(tokens), batch)])


def llama_cpp(path, n_ctx: int = 512, n_threads: int = 2):
    """llama.cpp itself (llama-cpp-python) on the same file, every position's logits kept."""
    from llama_cpp import Llama

    from flashcli.engine.tokenizer import _quiet_stderr

    with _quiet_stderr():
        return Llama(str(path), n_ctx=n_ctx, n_batch=512, n_threads=n_threads, logits_all=True, verbose=False)


def llama_cpp_logits(path, tokens, n_threads: int = 2):
    """Reference logits [n, vocab] from llama.cpp on the same file, and the Llama object."""
    import numpy as np

    llm = llama_cpp(path, max(64, len(tokens) + 8), n_threads)
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


def llama_cpp_perplexity(llm, tokens, window: int = 512) -> float:
    """Perplexity from llama.cpp's logits, in windows from an empty state (flashcli's protocol)."""
    import numpy as np

    from flashcli.decoding.perplexity import log_softmax

    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, window):
        chunk = tokens[start : start + window]
        if len(chunk) < 2:
            break
        llm.reset()
        llm.eval(list(chunk))
        logp = log_softmax(np.array(llm.scores[: len(chunk)], dtype=np.float32))
        nll -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
        count += len(chunk) - 1
    return float(np.exp(nll / count))


@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("converted")


@pytest.fixture(scope="session")
def made(tmp_path_factory):
    """made(shape, file type[, router skew]): the model maker's file (scripts/make_model.py), made once."""
    from converters.model_maker import SHAPES, make_model

    directory, files = tmp_path_factory.mktemp("made"), {}

    def get(name: str, file_type: str, skew: str = "even") -> Path:
        key = name, file_type, skew
        if key not in files:
            vocab = model_path(SHAPES[name].vocab)
            if not vocab.exists():
                pytest.fail(f"{vocab} is missing: run `python scripts/fetch_model.py {SHAPES[name].vocab}`")
            out = directory / f"{name}.{file_type}{'' if skew == 'even' else '.' + skew}.gguf"
            files[key] = make_model(name, out, vocab, file_type, 1, skew=skew)
        return files[key]

    return get


@pytest.fixture(scope="session")
def moe_tiny(made) -> Path:
    """The maker's tiny qwen3moe (16 experts, 4 a token) at Q4_K_M: the experts layout."""
    return Path(made("tiny-qwen3moe", "Q4_K_M"))


@pytest.fixture(scope="session")
def moe_converted(moe_tiny, converted_dir) -> Path:
    """moe_tiny converted: its experts as records (one read an expert)."""
    from converters.convert import convert

    return convert(moe_tiny, converted_dir / "moe_tiny.flash.gguf").output


@pytest.fixture(scope="session")
def smollm2_flash(smollm2, converted_dir) -> Path:
    """SmolLM2 converted with default settings (rows layout: SwiGLU)."""
    from converters.convert import convert

    return convert(smollm2, converted_dir / "smollm2.flash.gguf").output


@pytest.fixture(scope="session")
def smollm2_bundles(smollm2, converted_dir) -> Path:
    """SmolLM2 forced to the bundles layout, with a short calibration."""
    from converters.convert import convert

    return convert(smollm2, converted_dir / "smollm2.bundles.gguf", layout="bundles", calibration_tokens=1024).output


@pytest.fixture(scope="session")
def relu_flash(relu_model, converted_dir) -> Path:
    """The ReLU fixture converted with default settings (bundles): the acceptance case for predictors."""
    from converters.convert import convert

    return convert(relu_model, converted_dir / "relu.flash.gguf").output


@pytest.fixture(scope="session")
def smollm2_draft(smollm2, converted_dir) -> Path:
    """A lean draft of SmolLM2 (converters/lean_draft.py) with a head of 2048 of its 49152 tokens:
    small enough that it often proposes what SmolLM2 itself would not."""
    from converters.lean_draft import make_lean_draft

    return make_lean_draft(smollm2, converted_dir / "smollm2.draft.gguf", head_rows=2048)[0]


def verify_batch(model_path) -> tuple[np.ndarray, np.ndarray]:
    """(logits of 9 greedy tokens after TEXT's first 24, verified in one exact pass; the same
    tokens decoded one at a time): a verifying pass and its single-token reference."""
    from flashcli.decoding.generate import prefill
    from flashcli.engine.model import Model
    from flashcli.engine.tokenizer import Tokenizer

    prompt = Tokenizer(model_path).encode(TEXT)[:24]
    m = Model(model_path, n_ctx=128)
    logits = prefill(m, prompt)
    follow, single = [], []
    for _ in range(9):
        follow.append(int(np.argmax(logits)))
        logits = m.eval([follow[-1]])
        single.append(logits)
    m.rollback(len(prompt))
    m.exact = True
    batch = m.eval(follow, all_logits=True)
    return batch, np.stack(single)
