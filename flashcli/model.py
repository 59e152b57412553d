"""The forward pass: llama.cpp's decoder block, its switches set by the architecture (arch/).

Per batch of n tokens (shapes in ggml order [ne0, ne1, ...], d = d_model, W = attention window):
  embed:      x[d, n] = rows of token_embd (x sqrt(d) for Gemma)
  per layer:  h = rms_norm(x) * attn_norm
              q[hd, H, n], k, v[hd, Hkv, n] = Wq h (+ bias), Wk h, Wv h; q/k head norms (Gemma)
              rope(q, k) (adjacent pairs or NEOX halves, base per layer); k, v -> KV cache rows
              a = softmax(q K^T * scale + mask) V    over the cache window W (sliding for SWA layers)
              x2 = x + post_norm(Wo a)               (post_norm only where the family has one)
              h = rms_norm(x2) * ffn_norm
              x = x2 + post_norm(down(act(gate h) * up h))
  head:       logits[vocab, n_out] = W_out (rms_norm(x) * output_norm)
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
  then ffn.forward(i, h) returns the FFN's output (neurons read on demand).
Calibration taps on the FFN input (on_ffn_input) also run a graph per layer.

Verifying drafted tokens (speculative.py) sets `exact`: the tokens of a batch then get the bits
each would get alone, products being split into batches of columns that ggml's kernels compute
as they compute one (kernels.py).
Config, resident weights and decode state are kept apart: ModelConfig, Weights, DecodeState.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from . import ggml
from .arch import inverse_sqrt
from .config import ModelConfig
from .decode_state import BatchInputs, DecodeState
from .errors import UnsupportedModel
from .gguf_file import GGUFFile
from .kernels import invariant_columns
from .weights import Weights, check_weight_types  # noqa: F401  (re-exported)

DEFAULT_CONTEXT = 4096
KV_PAD = 256  # attention runs over the cache window rounded up to this, as in llama.cpp
PROMPT_BATCH = 512  # tokens per prompt batch, as llama.cpp's default n_batch / n_ubatch
NODES_PER_LAYER = 48


class FFN(Protocol):
    """An FFN computed outside the layer graphs (the bundles layout's neuron FFN)."""

    def forward(self, layer: int, h: np.ndarray) -> np.ndarray:
        """FFN input h [n, d] -> output [n, d]."""

    def reset(self) -> None:
        """A new sequence."""

    def telemetry(self, tokens: int) -> dict: ...

    def close(self) -> None: ...


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class Model:
    """A loaded model: `eval(tokens)` appends tokens to the decode state and returns logits."""

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
    ):
        self.gf = gguf_file or GGUFFile(path)
        self.cfg = cfg or ModelConfig.from_gguf(self.gf)
        if ffn is None and not self.gf.has("blk.0.ffn_gate.weight") and self.gf.has("blk.0.ffn_bundle"):
            raise UnsupportedModel(f"{self.gf.path}: a converted file: run it with --dram-budget (flash generation)")
        self.weights = weights or Weights(self.gf, self.cfg, with_ffn=ffn is None)
        self.ffn = ffn  # None: the source's FFN, inside the graphs
        self.stream = stream  # StreamedWeights: matrices read from disk at every pass, or None
        self.exact = False  # batches give each token the bits it would get alone (verification)
        self.n_ctx = min(n_ctx or DEFAULT_CONTEXT, self.cfg.context_length)
        self.pool = pool or ggml.ThreadPool(n_threads or default_threads())
        self.prompt_batch = PROMPT_BATCH
        self.state = DecodeState.empty(self.cfg, -(-self.n_ctx // KV_PAD) * KV_PAD)
        self._decode = None  # (window, inputs, graphs) of single-token evaluation, kept
        self._residuals = {}  # (layer, n) -> graph of x2 + post_norm(y), for FFNs outside the graph
        self._head = None  # (rows, graph, input, logits) of head_logits()
        self.on_ffn_input = None  # optional callback(layer, h[n, d]): calibration taps the FFN input

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
        """One graph per layer (FFN input taps, an FFN of our own, streamed matrices) or one
        graph per token."""
        return self.on_ffn_input is not None or self.ffn is not None or self.stream is not None

    @property
    def fused_ffn(self) -> bool:
        return self.ffn is None

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
        cfg, st = self.cfg, self.state
        tokens = np.asarray(tokens, dtype=np.int64)
        n = len(tokens)
        if n == 0:
            raise ValueError("no tokens to evaluate")
        if st.n_past + n > self.n_ctx:
            raise ValueError(f"context full: {st.n_past} + {n} tokens > n_ctx {self.n_ctx}")
        if tokens.min() < 0 or tokens.max() >= cfg.n_vocab:
            raise ValueError("token id out of range")
        window = min(-(-(st.n_past + n) // KV_PAD) * KV_PAD, st.n_ctx)
        n_out = n if all_logits else 1
        inputs, graphs = self._graphs(n, n_out, window, logits)
        inputs.fill(cfg, self.weights.embed(tokens), st.n_past, st.n_ctx)
        if not self.layered:
            ((g, y),) = graphs
            g.compute()
        else:
            x = inputs.x
            for i, (g, x_in, x2, h) in enumerate(graphs.layers):
                x_in[...] = x
                if self.stream is not None:
                    self.stream.ready(i, g)
                g.compute()  # the layer; without our own FFN, x2 = its output, else x + attention
                if self.stream is not None:
                    self.stream.done(i)
                if self.on_ffn_input:
                    self.on_ffn_input(i, h)
                x = x2 if self.fused_ffn else self._residual(i, x2, self.ffn.forward(i, h))
                if n > 1:  # a prompt batch's layer graph goes before the next is built
                    x = np.array(x, copy=True)
                    del g, x2, h
            if hidden:
                y = x
            elif self.head_streamed:
                y = self._streamed_head(x) if logits else self._skip_head()
            elif logits:
                g, x_in, y = graphs.head()
                x_in[...] = x
                g.compute()
        st.n_past += n
        if hidden:
            return np.array(y, copy=True).reshape(n, cfg.d_model)
        if not logits:
            return None
        return y.copy() if all_logits else y[0].copy()

    def head_logprobs(self, x: np.ndarray, targets: np.ndarray, rows: int = 32) -> np.ndarray:
        """log p(targets[j]) under the logits of last-layer outputs x [r, d] (from eval(...,
        hidden=True)): [r]. A resident head computes `rows` rows of logits at a time; a streamed
        one runs its pieces once, keeping a running log-sum-exp per row, so that a vocabulary of
        150k costs megabytes, not a gigabyte."""
        targets = np.asarray(targets)
        if not self.head_streamed:
            out = []
            for r in range(0, len(x), rows):
                z = self.head_logits(x[r : r + rows]).astype(np.float64)
                m = z.max(-1, keepdims=True)
                lse = m[:, 0] + np.log(np.exp(z - m).sum(-1))
                out.append(z[np.arange(len(z)), targets[r : r + rows]] - lse)
            return np.concatenate(out)
        best = np.full(len(x), -np.inf)
        total = np.zeros(len(x))
        picked = np.zeros(len(x))
        for first, z in self._head_pieces(x):
            z = z.astype(np.float64)
            m = np.maximum(best, z.max(-1))
            total = total * np.exp(best - m) + np.exp(z - m[:, None]).sum(-1)
            best = m
            inside = (targets >= first) & (targets < first + z.shape[1])
            picked[inside] = z[np.flatnonzero(inside), targets[inside] - first]
        return picked - (best + np.log(total))

    def head_logits(self, x: np.ndarray) -> np.ndarray:
        """Logits [r, vocab] of last-layer outputs x [r, d] (from eval(..., hidden=True))."""
        if self.head_streamed:
            return self._streamed_head(x)
        r = len(x)
        if self._head is None or self._head[0] != r:
            g = ggml.Graph(self.pool, max_nodes=16)
            x_t, x_in = g.input(self.cfg.d_model, r)
            y = g.output(self.head(g, x_t))
            g.finish()
            self._head = (r, g, x_in, g.array(y))
        _, g, x_in, y = self._head
        x_in[...] = x
        g.compute()
        return y.copy()

    # --- graphs ------------------------------------------------------------------------------

    def _graphs(self, n: int, n_out: int, window: int, logits: bool):
        """(inputs, graphs) for a batch. Single-token graphs are built once per window and kept;
        a prompt batch's are built for it and dropped."""
        if n == 1 and logits and self._decode is not None and self._decode[0] == window:
            return self._decode[1:]
        inputs = BatchInputs(self.cfg, n, n_out, window)
        graphs = self._build_layered(inputs) if self.layered else [self._build_whole(inputs, logits)]
        if n == 1 and logits:
            self._decode = (window, inputs, graphs)
        return inputs, graphs

    def _build_whole(self, inp: BatchInputs, logits: bool):
        """One graph: embeddings -> every layer -> logits."""
        cfg = self.cfg
        g = ggml.Graph(self.pool, max_nodes=self._nodes_per_layer(inp.n) * cfg.n_layers + 64)
        x = self._embeddings(g, g.external(inp.x, ggml.F32, cfg.d_model, inp.n))
        for i in range(cfg.n_layers):
            x2, h = self.attention_block(g, i, x, inp)
            x = self.ffn_block(g, i, x2, self.dense_ffn(g, i, h))
        y = g.output(self.head(g, x) if logits else x)
        g.finish()
        return g, g.array(y)

    def _build_layered(self, inp: BatchInputs):
        """Per layer a graph x -> (x2, h) (plus the FFN when it is fused, so that x2 is then the
        layer's output), and the head graph x -> logits: a list for decoding (kept), a generator
        for a prompt batch, so that one layer's activations exist at a time."""
        layers = (self._layer_graph(i, inp) for i in range(self.cfg.n_layers))
        return _Layered(list(layers) if inp.n == 1 else layers, lambda: self._head_graph(inp))

    def _layer_graph(self, i: int, inp: BatchInputs):
        cfg = self.cfg
        g = ggml.Graph(self.pool, max_nodes=2 * self._nodes_per_layer(inp.n))
        rows = inp.n_out if i == cfg.n_layers - 1 else inp.n
        x_t, x = g.input(cfg.d_model, inp.n)
        x_in = self._embeddings(g, x_t) if i == 0 else x_t
        x2, h = self.attention_block(g, i, x_in, inp)
        h = g.output(h)
        if self.fused_ffn:
            x2 = self.ffn_block(g, i, x2, self.dense_ffn(g, i, h))
        x2 = g.output(x2)
        g.finish()
        return g, x, g.array(x2).reshape(rows, cfg.d_model), g.array(h).reshape(rows, cfg.d_model)

    def _nodes_per_layer(self, n: int) -> int:
        """Graph nodes of a layer: exact mode splits products and attention per token."""
        return NODES_PER_LAYER + (40 * n if self.exact else 0)

    def _head_graph(self, inp: BatchInputs):
        g = ggml.Graph(self.pool, max_nodes=16 + 4 * inp.n_out)
        x_t, x = g.input(self.cfg.d_model, inp.n_out)
        y = g.output(self.head(g, x_t))
        g.finish()
        return g, x, g.array(y)

    def _streamed_head(self, x: np.ndarray) -> np.ndarray:
        """Logits [r, vocab] of x [r, d], the head's pieces streamed one after another."""
        logits = np.empty((len(x), self.cfg.n_vocab), np.float32)
        for first, z in self._head_pieces(x):
            logits[:, first : first + z.shape[1]] = z
        return logits

    def _head_pieces(self, x: np.ndarray):
        """(first row, logits [r, rows] of that piece of the head) for each streamed piece, in
        order: the normed input is computed once, then each piece is multiplied when read."""
        r = len(x)
        if getattr(self, "_piece_graphs", (None,))[0] != (r, self.exact):
            self._piece_graphs = ((r, self.exact), self._build_head_pieces(r))
        _, (norm_g, norm_in, normed, pieces) = self._piece_graphs
        norm_in[...] = x
        norm_g.compute()
        for name, first, g, h_in, y in pieces:
            h_in[...] = normed
            self.stream.ready_one(name, g)
            g.compute()
            self.stream.done_one()
            yield first, y

    def _build_head_pieces(self, r: int):
        cfg = self.cfg
        norm_g = ggml.Graph(self.pool, max_nodes=16)
        x_t, norm_in = norm_g.input(cfg.d_model, r)
        normed_t = norm_g.output(self._norm(norm_g, x_t, self.weights.output_norm))
        norm_g.finish()
        normed = norm_g.array(normed_t)
        pieces = []
        for name in self.stream.head_names():
            m = self.stream.matrices[name]
            g = ggml.Graph(self.pool, max_nodes=16 + 2 * r)
            h_t, h_in = g.input(cfg.d_model, r)
            y = g.output(self.product(g, m, h_t))
            g.finish()
            pieces.append((name, m.first_row, g, h_in, g.array(y)))
        return norm_g, norm_in, normed, pieces

    def _skip_head(self):
        """A pass that wants no logits still takes the head's pieces from the stream, in order."""
        for name in self.stream.head_names():
            self.stream.ready_one(name, None)
            self.stream.done_one()

    def matrix(self, g: ggml.Graph, t) -> ggml.TensorP:
        """Weight t (a TensorInfo, or a streamed Matrix) as the first operand of a product in g."""
        if self.stream is not None and t.name in self.stream:
            return self.stream.placeholder(g, t.name)
        return self.weights.matrix(g, t)

    def product(self, g: ggml.Graph, t, x: ggml.TensorP) -> ggml.TensorP:
        """t x for activations x [ne0, n]. In exact mode, split into batches of columns that the
        weight's kernel computes as it computes one column (kernels.py)."""
        L, ctx = g.L, g.ctx
        w = self.matrix(g, t)
        n = x.contents.ne[1]
        repacked = bool(w.contents.extra)
        chunk = invariant_columns(t.ggml_type, repacked) if self.exact and n > 1 else n
        if chunk >= n:
            return L.mul_mat(ctx, w, x)
        nb1 = x.contents.nb[1]
        out = None
        for c in range(0, n, chunk):
            part = L.mul_mat(ctx, w, L.view_2d(ctx, x, x.contents.ne[0], min(chunk, n - c), nb1, c * nb1))
            out = part if out is None else L.concat(ctx, out, part, 1)
        return out

    def _embeddings(self, g: ggml.Graph, x: ggml.TensorP) -> ggml.TensorP:
        if self.cfg.family.embedding_scale:
            x = g.L.scale(g.ctx, x, float(np.sqrt(np.float32(self.cfg.d_model))))
        return x

    def _norm(self, g: ggml.Graph, x: ggml.TensorP, weight: np.ndarray) -> ggml.TensorP:
        L = g.L
        return L.mul(g.ctx, L.rms_norm(g.ctx, x, self.cfg.norm_eps), g.external(weight, ggml.F32, len(weight)))

    def attention_block(self, g: ggml.Graph, i: int, x: ggml.TensorP, inp: BatchInputs):
        """x [d, n] -> (x2 [d, rows], h [d, rows]): attention and its residual, then the FFN's
        input norm. rows = n, or the output rows on the last layer (as llama.cpp)."""
        cfg, w, L, ctx = self.cfg, self.weights.layers[i], g.L, g.ctx
        st = self.state
        n, hd, H, Hkv, n_ctx, W = inp.n, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, st.n_ctx, inp.window
        h = self._norm(g, x, w["attn_norm"])

        def project(name, heads):  # [heads*hd, n] (+ bias) -> [hd, heads, n]
            t = self.product(g, w[name], h)
            if name + "_bias" in w:
                t = L.add(ctx, t, g.external(w[name + "_bias"], ggml.F32, heads * hd))
            return L.reshape_3d(ctx, t, hd, heads, n)

        q, k, v = project("attn_q", H), project("attn_k", Hkv), project("attn_v", Hkv)
        if cfg.family.qk_norm:
            q, k = self._norm(g, q, w["attn_q_norm"]), self._norm(g, k, w["attn_k_norm"])
        pos = g.external(inp.pos, ggml.I32, n)
        freqs = (
            None
            if self.weights.rope_freqs is None
            else g.external(self.weights.rope_freqs, ggml.F32, cfg.rope_dim // 2)
        )
        base = cfg.layer_rope_base(i)

        def rope(t):
            return L.rope_ext(
                ctx,
                t,
                pos,
                freqs,
                cfg.rope_dim,
                cfg.family.rope_mode,
                cfg.context_length,
                base,
                1.0 / cfg.rope_scale,
                0.0,
                1.0,
                32.0,
                1.0,
            )

        q, k = rope(q), rope(k)
        if cfg.family.query_scale is not None:
            q, kq_scale = L.scale(ctx, q, cfg.family.query_scale(cfg)), 1.0
        else:
            kq_scale = inverse_sqrt(hd)
        for t in (q, v, k):  # the order llama.cpp adds them in
            g.expand(t)
        # store k, v at the batch's positions: K rows [n_ctx, kv_dim]; V transposed, one element a row
        k_cache = g.external(st.k[i], ggml.F16, cfg.kv_dim, n_ctx)
        v_cache = g.external(st.v[i], ggml.F16, 1, cfg.kv_dim * n_ctx)
        g.expand(L.set_rows(ctx, k_cache, L.reshape_2d(ctx, k, cfg.kv_dim, n), g.external(inp.k_rows, ggml.I64, n)))
        g.expand(
            L.set_rows(
                ctx, v_cache, L.reshape_2d(ctx, v, 1, cfg.kv_dim * n), g.external(inp.v_rows, ggml.I64, cfg.kv_dim * n)
            )
        )
        # attention over the window: K [hd, W, Hkv], V [W, hd, Hkv], q [hd, n, H]
        keys = L.permute(ctx, L.view_3d(ctx, k_cache, hd, Hkv, W, hd * 2, cfg.kv_dim * 2, 0), 0, 2, 1, 3)
        values = L.permute(ctx, L.view_3d(ctx, v_cache, W, Hkv, hd, n_ctx * hd * 2, n_ctx * 2, 0), 0, 2, 1, 3)
        mask = inp.mask_swa if cfg.is_swa(i) else inp.mask
        mask_t = g.external(mask, ggml.F32, W, n)
        # exact mode: one token at a time (the float kernels' results depend on the batch)
        a = None
        for first, m in ((0, n),) if not self.exact else ((j, 1) for j in range(n)):
            q_m = L.view_3d(ctx, q, hd, H, m, q.contents.nb[1], q.contents.nb[2], first * q.contents.nb[2])
            kq = L.mul_mat(ctx, keys, L.permute(ctx, q_m, 0, 2, 1, 3))  # [W, m, H]
            mask_m = L.view_2d(ctx, mask_t, W, m, mask_t.contents.nb[1], first * mask_t.contents.nb[1])
            kq = L.soft_max_ext(ctx, kq, mask_m, kq_scale, 0.0)
            kqv = L.mul_mat(ctx, values, kq)  # [hd, m, H]
            a_m = L.cont_2d(ctx, L.permute(ctx, kqv, 0, 2, 1, 3), H * hd, m)
            a = a_m if a is None else L.concat(ctx, a, a_m, 1)
        a = self.product(g, w["attn_output"], a)  # [d, n]
        if i == cfg.n_layers - 1:  # only the rows whose logits are wanted go on
            rows = g.external(inp.out_rows, ggml.I32, inp.n_out)
            a, x = L.get_rows(ctx, a, rows), L.get_rows(ctx, x, rows)
        if cfg.family.post_norms:
            a = self._norm(g, a, w["post_attention_norm"])
        x2 = L.add(ctx, a, x)
        return x2, self._norm(g, x2, w["ffn_norm"])

    def dense_ffn(self, g: ggml.Graph, i: int, h: ggml.TensorP) -> ggml.TensorP:
        """h [d, n] -> down(act(gate h) * up h) [d, n], with the source's weights."""
        w = self.weights.layers[i]
        up = self.product(g, w["ffn_up"], h)
        gate = self.product(g, w["ffn_gate"], h)
        return self.product(g, w["ffn_down"], glu(g, self.cfg.ffn_activation, gate, up))

    def ffn_block(self, g: ggml.Graph, i: int, x2: ggml.TensorP, y: ggml.TensorP) -> ggml.TensorP:
        """The FFN output y [d, n] joins the residual stream: x2 + post_norm(y)."""
        if self.cfg.family.post_norms:
            y = self._norm(g, y, self.weights.layers[i]["post_ffw_norm"])
        return g.L.add(g.ctx, y, x2)

    def _residual(self, i: int, x2: np.ndarray, y: np.ndarray) -> np.ndarray:
        """x2 + post_norm(y) for an FFN computed outside the layer graph ([n, d] arrays)."""
        if not self.cfg.family.post_norms:
            return x2 + y  # as ggml_add: one float32 addition per element
        n = len(y)
        key = (i, n)
        if key not in self._residuals:
            if n > 1:
                self._residuals = {k: v for k, v in self._residuals.items() if k[1] == 1}
            g = ggml.Graph(self.pool, max_nodes=16)
            x2_t, x2_in = g.input(self.cfg.d_model, n)
            y_t, y_in = g.input(self.cfg.d_model, n)
            out = g.output(self.ffn_block(g, i, x2_t, y_t))
            g.finish()
            self._residuals[key] = (g, x2_in, y_in, g.array(out))
        g, x2_in, y_in, out = self._residuals[key]
        x2_in[...], y_in[...] = x2, y
        g.compute()
        return out.copy()

    def head(self, g: ggml.Graph, x: ggml.TensorP) -> ggml.TensorP:
        """x [d, n] -> logits [vocab, n]."""
        h = self._norm(g, x, self.weights.output_norm)
        return self.product(g, self.weights.output, h)


class _Layered:
    """A batch's layer graphs (a list, or a generator building each when reached) and its head
    graph (built on first use, then kept with the list)."""

    def __init__(self, layers, make_head):
        self.layers, self._make_head, self._head = layers, make_head, None

    def head(self):
        if self._head is None:
            self._head = self._make_head()
        return self._head


def glu(g: ggml.Graph, activation: str, gate: ggml.TensorP, up: ggml.TensorP) -> ggml.TensorP:
    """act(gate) * up, in ggml's fused op for the activation (as llama.cpp's graphs)."""
    op = {"silu": g.L.swiglu_split, "gelu": g.L.geglu_split, "relu": g.L.reglu_split}[activation]
    return op(g.ctx, gate, up)
