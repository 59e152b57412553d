"""The forward pass: llama.cpp's decoder block, its switches set by the architecture (arch/).

Per batch of n tokens (shapes in ggml order [ne0, ne1, ...], d = d_model, W = attention window):
  embed:      x[d, n] = rows of token_embd (x sqrt(d) for Gemma, x a multiplier for Granite)
  per layer:  h = rms_norm(x) * attn_norm            (h = x where the family has no input norms)
              q[hd, H, n], k, v[hd, Hkv, n] = Wq h (+ bias), Wk h, Wv h (or views of one fused
                                                     Wqkv h); q/k norms per head or projection
              rope(q, k) (adjacent pairs or NEOX halves, base per layer; none on SmolLM3's 4th)
              k, v -> KV cache rows
              a = softmax(softcap(q K^T) * scale + mask) V   over the cache window W (sliding for
                                                     SWA layers; softcap only for Gemma 2)
              x2 = x + r * post_norm(Wo a)           (post_norm, residual multiplier r: per family)
              h = rms_norm(x2) * ffn_norm
              x = x2 + r * post_norm(down(act(gate h) * up h))   (gate|up one fused matrix: Phi-3)
  head:       logits[vocab, n_out] = W_out (rms_norm(x) * output_norm), soft-capped or divided
              by a logit scale where the family does
The ops, their order and the KV cache layout follow llama.cpp's CPU path (f16 cache, window
padded to 256 positions, the last layer run on the output rows only) so that the logits are
llama.cpp's: quantized matmuls re-quantize their inputs to 8 bits, which turns the smallest
difference upstream into visible logit noise.

Dense generation runs a whole token (all layers and the head) as one ggml graph. Flash
generation runs a graph per layer, with one or both of:
- streamed matrices (weight_stream.StreamedWeights: "rows" files, and any file under a budget
  that does not hold it): a layer's graph runs between stream.ready(i, graph) (its streamed
  matrices are in memory) and stream.done(i); a streamed output head runs piece by piece;
- an FFN of our own (an `FFN`: "bundles" files): a graph computes attention and the FFN input,
  then ffn.forward(i, h, units) returns the FFN's output (neurons or experts read on demand).
Calibration taps on the FFN input (on_ffn_input) also run a graph per layer.

Verifying drafted tokens (speculative.py) sets `exact`: the tokens of a batch then get the bits
each would get alone, products being split into batches of columns that ggml's kernels compute
as they compute one (kernels.py).
Config, resident weights and decode state are kept apart: ModelConfig, Weights, DecodeState.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..errors import UnsupportedModel
from . import ggml
from .config import ModelConfig
from .decode_state import BatchInputs, DecodeState, Part, graph_key
from .gguf_file import GGUFFile
from .layers import Blocks, glu  # noqa: F401  (glu re-exported)
from .output_head import OutputHead
from .weight_types import open_checked
from .weights import Weights

DEFAULT_CONTEXT = 4096
PROMPT_BATCH = 512  # tokens per prompt batch, as llama.cpp's default n_batch / n_ubatch
NODES_PER_LAYER = 48
LOGITS_ROWS = 32
KEEP_COLUMNS = 64  # a pass of single columns is kept up to this many (a verifying pass, a batch's decoding)


class FFN(Protocol):
    """An FFN computed outside the layer graphs (the bundles layout's neuron FFN, a mixture of
    experts). One may also have `in_layer(g, layer, h, units)`, whose ((tensor, dtype), ...)
    outputs, added at the end of the layer's graph, forward() receives as arrays after `units`."""

    def forward(self, layer: int, h: np.ndarray, units: tuple | None = None) -> np.ndarray:
        """FFN input h [n, d] -> output [n, d]; `units`: which of its columns are whole batches
        and which single tokens (decode_state.BatchInputs), for FFNs whose bits depend on it."""

    def reset(self) -> None:
        """A new sequence."""

    def telemetry(self, tokens: int) -> dict: ...

    def close(self) -> None: ...


class Model(Blocks, OutputHead):
    """A loaded model: `eval(tokens)` appends tokens to its decode state and returns logits;
    `eval_parts` runs tokens of several sequences, each with its own DecodeState, in one pass.
    Dense: everything resident, nothing read from disk; flash.FlashModel sets what a budget does."""

    plan = None  # a flash model's budget.Plan; None: no budget, everything resident
    layout = None  # the FFN layout flash generation runs ("rows", "bundles"); None: dense
    bytes_read = 0  # bytes read from disk so far (flash generation)
    logits_rows = LOGITS_ROWS  # rows of logits computed at a time where every position's are wanted

    def __init__(
        self,
        path,
        n_threads: int | None = None,
        n_ctx: int | None = None,
        ffn: FFN | None = None,
        gguf_file: GGUFFile | None = None,
        pool: ggml.ThreadPool | None = None,
        weights: Weights | None = None,
        stream=None,
        cfg: ModelConfig | None = None,
        sequences: int = 1,
        device=None,
    ):
        self.gf = gguf_file or open_checked(path)
        self.cfg = cfg or ModelConfig.from_gguf(self.gf)
        if ffn is None and not self.gf.has("blk.0.ffn_gate.weight") and self.gf.has("blk.0.ffn_bundle"):
            raise UnsupportedModel(f"{self.gf.path}: a converted file: run it with --dram-budget (flash generation)")
        self.device = device  # gpu.Device: graphs run there, weights (as in the file) and KV caches resident
        self.weights = weights or Weights(self.gf, self.cfg, with_ffn=ffn is None, repack=device is None)
        self.ffn = ffn  # None: the source's FFN, inside the graphs
        self.stream = stream  # StreamedWeights: matrices read from disk at every pass, or None
        self.exact = False  # batches give each token the bits it would get alone (verification)
        self.batched_products = False  # a pass's tokens multiplied as one batch (batching.py's opt-in)
        self.n_ctx = min(n_ctx or DEFAULT_CONTEXT, self.cfg.context_length)
        self.pool = pool or ggml.ThreadPool(n_threads)
        self.prompt_batch = PROMPT_BATCH
        # a KV cache per sequence decoded together (batching.py); eval() runs the first
        self.states = [DecodeState.empty(self.cfg, self.n_ctx, sequences) for _ in range(sequences)]
        self.state = self.states[0]
        self._decode = None  # (key, inputs, graphs) of the last pass of single columns, kept
        self._residuals = {}  # (layer, n) -> graph of x2 + post_norm(y), for FFNs outside the graph
        self._head = None  # (units, graph, input, logits) of head_logits()
        self._piece_graphs = None  # (units, graphs) of a streamed head's pieces
        self.on_ffn_input = None  # optional callback(layer, h[n, d]): calibration taps the FFN input
        if device is not None:
            device.load(self.weights, self.states)

    def new_graph(self, max_nodes: int) -> ggml.Graph:
        """A graph of this model's, on its device (the CPU where it has none)."""
        return ggml.Graph(self.pool, max_nodes=max_nodes, device=self.device)

    def telemetry(self) -> dict:
        """Measures of the run so far: a GPU's memory, copies and compute time (FlashModel: reads)."""
        return self.device.telemetry() if self.device is not None else {}

    def reset(self):
        self.state.n_past = 0
        if self.ffn is not None:
            self.ffn.reset()

    def rollback(self, n_past: int):
        """Forgets the positions from n_past on (rejected drafted tokens): later tokens
        overwrite their cache rows, and masks never show them before that."""
        if not 0 <= n_past <= self.state.n_past:
            raise ValueError(f"cannot roll back to {n_past} from {self.state.n_past}")
        self.state.n_past = n_past

    @property
    def layered(self) -> bool:
        """A graph per layer (FFN input taps, our own FFN, streamed matrices), or one per token."""
        streams = self.stream is not None or (self.device is not None and bool(self.device.streamed))
        return self.on_ffn_input is not None or self.ffn is not None or streams

    @property
    def fused_ffn(self) -> bool:
        return self.ffn is None

    @property
    def io_wait_s(self) -> float:
        """Seconds spent waiting for reads (a dense model reads nothing: flash.FlashModel)."""
        return 0.0

    @property
    def head_streamed(self) -> bool:
        return self.stream is not None and self.stream.head_streamed

    # --- one batch ---------------------------------------------------------------------------

    def eval(self, tokens, all_logits: bool = False, logits: bool = True, hidden: bool = False) -> np.ndarray | None:
        """Run `tokens` after the current state. Logits [n, vocab] if all_logits, else [vocab];
        None with logits=False (calibration needs only the layers, not the output head);
        hidden=True: the last layer's output [n, d] for every token, for head_logits()."""
        if hidden:
            all_logits, logits = True, False
        tokens = np.asarray(tokens, dtype=np.int64)
        n = len(tokens)
        if n and self.state.n_past + n > self.n_ctx:
            raise ValueError(f"context full: {self.state.n_past} + {n} tokens > n_ctx {self.n_ctx}")
        out = self.eval_parts([Part(self.state, tokens, n if all_logits else 1)], logits, hidden)
        if out is None:
            return None
        return out[0] if all_logits else out[0][0]

    def eval_parts(self, parts: list[Part], logits: bool = True, hidden: bool = False) -> list | None:
        """One pass over the layers for the tokens of several sequences (each part's state moves
        on by its tokens); per part, the logits [n_out, vocab] of its last n_out tokens (the
        last layer's outputs [n_out, d] with hidden=True), or None with logits=False."""
        cfg = self.cfg
        for p in parts:
            if p.n == 0:
                raise ValueError("no tokens to evaluate")
            if p.state.n_past + p.n > p.state.n_ctx:
                raise ValueError(f"context full: {p.state.n_past} + {p.n} tokens > n_ctx {p.state.n_ctx}")
            if p.tokens.min() < 0 or p.tokens.max() >= cfg.n_vocab:
                raise ValueError("token id out of range")
        logits = logits and not hidden
        inputs, graphs = self._graphs(parts, logits)
        inputs.fill(cfg, self.weights.embed(np.concatenate([p.tokens for p in parts])))
        y = None
        if not self.layered:
            ((g, y),) = graphs
            g.compute()
        else:
            x = inputs.x
            for i, (g, x_in, x2, h, tail) in enumerate(graphs.layers):
                x_in[...] = x
                if self.stream is not None:
                    self.stream.ready(i, g)
                g.compute()  # the layer; without our own FFN, x2 = its output, else x + attention
                if self.stream is not None:
                    self.stream.done(i)
                if self.on_ffn_input:
                    self.on_ffn_input(i, h)
                if self.fused_ffn:
                    x = x2
                else:
                    units = inputs.out_units if i == cfg.n_layers - 1 else inputs.units
                    x = self._residual(i, x2, self.ffn.forward(i, h, units, *tail))
                if not isinstance(graphs.layers, list):  # a prompt batch's layer graph goes before the next is built
                    x = np.array(x, copy=True)
                    del g, x2, h
            if hidden:
                y = x
            elif self.head_streamed:
                y = self._streamed_head(x, inputs.out_units) if logits else self._skip_head()
            elif logits:
                g, x_in, y = graphs.head()
                x_in[...] = x
                g.compute()
        for p in parts:
            p.state.n_past += p.n
        if hidden:
            y = np.array(y, copy=True).reshape(inputs.n_out, cfg.d_model)
        elif not logits:
            return None
        return [y[s.out_start : s.out_start + s.n_out].copy() for s in inputs.segments]

    # --- graphs ------------------------------------------------------------------------------

    def _graphs(self, parts: list[Part], logits: bool):
        """(inputs, graphs) for a pass. Graphs of a pass whose every token is a column of its own
        (single tokens; drafted tokens being verified) are kept while the next pass is the same
        (the same sequences, sizes, windows); others are built for it and dropped. A kept pass
        of several tokens a sequence goes before any other is built: the plan counts a prompt
        batch beside kept single tokens only."""
        single = self.exact or all(p.n == 1 or p.exact for p in parts)
        decode = logits and single and sum(p.n for p in parts) <= KEEP_COLUMNS
        if decode:
            key = graph_key(parts, self.exact, self.batched_products)
            if self._decode is not None and self._decode[0] == key:
                return self._decode[1:]
            self._decode = None  # the old graphs go before the new are built
        elif self._decode is not None and self._decode[1].n > len(self._decode[1].segments):
            self._decode = None
        inputs = BatchInputs(self.cfg, parts, self.exact, self.batched_products)
        graphs = self._build_layered(inputs, decode) if self.layered else [self._build_whole(inputs, logits)]
        if decode:
            self._decode = (key, inputs, graphs)
        return inputs, graphs

    def _build_whole(self, inp: BatchInputs, logits: bool):
        """One graph: embeddings -> every layer -> logits."""
        cfg = self.cfg
        g = self.new_graph(max_nodes=self._nodes_per_layer(inp) * cfg.n_layers + 64)
        x = self._embeddings(g, g.external(inp.x, ggml.F32, cfg.d_model, inp.n))
        for i in range(cfg.n_layers):
            x2, h = self.attention_block(g, i, x, inp)
            units = inp.out_units if i == cfg.n_layers - 1 else inp.units
            x = self.ffn_block(g, i, x2, self.dense_ffn(g, i, h, units))
        y = g.output(self.head(g, x, inp.out_units) if logits else x)
        g.finish()
        return g, g.array(y)

    def _build_layered(self, inp: BatchInputs, keep: bool):
        """Per layer a graph x -> (x2, h) (plus the FFN when it is fused, so that x2 is then the
        layer's output), and the head graph x -> logits: for decoding a list, kept, its layers
        sharing one activation buffer; for a prompt batch a generator, so that one layer's
        activations exist at a time."""
        if not keep:
            layers = (self._layer_arrays(*self._layer_graph(i, inp), None) for i in range(self.cfg.n_layers))
            return _Layered(layers, lambda: self._head_graph(inp))
        built = [self._layer_graph(i, inp) for i in range(self.cfg.n_layers)]
        shared = ggml.SharedActivations([b[0] for b in built])
        return _Layered([self._layer_arrays(*b, shared) for b in built], lambda: self._head_graph(inp))

    def _layer_graph(self, i: int, inp: BatchInputs):
        """Layer i's graph, not yet placed: (graph, input array, x2 and h tensors, rows out)."""
        cfg = self.cfg
        g = self.new_graph(max_nodes=2 * self._nodes_per_layer(inp))
        last = i == cfg.n_layers - 1
        x_t, x = g.input(cfg.d_model, inp.n)
        x_in = self._embeddings(g, x_t) if i == 0 else x_t
        x2, h = self.attention_block(g, i, x_in, inp)
        h = g.output(h)
        units = inp.out_units if last else inp.units
        if self.fused_ffn:
            x2 = self.ffn_block(g, i, x2, self.dense_ffn(g, i, h, units))
        # an FFN outside the graph may put its first ops in it (a mixture of experts' router)
        tail = self.ffn.in_layer(g, i, h, units) if self.ffn is not None and hasattr(self.ffn, "in_layer") else ()
        return g, x, g.output(x2), h, inp.n_out if last else inp.n, tail

    def _layer_arrays(self, g, x, x2, h, rows: int, tail: tuple, shared):
        if shared is None:
            g.finish()
        d = self.cfg.d_model
        return (
            g,
            x,
            g.array(x2).reshape(rows, d),
            g.array(h).reshape(rows, d),
            tuple(ggml.as_array(t, dtype) for t, dtype in tail),
        )

    def _nodes_per_layer(self, inp: BatchInputs) -> int:
        """Graph nodes of a layer: products split into column groups (3 nodes a group), attention
        per part (per token in exact mode, soft-capping included)."""
        groups = sum(n if not whole else 1 for _, n, whole in inp.units)
        chunks = sum(s.n if s.exact else 1 for s in inp.segments)
        return NODES_PER_LAYER + 24 * groups + 10 * len(inp.segments) + 13 * chunks

    def _head_graph(self, inp: BatchInputs):
        g = self.new_graph(max_nodes=16 + 4 * inp.n_out)
        x_t, x = g.input(self.cfg.d_model, inp.n_out)
        y = g.output(self.head(g, x_t, inp.out_units))
        g.finish()
        return g, x, g.array(y)


class _Layered:
    """A batch's layer graphs (a list, or a generator building each when reached) and its head
    graph (built on first use, then kept with the list)."""

    def __init__(self, layers, make_head):
        self.layers, self._make_head, self._head = layers, make_head, None

    def head(self):
        if self._head is None:
            self._head = self._make_head()
        return self._head
