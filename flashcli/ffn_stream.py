"""Flash generation for dense-activation FFNs (the "rows" layout): every neuron, some tensors
resident, the others streamed from disk at every pass over the layers.

SwiGLU and GeGLU activations are never exactly zero, and on the models measured here no
predictor small enough to keep in memory finds the neurons that matter (converters/convert.py),
so each token needs every FFN weight. What the budget cannot hold is then read per pass in the
order the layers use it, in large direct reads that run ahead of the computation
(streaming.TensorStream): the disk is busy while the layers compute. The FFN stays inside the
layer graphs, on ggml's kernels (the resident matrices repacked as llama.cpp does).
"""

from __future__ import annotations

import numpy as np

from . import ggml
from .config import ModelConfig
from .gguf_file import GGUFFile, TensorInfo
from .streaming import TensorStream
from .weights import FFN_MATRICES, Weights


def ffn_tensors(gf: GGUFFile, cfg: ModelConfig) -> list[TensorInfo]:
    """The FFN matrices in the order a pass over the layers uses them."""
    return [gf.tensor(f"blk.{i}.{n}.weight") for i in range(cfg.n_layers) for n in ("ffn_gate", "ffn_up", "ffn_down")]


class StreamedFFN:
    fused = True

    def __init__(self, gf: GGUFFile, cfg: ModelConfig, weights: Weights, streamed: list[str], slots: int = 4,
                 threads: int = 4):
        self.weights = weights
        infos = {t.name: t for t in ffn_tensors(gf, cfg)}
        self.streamed_names = set(streamed)
        order = [t for t in ffn_tensors(gf, cfg) if t.name in self.streamed_names]
        self.per_layer = [[t.name for t in order if t.name.startswith(f"blk.{i}.")] for i in range(cfg.n_layers)]
        most = max((len(x) for x in self.per_layer), default=0)
        self.stream = None
        if order:  # every tensor a layer holds at once, plus the ones being read ahead
            self.stream = TensorStream(gf.path, [(t.offset, t.nbytes) for t in order],
                                       slots=max(slots, most + 1), threads=threads)
            self._dummy = np.frombuffer(self.stream.buffers[0], np.uint8)  # graphs point here until ready()
        missing = [n for n in infos if n not in self.streamed_names and n not in weights.matrices]
        if missing:
            raise ValueError(f"FFN tensors neither resident nor streamed: {missing[:3]}")

    @property
    def streams(self) -> bool:
        return self.stream is not None

    @property
    def buffer_bytes(self) -> int:
        return self.stream.nbytes if self.stream else 0

    def matrix(self, g: ggml.Graph, layer: int, t: TensorInfo) -> ggml.TensorP:
        if t.name not in self.streamed_names:
            return self.weights.matrix(g, t)
        tensor = g.L.new_tensor_2d(g.ext, t.ggml_type, t.row_len, t.n_rows)
        tensor.contents.data = self._dummy.ctypes.data  # a real address, so ggml-alloc leaves it be
        g.__dict__.setdefault("streamed", {})[t.name] = tensor
        return tensor

    def ready(self, layer: int, g: ggml.Graph):
        """Points the layer graph's streamed weights at their bytes, once read."""
        slots = getattr(g, "streamed", {})
        for name in self.per_layer[layer]:
            data = self.stream.acquire()
            slots[name].contents.data = data.ctypes.data

    def done(self, layer: int):
        for _ in self.per_layer[layer]:
            self.stream.release()

    def reset(self):
        """A new sequence: nothing to forget (the stream keeps its place in the cycle)."""

    def telemetry(self, tokens: int) -> dict:
        n = max(tokens, 1)
        used = {"ffn_fraction_used_per_token": 1.0}  # every neuron is computed: the output is exact
        if not self.stream:
            return {"io_ms": 0.0, "io_wait_ms": 0.0, "bytes_read_per_token": 0.0} | used
        return {"io_wait_ms": 1e3 * self.stream.wait_s / n, "bytes_read_per_token": self.stream.bytes_read / n} | used

    def close(self):
        if self.stream:
            self.stream.close()
