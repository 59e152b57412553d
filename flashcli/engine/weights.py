"""Resident weights: views into the memory-mapped GGUF, by GGUF tensor name, and for the
matrices llama.cpp repacks (see repack.py) their repacked copies.

Matrices are handed to graphs with `matrix(g, name)`: the repacked tensor where there is one,
else a tensor over the mapped bytes. Vectors (norms, biases) are float32 arrays.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import UnsupportedModel
from . import ggml
from .bundles import prepacked_names
from .config import ModelConfig
from .gguf_file import GGUFFile, TensorInfo
from .repack import RepackedWeights, repacks

ATTENTION_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output")  # q, k, v or a fused qkv
FFN_MATRICES = ("ffn_gate", "ffn_up", "ffn_down")
# a mixture of experts: the router, the experts (3-D: one matrix per expert), a shared expert
# and its gate (qwen2moe)
EXPERT_MATRICES = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
MOE_MATRICES = ("ffn_gate_inp", "ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")
LAYER_VECTORS = ("attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm")
BIASES = ("attn_q", "attn_k", "attn_v")


def ffn_matrices(cfg: ModelConfig) -> tuple:
    """The FFN tensors of a layer: gate, up, down; or a fused gate|up and down (Phi-3); or a
    mixture of experts' router and stacked experts (and a shared expert with its gate)."""
    if cfg.moe:
        shared = ("ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp") if cfg.n_ff_shexp else ()
        return ("ffn_gate_inp",) + EXPERT_MATRICES + shared
    return ("ffn_up", "ffn_down") if cfg.family.fused_gate_up else FFN_MATRICES


def attention_matrices(gf: GGUFFile, i: int) -> tuple:
    """Layer i's attention matrices: a fused attn_qkv where the file has one, else q, k, v."""
    qkv = ("attn_qkv",) if gf.has(f"blk.{i}.attn_qkv.weight") else ("attn_q", "attn_k", "attn_v")
    return qkv + ("attn_output",)


def layer_vectors(cfg: ModelConfig) -> tuple:
    """The norm weights a layer of this family must have."""
    f = cfg.family
    names = ("attn_norm", "ffn_norm") if f.input_norms else ()
    names += ("attn_q_norm", "attn_k_norm") if f.qk_norm else ()
    return names + (("post_attention_norm", "post_ffw_norm") if f.post_norms else ())


ROPE_FACTORS = ("rope_freqs", "rope_factors_long", "rope_factors_short")  # Llama 3's; LongRoPE's


def resident_names(gf: GGUFFile, cfg: ModelConfig, embeddings: bool = True, matrices: bool = True) -> list[str]:
    """Tensors read every token outside the FFN: norms, biases and (with `matrices`) attention and
    the output head (and the token embeddings, which only a tied head needs whole; an untied
    model reads one row per token)."""
    names = ["output_norm.weight"]
    if matrices:
        names.append("token_embd.weight" if cfg.tied_output else "output.weight")
    if embeddings and not cfg.tied_output:
        names.append("token_embd.weight")
    names += [n + ".weight" for n in ROPE_FACTORS if gf.has(n + ".weight")]
    kinds = (ATTENTION_MATRICES if matrices else ()) + LAYER_VECTORS + (MOE_MATRICES if cfg.moe else ())
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        names += [p + n + ".weight" for n in kinds if gf.has(p + n + ".weight")]
        names += [p + n + ".bias" for n in BIASES if gf.has(p + n + ".bias")]
    return names


class Weights:
    """with_ffn: True (every FFN matrix), False (none) or the set of FFN tensor names to hold.
    anonymous: hold copies in our own memory and drop the file's pages (flash generation, where
    the budget must count exactly what is resident); else compute on the mapped file.
    streamed: names of attention matrices and of the output head not to hold (weight_stream)."""

    def __init__(
        self,
        gf: GGUFFile,
        cfg: ModelConfig,
        with_ffn=True,
        repack: bool = True,
        anonymous: bool = False,
        streamed: frozenset = frozenset(),
    ):
        self.gf, self.cfg = gf, cfg
        self.copies: dict[str, np.ndarray] = {}
        self.token_embd = gf.tensor("token_embd.weight")
        self.output = gf.tensor("token_embd.weight" if cfg.tied_output else "output.weight")
        self.output_norm = vector(gf, "output_norm.weight")
        self.rope_factors = {n: vector(gf, n + ".weight") for n in ROPE_FACTORS if gf.has(n + ".weight")}
        self.layers = []
        matrices = {}
        bundled = cfg.ffn_layout == "bundles"  # the FFN is in the neuron records
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            layer = {n: vector(gf, p + n + ".weight") for n in layer_vectors(cfg)}  # BadModelFile if missing
            layer.update({n + "_bias": vector(gf, p + n + ".bias") for n in BIASES if gf.has(p + n + ".bias")})
            for n in attention_matrices(gf, i) + ffn_matrices(cfg):
                if bundled and n.startswith("ffn_") and not gf.has(p + n + ".weight"):
                    continue
                layer[n] = gf.tensor(p + n + ".weight")
                if layer[n].name in streamed:
                    continue
                if (
                    n in ATTENTION_MATRICES
                    or n in MOE_MATRICES
                    and cfg.moe
                    or with_ffn is True
                    or (with_ffn and layer[n].name in with_ffn)
                ):
                    matrices[layer[n].name] = layer[n]
            self.layers.append(layer)
        head_held = self.output.name not in streamed
        # a tied head is held as a matrix too where ggml repacks it: llama.cpp multiplies by a
        # repacked copy of token_embd, while the embeddings are rows of the plain bytes
        tied_repacked = cfg.tied_output and repack and repacks(self.output.ggml_type, self.output.ne)
        if head_held and (not cfg.tied_output or tied_repacked):
            matrices[self.output.name] = self.output
        self.matrices = matrices  # the matrices held (mapped, copied or repacked), by name
        if not anonymous:
            gf.prefetch(resident_names(gf, cfg, embeddings=False) + [n for n in matrices if ".ffn_" in n])
        self.repacked = RepackedWeights()
        prepacked = prepacked_names(gf)
        if not repack and prepacked:
            raise UnsupportedModel(f"{gf.path}: stores matrices repacked: they run on the repacked kernels only")
        if repack:  # the repacked copies are what we compute on: the file's pages of them can go
            self.repacked.load(
                matrices,
                release=gf.release_range,
                prepacked=prepacked,
                read_ahead=gf.read_ahead,
                read_into=gf.read_into,
            )
        if anonymous:
            for name in [self.output.name] * head_held + list(matrices):
                if name not in self.repacked.tensors and name not in self.copies:
                    self.copies[name] = gf.copy_out(name)
        self._embedding_fd = -1
        if anonymous and self.token_embd.name not in self.copies:  # one row per token, read when needed
            self._embedding_fd = os.open(gf.path, os.O_RDONLY)

    def rope_freqs(self, n_ctx: int) -> np.ndarray | None:
        """Rope frequency factors for a context of n_ctx, as llama.cpp picks them: Llama 3's,
        else LongRoPE's long ones where n_ctx exceeds the original context, else its short ones."""
        f = self.rope_factors
        if "rope_freqs" in f or not f:
            return f.get("rope_freqs")
        return f["rope_factors_long" if n_ctx > self.cfg.rope_original_context else "rope_factors_short"]

    @property
    def nbytes(self) -> int:
        """Bytes of weights held in our own memory (repacked and copied)."""
        return self.repacked.nbytes + sum(a.nbytes for a in self.copies.values())

    def arrays(self, skip_layers=()) -> list:
        """(array, ggml type, ne0, ne1) of what the graphs read (gpu.Device.hold): the held
        matrices (but those of `skip_layers`), as `matrix` hands them over, norms, biases, the
        output head, rope factors."""
        skipped = {t.name for i in skip_layers for t in self.layers[i].values() if isinstance(t, TensorInfo)}
        held = {t.name: t for t in [*self.matrices.values(), self.output]}  # the head once, tied or not
        out = [
            (self.copies.get(t.name, t.raw), t.ggml_type, t.row_len, t.n_rows)
            for t in held.values()
            if t.name not in self.repacked.tensors and t.name not in skipped
        ]
        vectors = [self.output_norm] + [v for layer in self.layers for v in layer.values() if isinstance(v, np.ndarray)]
        out += [(v, ggml.F32, len(v), 1) for v in vectors]
        out += [(v, ggml.F32, len(v), 1) for v in self.rope_factors.values()]
        return out

    def layer_bytes(self, i: int) -> int:
        """Bytes of layer i's matrices in the file."""
        return sum(t.raw.nbytes for t in self.layers[i].values() if isinstance(t, TensorInfo))

    def layer_matrices(self, i: int) -> list[np.ndarray]:
        """The arrays of layer i's matrices, as `matrix` hands them to graphs."""
        return [self.copies.get(t.name, t.raw) for t in self.layers[i].values() if isinstance(t, TensorInfo)]

    def matrix(self, g: ggml.Graph, t: TensorInfo) -> ggml.TensorP:
        """t as the first operand of a matrix product in graph g."""
        repacked = self.repacked.tensors.get(t.name)
        if repacked is not None:
            return repacked
        if len(t.ne) == 3:  # experts
            return g.external(self.copies.get(t.name, t.raw), t.ggml_type, *t.ne)
        return g.external(self.copies.get(t.name, t.raw), t.ggml_type, t.row_len, t.n_rows)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """Token ids [n] -> embeddings [n, d] (reads only those rows), as ggml_get_rows does."""
        t = self.token_embd
        if t.name in self.copies:
            rows = self.copies[t.name].reshape(t.n_rows, -1)[tokens]
        elif self._embedding_fd >= 0:
            rows = np.stack([self._read_row(t, int(i)) for i in tokens])
        else:
            rows = t.rows()[tokens]
        return ggml.dequantize_rows(rows, t.ggml_type, t.row_len)

    def _read_row(self, t: TensorInfo, i: int) -> np.ndarray:
        """Row i of t by pread, dropped from the page cache after: a budget must not pay for a
        table it reads one row of per token."""
        start = t.offset + i * t.row_bytes
        row = np.frombuffer(os.pread(self._embedding_fd, t.row_bytes, start), np.uint8)
        os.posix_fadvise(self._embedding_fd, start, t.row_bytes, os.POSIX_FADV_DONTNEED)
        return row

    def close(self):
        self.repacked.close()
        if self._embedding_fd >= 0:
            os.close(self._embedding_fd)
            self._embedding_fd = -1


def vector(gf: GGUFFile, name: str) -> np.ndarray:
    t = gf.tensor(name)
    if t.ggml_type == 0:
        return np.array(t.raw.view(np.float32))
    return ggml.dequantize_rows(t.rows(), t.ggml_type, t.row_len).reshape(-1)
