"""Synthetic GGUF files with random weights (llama, qwen2 or gemma3), written with gguf.GGUFWriter.

For tests (every weight type and architecture, loadable by llama.cpp too) and for scale
benchmarks (a ~1B shape).
Random weights give no real activation patterns: use them for shapes, kernels, I/O and budgets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from flashcli.engine import ggml


@dataclass(frozen=True)
class Shape:
    n_layers: int = 2
    d_model: int = 256
    n_ff: int = 512
    n_heads: int = 4
    n_kv_heads: int = 2
    n_vocab: int = 512
    context_length: int = 2048


TINY = Shape()
# TinyLlama-1.1B's shape: 1.1e9 parameters.
LLAMA_1B = Shape(n_layers=22, d_model=2048, n_ff=5632, n_heads=32, n_kv_heads=4, n_vocab=32000)


def _vocab(n_vocab: int):
    """A sentencepiece-style vocabulary llama.cpp accepts: 3 specials, 256 byte tokens, pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # unknown, control, control, byte
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = 0
    while len(tokens) < n_vocab:
        word, k = "", i
        while True:
            word = letters[k % 26] + word
            k = k // 26 - 1
            if k < 0:
                break
        tokens.append("\u2581" + word)
        types.append(1)
        i += 1
    scores = [0.0] * 3 + [-1000.0] * 256 + [-float(j) for j in range(len(tokens) - 259)]
    return tokens[:n_vocab], scores[:n_vocab], types[:n_vocab]


def write_llama_gguf(
    path,
    shape: Shape = TINY,
    weight_type: int = 8,
    seed: int = 0,
    ffn_activation: str | None = None,
    tied_output: bool = False,
    embd_type: int | None = None,
    arch: str = "llama",
    extra: dict | None = None,
    repeat_layers: bool = False,
) -> str:
    """Writes a GGUF with random weights of `weight_type` (ggml type id); returns the path.
    arch "llama" (the default), "qwen2" (q/k/v biases, NEOX rope) or "gemma3" (GeGLU, q/k norms,
    post norms, sliding window of 8 tokens on five layers in six, tied output). `extra`: more
    metadata (e.g. a feature flashcli refuses). repeat_layers: every layer gets layer 0's bytes
    (a large shape made in seconds, for speed measurements: random values and quantization are
    most of the time)."""
    import gguf

    rng = np.random.default_rng(seed)
    s = shape
    hd = s.d_model // s.n_heads
    tmp = f"{path}.part{os.getpid()}"
    w = gguf.GGUFWriter(tmp, arch)
    w.add_name("flashcli synthetic")
    w.add_block_count(s.n_layers)
    w.add_context_length(s.context_length)
    w.add_embedding_length(s.d_model)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_heads)
    w.add_head_count_kv(s.n_kv_heads)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5 if arch != "gemma3" else 1e-6)
    w.add_vocab_size(s.n_vocab)
    if arch == "gemma3":
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_sliding_window(8)
        tied_output = True
    if ffn_activation:
        w.add_string("flashcli.ffn_activation", ffn_activation)
    for key, value in (extra or {}).items():
        add = w.add_string if isinstance(value, str) else w.add_float32 if isinstance(value, float) else w.add_uint32
        add(key, value)
    tokens, scores, types = _vocab(s.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)

    made = {}  # layer 0's tensors by their name without the layer prefix (repeat_layers)

    def matrix(name, rows, cols, std, qtype=weight_type):
        key = name.split(".", 2)[-1] if name.startswith("blk.") else None
        if repeat_layers and key in made:
            w.add_tensor(name, made[key][0], raw_dtype=made[key][1])
            return
        values = (rng.standard_normal((rows, cols), dtype=np.float32) * std).astype(np.float32)
        added = _add(w, name, values, qtype)
        if repeat_layers and key is not None:
            made[key] = added

    def norm(name, n=s.d_model):
        _add(w, name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)[None, :], 0)

    def bias(name, n):
        _add(w, name, (0.1 * rng.standard_normal(n)).astype(np.float32)[None, :], 0)

    matrix(
        "token_embd.weight",
        s.n_vocab,
        s.d_model,
        1.0 if arch != "gemma3" else 0.05,
        embd_type if embd_type is not None else weight_type,
    )
    for i in range(s.n_layers):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight")
        matrix(p + "attn_q.weight", s.n_heads * hd, s.d_model, s.d_model**-0.5)
        matrix(p + "attn_k.weight", s.n_kv_heads * hd, s.d_model, s.d_model**-0.5)
        matrix(p + "attn_v.weight", s.n_kv_heads * hd, s.d_model, s.d_model**-0.5)
        if arch == "qwen2":
            bias(p + "attn_q.bias", s.n_heads * hd)
            bias(p + "attn_k.bias", s.n_kv_heads * hd)
            bias(p + "attn_v.bias", s.n_kv_heads * hd)
        if arch == "gemma3":
            norm(p + "attn_q_norm.weight", hd)
            norm(p + "attn_k_norm.weight", hd)
            norm(p + "post_attention_norm.weight")
            norm(p + "post_ffw_norm.weight")
        matrix(p + "attn_output.weight", s.d_model, s.n_heads * hd, 0.5 * s.d_model**-0.5)
        norm(p + "ffn_norm.weight")
        matrix(p + "ffn_gate.weight", s.n_ff, s.d_model, s.d_model**-0.5)
        matrix(p + "ffn_up.weight", s.n_ff, s.d_model, s.d_model**-0.5)
        matrix(p + "ffn_down.weight", s.d_model, s.n_ff, 0.5 * s.n_ff**-0.5)
    norm("output_norm.weight")
    if not tied_output:
        matrix("output.weight", s.n_vocab, s.d_model, 3.0 * s.d_model**-0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return str(path)


def _add(writer, name: str, values: np.ndarray, ggml_type: int):
    """Adds a 2-D float32 array (rows, row_len) as `ggml_type`."""
    import gguf

    qtype = gguf.GGMLQuantizationType(ggml_type)
    if ggml_type == 0:
        raw, kind = (values if values.shape[0] > 1 else values[0]), None
    elif ggml_type == 1:
        raw, kind = values.astype(np.float16), None
    else:
        raw, kind = ggml.quantize_rows(values, ggml_type), qtype
    writer.add_tensor(name, raw, raw_dtype=kind)
    return raw, kind
