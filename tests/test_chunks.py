"""Prompt chunks sharing a pass (flashcli/engine/chunks.py, issue 36): several sequences' chunks
through a repacked matrix in one product, each chunk with the bits of ggml's own product of that
chunk alone, and each single column with the bits of ggml's product of it alone (the references:
ggml's mul_mat run here on each chunk and column, not flashcli's code); the check that refuses a
packing whose bits differ; and a pass of several prompts through a model, against each prompt
alone."""

from __future__ import annotations

import numpy as np
import pytest
from test_columns import ROWS, TYPES, D, Matrix, bits, run

from flashcli.engine import chunks, ggml, kernels
from flashcli.engine.repack import repacks

# (count, whole) in the pass's order: chunks of every size modulo 4 (tails of 0-3), single tokens
# between and after them, groups straddling ggml's blocks of 16 columns
RUNS = {
    "chunks": [(c, True) for c in (5, 7, 4, 9, 13, 6, 1, 12, 2, 19, 33)],
    "mixed": [(3, True), (1, False), (2, False), (8, True), (2, False), (17, True), (1, False), (4, True)],
    "singles first": [(5, False), (11, True), (6, True)],
}


def _runs(spec) -> list[tuple[int, int, bool]]:
    out, at = [], 0
    for count, whole in spec:
        out.append((at, count, whole))
        at += count
    return out


@pytest.fixture(scope="module")
def pool():
    p = ggml.ThreadPool(2)
    yield p
    p.close()


@pytest.mark.parametrize("rows", [ROWS, 40])  # 40: a group of 8 rows past the last block of 16
def test_chunks_in_one_product_get_the_bits_each_gets_alone(rows, pool):
    """Every type ggml repacks on this CPU (the others keep a product a chunk)."""
    names = [name for name in sorted(TYPES) if repacks(TYPES[name], (D, rows))]
    assert "Q4_K" in names, "ggml repacks no Q4_K here"
    for name in names:
        _check_chunks(name, rows, pool)


def _check_chunks(name: str, rows: int, pool):
    matrix = Matrix(name, True, rows=rows)
    try:
        g = ggml.Graph(pool, max_nodes=4)
        w = matrix.tensor(g)
        by_columns, packs = kernels.exact_columns(w), chunks.packs(w)
        g.close()
        if by_columns is None or not packs:
            # ggml's kernel decides (the probe said no): each chunk keeps a product of its own,
            # whose bits the model-level test below checks on every CPU
            return
        for label, spec in RUNS.items():
            runs = _runs(spec)
            n = sum(c for _, c, _ in runs)
            x = np.random.default_rng(len(label)).standard_normal((n, D)).astype(np.float32)
            alone = []
            for first, count, whole in runs:
                columns = [x[first : first + count]] if whole else [x[j : j + 1] for j in range(first, first + count)]
                alone += [run(pool, matrix, c) for c in columns]
            packed = chunks.split(runs)
            assert packed is not None, label
            together = run(pool, matrix, x, lambda g, w, x_t, p=packed: chunks.product(g, w, x_t, *p, by_columns))
            assert np.array_equal(bits(together), bits(np.concatenate(alone))), (name, rows, label)
    finally:
        matrix.close()


def test_a_pass_without_two_chunks_is_not_packed():
    assert chunks.split(_runs([(9, True), (3, False)])) is None  # one chunk: its own product
    assert chunks.split(_runs([(3, True), (2, True), (9, True)])) is None  # one with a group of four
    grouped, single = chunks.split(_runs([(6, True), (2, False), (4, True)]))
    assert grouped == [0, 1, 2, 3, 8, 9, 10, 11] and single == [4, 5, 6, 7]


def test_a_packing_with_other_bits_fails_the_check(pool, monkeypatch):
    """Groups of 8 put a chunk's columns 5-8 through ggml's gemv instead of its gemm: other bits,
    and the check on the probe matrix must say so."""
    matrix = Matrix("Q4_K", True)
    try:
        g = ggml.Graph(pool, max_nodes=4)
        w = matrix.tensor(g)
        if not repacks(TYPES["Q4_K"], (D, ROWS)) or kernels.exact_columns(w) is None:
            pytest.skip("ggml does not repack Q4_K here, or the columns library is not built")
        chunks._packs.cache_clear()
        monkeypatch.setattr(chunks, "GROUP", 8)
        assert not chunks.packs(w)
        g.close()
    finally:
        chunks._packs.cache_clear()
        matrix.close()


def test_prompts_sharing_a_pass_get_the_logits_each_gets_alone(made, monkeypatch, pool):
    """A tiny llama at Q4_K_M (its matrices repacked where ggml repacks Q4_K): four prompts of
    2-13 tokens in one pass, then two decoding passes, take the packed products, and every logit
    equals a run of the prompt alone, bit for bit."""
    from flashcli.decoding.loader import LoadOptions, load
    from flashcli.engine.decode_state import Part

    path = made("tiny-llama", "Q4_K_M")
    packed = []
    product = chunks.product
    monkeypatch.setattr(chunks, "product", lambda *a: packed.append(1) or product(*a))
    prompts = [[1] + [50 + 7 * i + j for j in range(size - 1)] for i, size in enumerate((13, 2, 6, 9))]
    feed = [[300 + i, 40 + i] for i in range(4)]
    loaded = load(path, LoadOptions(n_ctx=64, sequences=4))
    model = loaded.model
    first = model.eval_parts([Part(s, np.array(p), len(p)) for s, p in zip(model.states, prompts)])
    steps = [model.eval_parts([Part(s, np.array([f[t]])) for s, f in zip(model.states, feed)]) for t in range(2)]
    loaded.close()
    if not packed and repacks(TYPES["Q4_K"], (D, ROWS)):  # only where the probe refused packing here
        probe = Matrix("Q4_K", True)
        g = ggml.Graph(pool, max_nodes=4)
        refused = not chunks.packs(probe.tensor(g))
        g.close()
        probe.close()
        assert refused, "several prompts in a pass, and no packed product"
    loaded = load(path, LoadOptions(n_ctx=64))
    alone = loaded.model
    for i, p in enumerate(prompts):
        alone.reset()
        assert np.array_equal(bits(alone.eval(p, all_logits=True)), bits(first[i])), i
        for t in range(2):
            assert np.array_equal(bits(alone.eval([feed[i][t]])), bits(steps[t][i][0])), (i, t)
    loaded.close()
