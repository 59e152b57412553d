"""A mixture of experts as ggml graph pieces, op for op as llama.cpp's build_moe_ffn builds it
(so that the logits are llama.cpp's):

  router:  p[E, n] = softmax(W_r h)            top k: ids[k, n] = argsort_top_k(p)
           w[1, k, n] = p at ids               (renormalised: w / max(sum_k w, 2^-14) per token)
  experts: y_j[d, n] = w_j * down_ids(act(gate_ids h) * up_ids h)   (mul_mat_id: each token's
           k experts, from the stacked expert matrices [ne0, rows, E])
  out:     y_0 + y_1 + ... + y_{k-1}          (+ sigmoid(w_s . h) * shared_ffn(h), qwen2moe)

The router, the experts' products and their weighted sum are separate pieces so that flash
generation can run the router, read the chosen experts (expert_cache.py), and run the experts on
the slots they were read into (ids mapped to slots: a token's column of mul_mat_id depends on its
experts' bytes and on how many of the batch's tokens each expert gets, not on where it is).
"""

from __future__ import annotations

from . import ggml

WEIGHT_SUM_FLOOR = 6.103515625e-5  # llama.cpp's clamp of the weights' sum (the smallest normal f16)


def route(g: ggml.Graph, cfg, router: ggml.TensorP, h: ggml.TensorP) -> tuple[ggml.TensorP, ggml.TensorP]:
    """h [d, n] -> (ids [k, n] int32: each token's experts, best first; weights [1, k, n])."""
    L, ctx = g.L, g.ctx
    n, k, E = h.contents.ne[1], cfg.n_expert_used, cfg.n_expert
    probs = L.soft_max(ctx, L.mul_mat(ctx, router, h))  # [E, n]
    ids = L.argsort_top_k(ctx, probs, k)  # [k, n]
    weights = L.get_rows(ctx, L.reshape_3d(ctx, probs, 1, E, n), ids)  # [1, k, n]
    if cfg.family.moe.renormalise:
        w = L.reshape_2d(ctx, weights, k, n)
        total = L.clamp(ctx, L.sum_rows(ctx, w), WEIGHT_SUM_FLOOR, float("inf"))  # [1, n]
        weights = L.reshape_3d(ctx, L.div(ctx, w, total), 1, k, n)
    g.expand(weights)
    return ids, weights


def experts(g: ggml.Graph, cfg, mats: dict, h: ggml.TensorP, ids: ggml.TensorP, weights: ggml.TensorP):
    """The weighted sum of each token's k experts [d, n]. mats: "gate", "up", "down" stacked
    expert tensors (the whole file's, or slots of an expert cache that `ids` index)."""
    return weighted_sum(g, cfg, expert_outputs(g, cfg, mats, h, ids), weights)


def expert_outputs(g: ggml.Graph, cfg, mats: dict, h: ggml.TensorP, ids: ggml.TensorP) -> ggml.TensorP:
    """Each token's k experts' outputs [d, k, n], unweighted. (ggml picks a product's kernel by
    the rows an expert gets in the batch, so a token's bits depend on how many tokens share
    its experts: a batch is computed whole.)"""
    L, ctx = g.L, g.ctx
    d, n = cfg.d_model, h.contents.ne[1]
    x = L.reshape_3d(ctx, h, d, 1, n)
    up = L.mul_mat_id(ctx, mats["up"], x, ids)  # [n_ff_exp, k, n]
    gate = L.mul_mat_id(ctx, mats["gate"], x, ids)
    return L.mul_mat_id(ctx, mats["down"], ggml.glu(g, cfg.ffn_activation, gate, up), ids)  # [d, k, n]


def weighted_sum(g: ggml.Graph, cfg, y: ggml.TensorP, weights: ggml.TensorP) -> ggml.TensorP:
    """sum_j weights_j * y_j [d, n] of experts' outputs y [d, k, n], in llama.cpp's order."""
    L, ctx = g.L, g.ctx
    d, k, n = cfg.d_model, cfg.n_expert_used, y.contents.ne[2]
    y = L.mul(ctx, y, weights)
    g.expand(y)
    nb1, nb2 = y.contents.nb[1], y.contents.nb[2]
    parts = [L.view_2d(ctx, y, d, n, nb2, j * nb1) for j in range(k)]
    for p in parts:  # the views ordered before the adds, as llama.cpp
        g.expand(p)
    out = parts[0]
    for p in parts[1:]:
        out = L.add(ctx, out, p)
        g.expand(out)
    return L.cont(ctx, out) if k == 1 else out


def shared_expert(g: ggml.Graph, cfg, product, w: dict, h: ggml.TensorP, units: tuple) -> ggml.TensorP:
    """qwen2moe's shared expert [d, n]: its SwiGLU FFN scaled by sigmoid(w_s . h), computed as
    llama.cpp does (silu(x) / x)."""
    L, ctx = g.L, g.ctx
    z = product(g, w["ffn_gate_inp_shexp"], h, units)  # [1, n]
    gate = L.div(ctx, L.silu(ctx, z), z)
    up = product(g, w["ffn_up_shexp"], h, units)
    ffn = product(
        g, w["ffn_down_shexp"], ggml.glu(g, cfg.ffn_activation, product(g, w["ffn_gate_shexp"], h, units), up), units
    )
    return L.mul(ctx, ffn, gate)
