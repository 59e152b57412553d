"""Rows: a model's large matrices resident while the budget holds them, the others streamed from
disk at every pass over the layers, every neuron computed.

SwiGLU and GeGLU activations are never exactly zero, and no predictor small enough to keep in
memory finds the neurons that matter (BENCHMARKS.md), so each token needs every FFN weight; and
where a draft model takes most of the budget, the target's attention matrices and output head
must stream too. What the budget cannot hold is read per pass in the order the layers use it,
through a ring that reads ahead of the computation (streaming.TensorStream; its size is
budget_parts.ring_bytes). The output head is streamed in pieces of rows, each multiplied on its
own: a ring need not hold the whole head.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import ggml
from ..engine.bundles import prepacked_names
from ..engine.config import ModelConfig
from ..engine.gguf_file import GGUFFile, TensorInfo
from ..engine.repack import GROUP, repacks
from .streaming import Span, TensorStream

ATTENTION = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output")
FFN = ("ffn_up", "ffn_gate", "ffn_down")
HEAD_PIECE = 8 << 20  # bytes of output-head rows streamed and multiplied at a time


@dataclass(frozen=True)
class Matrix:
    """A matrix a pass multiplies by: a whole tensor, or a piece of rows of the output head."""

    name: str  # the GGUF name, with "#rows" for a piece of the head
    layer: int  # -1 for the head
    ggml_type: int
    row_len: int
    n_rows: int
    offset: int  # absolute, in the file
    nbytes: int
    first_row: int = 0
    prepacked: bool = False  # stored as ggml's repacked kernels read it (a converted file)

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.n_rows

    @property
    def repacked(self) -> bool:
        """Whether ggml runs it on its repacked kernels."""
        return self.prepacked or repacks(self.ggml_type, (self.row_len, self.n_rows))

    def span(self) -> Span:
        repack = (self.ggml_type, self.row_len, self.row_bytes) if self.repacked and not self.prepacked else None
        return Span(self.offset, self.nbytes, repack, self.prepacked)


def _whole(t: TensorInfo, layer: int, prepacked: frozenset) -> Matrix:
    return Matrix(t.name, layer, t.ggml_type, t.row_len, t.n_rows, t.offset, t.nbytes, prepacked=t.name in prepacked)


def head_tensor(gf: GGUFFile, cfg: ModelConfig) -> TensorInfo:
    return gf.tensor("token_embd.weight" if cfg.tied_output else "output.weight")


def head_pieces(t: TensorInfo, prepacked: frozenset = frozenset()) -> list[Matrix]:
    """The head as pieces of whole groups of rows (the repacked kernels interleave groups of
    rows: repack.GROUP is a multiple of every group), about HEAD_PIECE bytes each."""
    rows = max(GROUP, HEAD_PIECE // t.row_bytes // GROUP * GROUP)
    return [
        Matrix(
            f"{t.name}#{r}",
            -1,
            t.ggml_type,
            t.row_len,
            min(rows, t.n_rows - r),
            t.offset + r * t.row_bytes,
            min(rows, t.n_rows - r) * t.row_bytes,
            r,
            t.name in prepacked,
        )
        for r in range(0, t.n_rows, rows)
    ]


def pass_matrices(gf: GGUFFile, cfg: ModelConfig, ffn: bool = True) -> list[Matrix]:
    """Every large matrix of a pass, in the order a pass uses them: per layer attention, then
    the FFN (where the file has FFN tensors and `ffn`), then the output head."""
    out = []
    prepacked = prepacked_names(gf)
    for i in range(cfg.n_layers):
        names = ATTENTION + (FFN if ffn else ())
        out += [_whole(gf.tensor(f"blk.{i}.{n}.weight"), i, prepacked) for n in names if gf.has(f"blk.{i}.{n}.weight")]
    return out + head_pieces(head_tensor(gf, cfg), prepacked)


class StreamedWeights:
    """The streamed matrices of a pass, read ahead through one ring."""

    def __init__(self, path, streamed: list[Matrix], capacity: int, threads: int = 4):
        self.matrices = {m.name: m for m in streamed}
        self.per_layer: dict = {}
        for m in streamed:
            self.per_layer.setdefault(m.layer, []).append(m.name)
        self.stream = TensorStream(path, [m.span() for m in streamed], capacity, threads=threads)

    def __contains__(self, name: str) -> bool:
        return name in self.matrices

    @property
    def head_streamed(self) -> bool:
        return -1 in self.per_layer

    @property
    def nbytes(self) -> int:
        return self.stream.nbytes

    def placeholder(self, g: ggml.Graph, name: str) -> ggml.TensorP:
        """A tensor in graph g for a streamed matrix; ready() points it at the bytes of the pass."""
        m = self.matrices[name]
        t = g.L.new_tensor_2d(g.ext, m.ggml_type, m.row_len, m.n_rows)
        if not self.stream.bind(t, m.repacked):
            raise RuntimeError(f"ggml declined to repack {name}")
        g.placeholders[name] = t
        return t

    def head_names(self) -> list[str]:
        return self.per_layer.get(-1, [])

    def ready(self, layer: int, g: ggml.Graph) -> None:
        """Waits for a layer's streamed matrices and points graph g's placeholders at them."""
        for name in self.per_layer.get(layer, ()):
            self.ready_one(name, g)

    def ready_one(self, name: str, g: ggml.Graph | None) -> None:
        """Waits for the next streamed matrix (which must be `name`) and points g's placeholder
        for it at its bytes (g None: the matrix is not used in this pass)."""
        entry = self.stream.acquire()
        if g is not None and name in g.placeholders:
            entry.point(g.placeholders[name])

    def done(self, layer: int) -> None:
        for _ in self.per_layer.get(layer, ()):
            self.stream.release()

    def done_one(self) -> None:
        self.stream.release()

    def telemetry(self, passes: int) -> dict:
        n = max(passes, 1)
        return {"io_wait_ms": 1e3 * self.stream.wait_s / n, "bytes_read_per_pass": self.stream.bytes_read / n}

    def close(self):
        self.stream.close()
