"""The decoder block's pieces as ggml graph builders, for model.Model (a mixin: they read the
model's config, weights, streamed matrices and `exact` switch).

Every product takes the `units` of its columns (decode_state.BatchInputs): a part's prompt batch
is multiplied whole, single tokens together on a kernel that computes each as one column (the
columns library, or batches small enough for ggml's own), so that a token of one sequence gets
the bits it gets alone, whatever else shares the pass.
"""

from __future__ import annotations

import numpy as np

from ..arch.architecture import inverse_sqrt
from . import chunks, ggml, moe
from .decode_state import BatchInputs, Segment, column_groups, column_runs
from .ggml import join_columns
from .ggml_bindings import PREC_F32
from .kernels import exact_columns, invariant_columns


class Blocks:
    def matrix(self, g: ggml.Graph, t) -> ggml.TensorP:
        """Weight t (a TensorInfo, or a streamed Matrix) as the first operand of a product in g."""
        if self.stream is not None and t.name in self.stream:
            return self.stream.placeholder(g, t.name)
        return self.weights.matrix(g, t)

    def _residual(self, i: int, x2: np.ndarray, y: np.ndarray) -> np.ndarray:
        """x2 + post_norm(y) for an FFN computed outside the layer graph ([n, d] arrays)."""
        if not self.cfg.family.post_norms:
            return x2 + y  # as ggml_add: one float32 addition per element
        n = len(y)
        key = (i, n)
        if key not in self._residuals:
            if n > 1:
                self._residuals = {k: v for k, v in self._residuals.items() if k[1] == 1}
            g = self.new_graph(max_nodes=16)
            x2_t, x2_in = g.input(self.cfg.d_model, n)
            y_t, y_in = g.input(self.cfg.d_model, n)
            out = g.output(self.ffn_block(g, i, x2_t, y_t))
            g.finish()
            self._residuals[key] = (g, x2_in, y_in, g.array(out))
        g, x2_in, y_in, out = self._residuals[key]
        x2_in[...], y_in[...] = x2, y
        g.compute()
        return out.copy()

    def product(self, g: ggml.Graph, t, x: ggml.TensorP, units: tuple) -> ggml.TensorP:
        """t x for activations x [ne0, n], its columns grouped by `units`: a whole unit in one
        product; neighbouring single columns together on the columns library's kernel, where it
        gives each the bits it gets alone (kernels.exact_columns), else in batches that ggml's
        kernels compute as one column each. Several units on a repacked matrix: their groups of
        four in one product, the rest on the columns kernel (chunks.py)."""
        L, ctx = g.L, g.ctx
        w = self.matrix(g, t)
        if len(units) == 1 and (units[0][2] or units[0][1] == 1):
            return L.mul_mat(ctx, w, x)
        by_columns = exact_columns(w) if g.device is None else None
        if by_columns is None:
            chunk = invariant_columns(t.ggml_type, bool(w.contents.extra))
            groups = [(first, count, True) for first, count in column_groups(units, chunk)]
        else:
            groups = column_runs(units)
            packed = chunks.split(groups)
            if packed and chunks.packs(w):  # several prompt chunks: their groups of four in one product
                return chunks.product(g, w, x, *packed, by_columns)
        if len(groups) == 1 and groups[0][2]:
            return L.mul_mat(ctx, w, x)
        nb1 = x.contents.nb[1]
        parts = []
        for first, count, whole in groups:
            x_part = x if count == x.contents.ne[1] else L.view_2d(ctx, x, x.contents.ne[0], count, nb1, first * nb1)
            parts.append(L.mul_mat(ctx, w, x_part) if whole or count == 1 else by_columns(g, w, x_part))
        return join_columns(g, parts)

    def _embeddings(self, g: ggml.Graph, x: ggml.TensorP) -> ggml.TensorP:
        if self.cfg.family.embedding_scale:
            x = g.L.scale(g.ctx, x, float(np.sqrt(np.float32(self.cfg.d_model))))
        if self.cfg.embedding_multiplier:
            x = g.L.scale(g.ctx, x, self.cfg.embedding_multiplier)
        return x

    def _to_residual(self, g: ggml.Graph, y: ggml.TensorP, norm: str, w: dict) -> ggml.TensorP:
        """A block's output as it joins the residual stream: post-normed, times the residual
        multiplier (where the family has them)."""
        if self.cfg.family.post_norms:
            y = self._norm(g, y, w[norm])
        if self.cfg.residual_multiplier:
            y = g.L.scale(g.ctx, y, self.cfg.residual_multiplier)
        return y

    def _norm(self, g: ggml.Graph, x: ggml.TensorP, weight: np.ndarray) -> ggml.TensorP:
        L = g.L
        return L.mul(g.ctx, L.rms_norm(g.ctx, x, self.cfg.norm_eps), g.external(weight, ggml.F32, len(weight)))

    def attention_block(self, g: ggml.Graph, i: int, x: ggml.TensorP, inp: BatchInputs):
        """x [d, n] -> (x2 [d, rows], h [d, rows]): attention and its residual, then the FFN's
        input norm. rows = n, or the output rows on the last layer (as llama.cpp)."""
        cfg, w, L, ctx = self.cfg, self.weights.layers[i], g.L, g.ctx
        n, hd, H, Hkv = inp.n, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        family = cfg.family
        h = self._norm(g, x, w["attn_norm"]) if family.input_norms else x
        if "attn_qkv" in w:
            q, k, v = self._fused_qkv(g, w, h, inp)
        else:

            def project(name, heads):  # [heads*hd, n] (+ bias, whole-projection norm) -> [hd, heads, n]
                t = self.product(g, w[name], h, inp.units)
                if name + "_bias" in w:
                    t = L.add(ctx, t, g.external(w[name + "_bias"], ggml.F32, heads * hd))
                if family.qk_norm == "projection" and name != "attn_v":
                    t = self._norm(g, t, w[name + "_norm"])
                return L.reshape_3d(ctx, t, hd, heads, n)

            q, k, v = project("attn_q", H), project("attn_k", Hkv), project("attn_v", Hkv)
        if family.qk_norm == "heads":
            q, k = self._norm(g, q, w["attn_q_norm"]), self._norm(g, k, w["attn_k_norm"])
        pos = g.external(inp.pos, ggml.I32, n)
        factors = self.weights.rope_freqs(self.n_ctx)
        freqs = None if factors is None else g.external(factors, ggml.F32, cfg.rope_dim // 2)
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
                cfg.rope_attn_factor,
                32.0,
                1.0,
            )

        if cfg.uses_rope(i):
            q, k = rope(q), rope(k)
        if family.query_scale is not None:
            q, kq_scale = L.scale(ctx, q, family.query_scale(cfg)), 1.0
        else:
            kq_scale = cfg.attention_scale or inverse_sqrt(hd)
        for t in (q, v, k):  # the order llama.cpp adds them in
            g.expand(t)
        k, v = L.reshape_2d(ctx, k, cfg.kv_dim, n), L.reshape_2d(ctx, v, 1, cfg.kv_dim * n)
        a = join_columns(g, [self._attend(g, i, s, q, k, v, kq_scale) for s in inp.segments])
        a = self.product(g, w["attn_output"], a, inp.units)  # [d, n]
        if i == cfg.n_layers - 1:  # only the rows whose logits are wanted go on
            rows = g.external(inp.out_rows, ggml.I32, inp.n_out)
            a, x = L.get_rows(ctx, a, rows), L.get_rows(ctx, x, rows)
        x2 = L.add(ctx, self._to_residual(g, a, "post_attention_norm", w), x)
        return x2, self._norm(g, x2, w["ffn_norm"]) if family.input_norms else x2

    def _fused_qkv(self, g: ggml.Graph, w: dict, h: ggml.TensorP, inp: BatchInputs):
        """q, k, v [hd, heads, n] as views of one product by attn_qkv (its rows: q, k, v), as
        llama.cpp cuts them; v copied out, as the cache stores it whole."""
        cfg, L, ctx = self.cfg, g.L, g.ctx
        hd, n = cfg.head_dim, inp.n
        qkv = self.product(g, w["attn_qkv"], h, inp.units)  # [q_dim + 2 kv_dim, n]
        nb1 = qkv.contents.nb[1]

        def heads(count, first_row):
            return L.view_3d(ctx, qkv, hd, count, n, hd * 4, nb1, first_row * 4)

        v = L.cont(ctx, heads(cfg.n_kv_heads, cfg.q_dim + cfg.kv_dim))
        return heads(cfg.n_heads, 0), heads(cfg.n_kv_heads, cfg.q_dim), v

    def _attend(self, g: ggml.Graph, i: int, s: Segment, q, k, v, kq_scale: float) -> ggml.TensorP:
        """One part's attention [H*hd, n_s]: its k, v stored at its positions of its own cache
        (K rows [n_ctx, kv_dim]; V transposed, one element a row), its queries over its window.
        In exact mode (or an exact part) one token at a time (the float kernels' results depend
        on the batch)."""
        cfg, L, ctx = self.cfg, g.L, g.ctx
        hd, H, Hkv, kv, W, n_ctx = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.kv_dim, s.window, s.state.n_ctx
        k_cache = g.external(s.state.k[i], ggml.F16, kv, n_ctx)
        v_cache = g.external(s.state.v[i], ggml.F16, 1, kv * n_ctx)
        k_s = L.view_2d(ctx, k, kv, s.n, k.contents.nb[1], s.start * k.contents.nb[1])
        v_s = L.view_2d(ctx, v, 1, kv * s.n, v.contents.nb[1], s.start * kv * v.contents.nb[1])
        g.expand(L.set_rows(ctx, k_cache, k_s, g.external(s.k_rows, ggml.I64, s.n)))
        g.expand(L.set_rows(ctx, v_cache, v_s, g.external(s.v_rows, ggml.I64, kv * s.n)))
        # K [hd, W, Hkv], V [W, hd, Hkv], q [hd, m, H]
        keys = L.permute(ctx, L.view_3d(ctx, k_cache, hd, Hkv, W, hd * 2, kv * 2, 0), 0, 2, 1, 3)
        values = L.permute(ctx, L.view_3d(ctx, v_cache, W, Hkv, hd, n_ctx * hd * 2, n_ctx * 2, 0), 0, 2, 1, 3)
        mask = s.mask_swa if cfg.is_swa(i) else s.mask
        mask_t = g.external(mask, ggml.F32, W, s.n)
        parts = []
        for first, m in ((0, s.n),) if not s.exact else ((j, 1) for j in range(s.n)):
            at = s.start + first
            q_m = L.view_3d(ctx, q, hd, H, m, q.contents.nb[1], q.contents.nb[2], at * q.contents.nb[2])
            kq = L.mul_mat(ctx, keys, L.permute(ctx, q_m, 0, 2, 1, 3))  # [W, m, H]
            L.prec_set_acc(kq, PREC_F32)  # as llama.cpp: CUDA would sum K.q in float16 otherwise
            if cfg.attn_softcap:
                kq = softcap(g, kq, cfg.attn_softcap)
            mask_m = L.view_2d(ctx, mask_t, W, m, mask_t.contents.nb[1], first * mask_t.contents.nb[1])
            kq = L.soft_max_ext(ctx, kq, mask_m, kq_scale, 0.0)
            kqv = L.mul_mat(ctx, values, kq)  # [hd, m, H]
            parts.append(L.cont_2d(ctx, L.permute(ctx, kqv, 0, 2, 1, 3), H * hd, m))
        return join_columns(g, parts)

    def dense_ffn(self, g: ggml.Graph, i: int, h: ggml.TensorP, units: tuple) -> ggml.TensorP:
        """h [d, n] -> down(act(gate h) * up h) [d, n], with the source's weights (a mixture of
        experts where the model has one)."""
        if self.cfg.moe:
            return self.moe_ffn(g, i, h, units)
        w = self.weights.layers[i]
        up = self.product(g, w["ffn_up"], h, units)
        if self.cfg.family.fused_gate_up:  # up holds the gate rows, then the up rows
            act = g.L.swiglu(g.ctx, up)
        else:
            act = glu(g, self.cfg.ffn_activation, self.product(g, w["ffn_gate"], h, units), up)
        return self.product(g, w["ffn_down"], act, units)

    def moe_ffn(self, g: ggml.Graph, i: int, h: ggml.TensorP, units: tuple) -> ggml.TensorP:
        """The mixture of experts of layer i on h [d, n] (moe.py). Single tokens of a pass one
        at a time: each token's experts differ, and so would its bits in a batch."""
        w, L, ctx = self.weights.layers[i], g.L, g.ctx
        mats = {k: self.matrix(g, w[f"ffn_{k}_exps"]) for k in ("gate", "up", "down")}
        parts = []
        for first, count in column_groups(units, 1):
            x = (
                h
                if count == h.contents.ne[1]
                else L.view_2d(ctx, h, h.contents.ne[0], count, h.contents.nb[1], first * h.contents.nb[1])
            )
            ids, weights = moe.route(g, self.cfg, self.matrix(g, w["ffn_gate_inp"]), x)
            y = moe.experts(g, self.cfg, mats, x, ids, weights)
            if self.cfg.n_ff_shexp:
                y = L.add(ctx, y, moe.shared_expert(g, self.cfg, self.product, w, x, ((0, count, True),)))
            parts.append(y)
        return join_columns(g, parts)

    def ffn_block(self, g: ggml.Graph, i: int, x2: ggml.TensorP, y: ggml.TensorP) -> ggml.TensorP:
        """The FFN output y [d, n] joins the residual stream: x2 + post_norm(y)."""
        return g.L.add(g.ctx, self._to_residual(g, y, "post_ffw_norm", self.weights.layers[i]), x2)

    def head(self, g: ggml.Graph, x: ggml.TensorP, units: tuple) -> ggml.TensorP:
        """x [d, n] -> logits [vocab, n]."""
        h = self._norm(g, x, self.weights.output_norm)
        return self.logits(g, self.product(g, self.weights.output, h, units))

    def logits(self, g: ggml.Graph, z: ggml.TensorP) -> ggml.TensorP:
        """The output head's product z as logits: soft-capped (Gemma 2) or divided by the logit
        scale (Granite) where the family does so; elementwise, so pieces of rows work too."""
        if self.cfg.final_softcap:
            z = softcap(g, z, self.cfg.final_softcap)
        if self.cfg.logit_scale:
            z = g.L.scale(g.ctx, z, float(np.float32(1.0) / np.float32(self.cfg.logit_scale)))
        return z


def softcap(g: ggml.Graph, x: ggml.TensorP, cap: float) -> ggml.TensorP:
    """cap * tanh(x / cap), in llama.cpp's three ops (1/cap in float32, as 1.0f / cap)."""
    x = g.L.scale(g.ctx, x, float(np.float32(1.0) / np.float32(cap)))
    return g.L.scale(g.ctx, g.L.tanh(g.ctx, x), cap)


glu = ggml.glu  # (model.py and ffn_neurons.py import it from here)
