"""The model maker (converters/model_maker, scripts/make_model.py): llama.cpp is the judge.

Every tiny family file loads in llama.cpp (llama-cpp-python) and generates: finite logits over a
long prompt, 16 greedy tokens that are not one token repeated, a prompt that tokenizes and
decodes back. The type mix is checked against llama.cpp's own quantizer run on the same model
written as F32. Same seed, same bytes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import subprocess
import sys

import numpy as np
import pytest

from converters.model_maker import SHAPES, make_model
from flashcli.engine.gguf_file import GGUFFile

from conftest import ROOT, TEXT, llama_cpp, llama_cpp_greedy
from fetch_model import model_path

TINY = [name for name in SHAPES if name.startswith("tiny-")]
ARCH = {
    "llama": "llama",
    "llama3": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "phi3": "phi3",
    "granite": "granite",
    "olmo2": "olmo2",
    "smollm3": "smollm3",
    "mixtral": "llama",
    "qwen3moe": "qwen3moe",
    "qwen2moe": "qwen2moe",
    "olmoe": "olmoe",
}


def _vocab_file(shape_name: str):
    path = model_path(SHAPES[shape_name].vocab)
    if not path.exists():
        pytest.fail(f"{path} is missing: run `python scripts/fetch_model.py {SHAPES[shape_name].vocab}`")
    return path


@pytest.fixture(scope="module")
def made_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("made")


@pytest.fixture(scope="module")
def tiny_q8(made_dir):
    """Every tiny shape at Q8_0, made once."""
    return {name: make_model(name, made_dir / f"{name}.Q8_0.gguf", _vocab_file(name), "Q8_0") for name in TINY}


def test_every_family_has_a_tiny_shape():
    assert {SHAPES[name].family for name in TINY} == set(ARCH)


@pytest.mark.parametrize("name", TINY)
def test_llama_cpp_loads_and_generates(name, tiny_q8):
    path = tiny_q8[name]
    meta = GGUFFile(path).metadata
    assert meta["general.architecture"] == ARCH[SHAPES[name].family]
    assert meta["flashcli.maker.vocab_fit"] == "cut"  # 4096 of a larger vocabulary
    llm = llama_cpp(path, n_ctx=256)
    assert llm.n_vocab() == SHAPES[name].n_vocab
    tokens = llm.tokenize(TEXT[:400].encode(), add_bos=True)
    assert len(tokens) >= 32
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    assert np.isfinite(logits).all()
    assert logits.std() > 0.1  # the logits say something
    greedy = llama_cpp_greedy(llm, tokens[:32], 16)
    assert len(set(greedy)) > 1, f"greedy output collapsed into one token: {greedy}"


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-gemma3"])
def test_borrowed_tokenizer_round_trips(name, tiny_q8):
    """Prompts tokenize and decode back, in llama.cpp and in flashcli's Tokenizer (three
    source vocabularies: gpt2 BPE, qwen2 BPE, sentencepiece), and the chat template renders."""
    from flashcli.engine.tokenizer import Tokenizer

    text = "The quick brown fox jumps over the lazy dog, 12 times."
    llm = llama_cpp(tiny_q8[name], n_ctx=64)
    tokens = llm.tokenize(text.encode(), add_bos=False)
    assert 3 < len(tokens) < len(text)  # merged into more than bytes
    assert llm.detokenize(tokens).decode() == text
    tok = Tokenizer(tiny_q8[name])
    assert tok.encode(text, add_bos=False) == tokens
    assert tok.decode(tokens) == text
    assert "fox" in tok.apply_chat_template("the fox")


def test_vocab_padded_to_a_larger_shape():
    from converters.model_maker.vocab import fit_vocab, read_vocab

    src = read_vocab(str(model_path("smollm2-135m")))
    meta, record = fit_vocab(src, 49155)  # granite-3's vocabulary
    assert meta["tokenizer.ggml.tokens"][:49152] == list(src.tokens)
    assert meta["tokenizer.ggml.tokens"][49152:] == ["[PAD49152]", "[PAD49153]", "[PAD49154]"]
    assert meta["tokenizer.ggml.merges"] == list(src.merges)
    assert record["flashcli.maker.vocab_fit"] == "padded"


def test_vocab_cut_keeps_specials_and_consistent_merges():
    from converters.model_maker.vocab import fit_vocab, read_vocab

    src = read_vocab(str(model_path("qwen2.5-coder-1.5b")))
    meta, _ = fit_vocab(src, 4096)
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == 4096 and len(set(tokens)) == 4096
    assert tokens[meta["tokenizer.ggml.eos_token_id"]] == src.tokens[src.special_ids["eos"]]
    assert "<|im_start|>" in tokens
    kept = set(tokens)
    for merge in meta["tokenizer.ggml.merges"]:
        left, right = merge.split(" ")
        assert left in kept and right in kept and left + right in kept


NAMED = [name for name in SHAPES if not name.startswith("tiny-")]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMED)
def test_named_shape_loads_in_llama_cpp(name, tmp_path):
    """A real shape cut to two layers (every width, the vocabulary and rope settings its own)
    at Q4_K_M: llama.cpp loads it and generates."""
    two_layers = dataclasses.replace(SHAPES[name], n_layers=2)
    path = make_model(two_layers, tmp_path / "m.gguf", _vocab_file(name), "Q4_K_M")
    meta = GGUFFile(path).metadata
    assert meta["general.architecture"] == ARCH[two_layers.family]
    assert meta["flashcli.maker.vocab_fit"] in ("as is", "padded", "cut")
    llm = llama_cpp(path, n_ctx=128)
    assert llm.n_vocab() == two_layers.n_vocab
    tokens = llm.tokenize(TEXT[:200].encode(), add_bos=True)
    llm.eval(tokens)
    assert np.isfinite(np.array(llm.scores[: len(tokens)])).all()
    greedy = llama_cpp_greedy(llm, tokens, 8)
    assert len(set(greedy)) > 1
    assert all(meta["tokenizer.ggml.token_type"][t] != 5 for t in greedy)  # no unused (padding) token


# --- the type mix against llama.cpp's quantizer ------------------------------------------------


def _llama_quantize(src, dst, llama_ftype: int):
    import llama_cpp

    from flashcli.engine.tokenizer import _quiet_stderr

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftype
    params.nthread = 2
    with _quiet_stderr():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0


def _tensors(path):
    f = GGUFFile(path)
    return {name: (t.type_name, hashlib.sha256(t.raw).hexdigest()) for name, t in f.tensors.items()}


MIX_CASES = {
    # rows of 256 and 512 values: K-quants fit every matrix; 8 layers vary use_more_bits
    "tiny-qwen3-8": dict(base="tiny-qwen3", n_layers=8),
    # fused attn_qkv and gate|up
    "tiny-phi3": dict(base="tiny-phi3"),
    # d_model 320 and n_ff 864: rows that are not whole 256-blocks, tied embeddings
    "tiny-gemma3-320": dict(base="tiny-gemma3", d_model=320, n_ff=864, n_heads=5, n_kv_heads=1),
    # a vocabulary padded past its source's 49152 tokens: zero rows for the padding
    "tiny-granite-padded": dict(base="tiny-granite", n_vocab=49152 + 256),
    # experts: stacked 3-D tensors, an F32 router; 8 experts (llama.cpp's bumps for them); a
    # shared expert (two ffn_down a layer)
    "tiny-qwen3moe-8": dict(base="tiny-qwen3moe", n_layers=8),
    "tiny-mixtral": dict(base="tiny-mixtral"),
    "tiny-qwen2moe-8": dict(base="tiny-qwen2moe", n_layers=8),
}
FILE_TYPES_TRIED = ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q8_0", "Q4_0", "F16"]
MIX_RUNS = [("tiny-qwen3-8", t) for t in FILE_TYPES_TRIED] + [
    ("tiny-phi3", "Q4_K_M"),
    ("tiny-phi3", "Q5_K_M"),
    ("tiny-gemma3-320", "Q4_K_M"),
    ("tiny-gemma3-320", "Q4_K_S"),
    ("tiny-gemma3-320", "Q4_0"),
    ("tiny-granite-padded", "Q4_K_M"),
]
# mixtures of experts: the types llama.cpp's quantizer bumps for them (one file type per case: time)
MIX_RUNS += [("tiny-qwen3moe-8", "Q4_K_M"), ("tiny-mixtral", "Q4_K_M"), ("tiny-qwen2moe-8", "Q4_K_M")]


@pytest.mark.parametrize("case,file_type", MIX_RUNS)
def test_type_mix_matches_llama_quantize(case, file_type, made_dir):
    """Our file of `file_type` against llama.cpp quantizing our F32 file: the same type for
    every tensor, and (same values, same ggml quantizer) the same bytes."""
    from converters.model_maker.type_mix import FILE_TYPES

    spec = dict(MIX_CASES[case])
    base = spec.pop("base")
    shape = dataclasses.replace(SHAPES[base], **spec)
    vocab = _vocab_file(base)
    f32 = made_dir / f"{case}.F32.gguf"
    if not f32.exists():
        make_model(shape, f32, vocab, "F32")
    ours = make_model(shape, made_dir / f"{case}.{file_type}.gguf", vocab, file_type)
    theirs = made_dir / f"{case}.{file_type}.llama-quantize.gguf"
    _llama_quantize(f32, theirs, FILE_TYPES[file_type].llama_ftype)
    a, b = _tensors(ours), _tensors(theirs)
    assert set(a) == set(b)
    types = {name: (a[name][0], b[name][0]) for name in a}
    assert {n: t for n, t in types.items() if t[0] != t[1]} == {}
    assert [n for n in a if a[n][1] != b[n][1]] == []


def test_padding_tokens_never_win(made_dir):
    """A padded vocabulary's extra tokens have zero rows: greedy output stays in the source's."""
    shape = dataclasses.replace(SHAPES["tiny-granite"], n_vocab=49152 + 256)
    path = make_model(shape, made_dir / "padded.gguf", _vocab_file("tiny-granite"), "Q8_0")
    embd = GGUFFile(path).tensor("token_embd.weight")
    assert not embd.rows()[49152:].any() and embd.rows()[:49152].any(axis=1).all()
    llm = llama_cpp(path, n_ctx=128)
    tokens = llm.tokenize(TEXT[:200].encode(), add_bos=True)
    greedy = llama_cpp_greedy(llm, tokens, 16)
    assert max(greedy) < 49152 and len(set(greedy)) > 1


# --- determinism, errors -----------------------------------------------------------------------


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_file(made_dir):
    vocab = _vocab_file("tiny-llama3")
    a = make_model("tiny-llama3", made_dir / "seed-a.gguf", vocab, "Q4_K_M", seed=7)
    b = make_model("tiny-llama3", made_dir / "seed-b.gguf", vocab, "Q4_K_M", seed=7, n_threads=1)
    c = make_model("tiny-llama3", made_dir / "seed-c.gguf", vocab, "Q4_K_M", seed=8)
    assert _sha(a) == _sha(b)
    assert _sha(a) != _sha(c)


def _cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_model.py"), *args], capture_output=True, text=True, timeout=120
    )


def test_unknown_shape_is_one_line_and_exit_2(tmp_path):
    r = _cli("llama-9000", "-o", str(tmp_path / "x.gguf"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "llama-9000" in lines[0] and "qwen3-8b" in lines[0] and "tiny-phi3" in lines[0]
    assert not (tmp_path / "x.gguf").exists()


def test_list_names_every_shape():
    r = _cli("--list")
    assert r.returncode == 0
    for name in SHAPES:
        assert name in r.stdout


def _f32(path, name):
    info = GGUFFile(path).tensor(name)
    return info.raw.view(np.float32).reshape(info.n_rows, info.row_len)


def test_router_skew_moves_only_the_carrier_and_the_routers(made_dir):
    """Same seed, F32: a skewed file is the even one but for every embedding row's first
    CARRIER_DIMS values (moved by the same constant) and each router row's (moved per expert,
    by a long tail of offsets: some experts hot, most cold); every other byte is the same."""
    from converters.model_maker.router_skew import CARRIER_DIMS

    vocab = _vocab_file("tiny-olmoe")
    even = make_model("tiny-olmoe", made_dir / "skew-even.gguf", vocab, "F32", seed=3)
    skew = make_model("tiny-olmoe", made_dir / "skew-hot.gguf", vocab, "F32", seed=3, skew="hot")
    a, b = GGUFFile(even), GGUFFile(skew)
    assert b.get("flashcli.maker.router_skew") == "hot" and a.get("flashcli.maker.router_skew") == "even"
    live = int(np.sum(np.abs(_f32(even, "token_embd.weight")).sum(axis=1) > 0))
    moved = _f32(skew, "token_embd.weight") - _f32(even, "token_embd.weight")
    assert np.all(moved[:, CARRIER_DIMS:] == 0) and np.all(moved[live:] == 0)
    carrier = moved[:live, :CARRIER_DIMS]
    assert np.ptp(carrier) < 1e-5 and carrier.min() > 0.5  # one constant, well above the noise of 1
    for layer in range(SHAPES["tiny-olmoe"].n_layers):
        name = f"blk.{layer}.ffn_gate_inp.weight"
        offsets = _f32(skew, name) - _f32(even, name)
        assert np.all(offsets[:, CARRIER_DIMS:] == 0)
        per_expert = offsets[:, 0]
        assert np.allclose(offsets[:, :CARRIER_DIMS], per_expert[:, None])
        assert (per_expert > 0).sum() == (per_expert < 0).sum() and np.ptp(per_expert) > 0  # hot and cold
    for name in a.tensors:
        if name != "token_embd.weight" and not name.endswith("ffn_gate_inp.weight"):
            assert np.array_equal(a.tensor(name).raw, b.tensor(name).raw), name


def test_router_skew_of_a_quantized_file_keeps_the_even_files_other_units(made_dir):
    """At Q8_0 the embeddings are quantized: only each row's first unit (256 values) is
    re-encoded, so the rest of every row is byte for byte the even file's."""
    vocab = _vocab_file("tiny-olmoe")
    even = GGUFFile(make_model("tiny-olmoe", made_dir / "q-even.gguf", vocab, "Q8_0", seed=3))
    skew = GGUFFile(make_model("tiny-olmoe", made_dir / "q-trained.gguf", vocab, "Q8_0", seed=3, skew="trained"))
    rows_a, rows_b = even.tensor("token_embd.weight").rows(), skew.tensor("token_embd.weight").rows()
    unit = rows_a.shape[1] * 256 // even.tensor("token_embd.weight").row_len
    assert np.array_equal(rows_a[:, unit:], rows_b[:, unit:]) and not np.array_equal(rows_a[:, :unit], rows_b[:, :unit])


def test_bad_router_skew_is_one_line_and_exit_2(tmp_path):
    for args in (["tiny-olmoe", "--router-skew", "lopsided"], ["tiny-llama", "--router-skew", "trained"]):
        r = _cli(*args, "-o", str(tmp_path / "x.gguf"))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "router-skew" in r.stderr
        assert not (tmp_path / "x.gguf").exists()
