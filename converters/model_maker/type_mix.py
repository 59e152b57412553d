"""Which ggml type each tensor gets for a file type (`--type`): the choices llama.cpp's
quantizer makes (llama_tensor_get_type in src/llama-quant.cpp), written again here for the
file types the maker offers, so that a made Q4_K_M file has the mix `llama-quantize` gives.
tests/test_model_maker.py checks it tensor by tensor against llama.cpp's own quantizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T


@dataclass(frozen=True)
class FileType:
    llama_ftype: int  # general.file_type (enum llama_ftype)
    default: T  # the type of most matrices


FILE_TYPES = {
    "F32": FileType(0, T.F32),
    "F16": FileType(1, T.F16),
    "Q4_0": FileType(2, T.Q4_0),
    "Q4_1": FileType(3, T.Q4_1),
    "Q8_0": FileType(7, T.Q8_0),
    "Q5_0": FileType(8, T.Q5_0),
    "Q5_1": FileType(9, T.Q5_1),
    "Q4_K_S": FileType(14, T.Q4_K),
    "Q4_K_M": FileType(15, T.Q4_K),
    "Q5_K_S": FileType(16, T.Q5_K),
    "Q5_K_M": FileType(17, T.Q5_K),
    "Q6_K": FileType(18, T.Q6_K),
}

# where a K-quant does not fit a row (rows must hold whole blocks of 256), llama.cpp falls back
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


def block_size(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def is_quantized(t: T) -> bool:
    return t not in (T.F32, T.F16, T.BF16)


def quantizable(name: str, ne: tuple) -> bool:
    """Matrices named *weight, norms and a MoE's router excepted; vectors (norms, biases, rope
    factors) stay F32."""
    return len(ne) >= 2 and name.endswith("weight") and not name.endswith(("_norm.weight", "ffn_gate_inp.weight"))


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The layers whose attn_v and ffn_down Q4_K_M and Q5_K_M keep at Q6_K: the first and last
    eighths, and every third layer between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _layer(name: str) -> int:
    # llama.cpp counts attn_v and ffn_down tensors in order of their layer (its loader sorts
    # tensors by layer number): with one of each per layer, the count is the layer number
    return int(re.match(r"blk\.(\d+)\.", name).group(1))


def tensor_types(tensors, file_type: str, n_layers: int) -> dict:
    """name -> ggml type for every tensor (TensorPlan: name, ne) of a model."""
    ft = FILE_TYPES[file_type]
    tied = not any(t.name == "output.weight" for t in tensors)
    n_expert = max((t.ne[2] for t in tensors if "_exps." in t.name), default=0)
    return {t.name: _tensor_type(t.name, t.ne, ft, file_type, n_layers, tied, n_expert) for t in tensors}


def _tensor_type(name: str, ne: tuple, ft: FileType, file_type: str, n_layers: int, tied: bool, n_expert: int = 0) -> T:
    if not quantizable(name, ne):
        return T.F32
    if not is_quantized(ft.default):
        return ft.default
    new = ft.default
    row_len = ne[0]
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        # the output projection (or the embeddings standing in for it) gets more bits
        if row_len % block_size(new):
            new = T.Q8_0
        elif new != T.Q8_0:
            new = T.Q6_K
    elif name == "token_embd.weight":
        pass
    elif name.endswith(("attn_v.weight", "attn_qkv.weight")):
        i = _layer(name)
        if file_type in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_layers):
            new = T.Q6_K
        elif file_type == "Q4_K_S" and i < 4:
            new = T.Q5_K
        if n_expert == 8 and name.endswith("attn_v.weight"):  # llama.cpp's bump for 8-expert models
            new = T.Q8_0
    elif name.endswith("attn_k.weight") and n_expert == 8:
        new = T.Q8_0
    elif "ffn_down" in name:  # experts' and a shared expert's too, by their layer
        i = _layer(name)
        if file_type in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_layers):
            new = T.Q6_K
        elif file_type == "Q4_K_S" and i < n_layers // 8:
            new = T.Q5_K
    elif name.endswith("attn_output.weight") and n_expert == 8 and file_type in ("Q4_K_M", "Q4_K_S"):
        new = T.Q5_K
    if row_len % block_size(new):
        new = _FALLBACK.get(new, new)
        if row_len % block_size(new):
            new = T.F16
    return new
